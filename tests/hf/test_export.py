"""HF checkpoints out: merged exports loaded by transformers give our adapted model's logits,
keep the base's files, index and dtypes byte for byte where nothing was adapted; PEFT exports
loaded by stock peft give the same logits; anything that cannot be mapped stops the export."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import tune_to_hf

from pmss_dist.adapters.io import save_adapter
from pmss_dist.adapters.layers import (AdapterSpec, PMSSLinear, adapter_layers, apply_adapters, merge_adapters,
                                reset_adapters)
from pmss_dist.models.builtin import write_tiny_checkpoint
from pmss_dist.checkpoints.fingerprint import base_fingerprint
from pmss_dist.config import TrainConfig, to_dict
from pmss_dist.hf.load import weight_files
from pmss_dist.files import OutputPathError
from pmss_dist.hf.export import EXPORT_RECORD, ExportError, export_merged, export_peft, write_merged
from test_load import make_hf_checkpoint, our_model, run_tool, tokens

transformers = pytest.importorskip("transformers", reason="the HF tests need transformers (pip install -e .[test])")


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory, single-file or sharded."""
    out = {}
    for path in sorted(set(weight_files(directory).values())):
        out.update(load_file(str(path)))
    return out


def write_tokenizer(ckpt_dir: Path, vocab_size: int) -> None:
    """A real (word-level) fast tokenizer saved by transformers: the files an export must carry."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(ckpt_dir)


def trained_adapter(model, kind: str, size: int, alpha: float, seed: int, steps: int = 2,
                    targets: tuple[str, ...] = AdapterSpec.targets):
    """Put adapters on ``model`` as training leaves them: distinct random skeleton indices, random
    nonzero cores (or LoRA factors), then a few AdamW steps on a next-token loss."""
    apply_adapters(model, AdapterSpec(kind, targets, size=size, alpha=alpha))
    reset_adapters(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if isinstance(layer, PMSSLinear):
                layer.row_idx.copy_(torch.randperm(layer.out_features, generator=gen)[:size])
                layer.col_idx.copy_(torch.randperm(layer.in_features, generator=gen)[:size])
                layer.core.copy_(0.5 * torch.randn(size, size, generator=gen))
            else:
                layer.lora_b.copy_(0.3 * torch.randn(layer.lora_b.shape, generator=gen))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    vocab = model.tok_embeddings.num_embeddings
    batch = torch.randint(0, vocab, (2, 9), generator=gen)
    for _ in range(steps):
        logits = model(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def save_run_adapter(model, adapter_dir: Path, base_dir: Path, kind: str, rank: int, alpha: float) -> None:
    meta = {"kind": kind, "rank": rank, "alpha": alpha, "targets": list(AdapterSpec().targets), "method": "random",
            "base_model": str(base_dir), "base_fingerprint": base_fingerprint(base_dir)}
    save_adapter(model, adapter_dir, meta)


def logits_of(model, toks) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).float()


def transformers_logits(ckpt_dir: Path, toks, dtype=torch.float32) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(toks).logits.float()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max error relative to the largest logit (Gemma's logits are 5x Llama's here)."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x max |logit| {scale:.3g}"


def assert_same_layout_and_untouched_tensors(base: Path, out: Path, adapted: set[str]) -> None:
    """Same weight files and side files; every header identical; tensors not adapted byte-identical."""
    base_files = weight_files(base)
    assert weight_files(out) == {k: out / p.name for k, p in base_files.items()}
    base_names = {p.name for p in base.iterdir()}
    # the base's files, and the record of what made the export
    assert {p.name for p in out.iterdir()} == (base_names - {"adapter.json", "adapter.safetensors"}) | {EXPORT_RECORD}
    for name in base_names:
        if not name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
    for path in sorted(set(base_files.values())):
        raw_base, raw_out = path.read_bytes(), (out / path.name).read_bytes()
        header = 8 + int.from_bytes(raw_base[:8], "little")
        assert raw_out[:header] == raw_base[:header] and len(raw_out) == len(raw_base), path.name
        with safe_open(str(path), "pt") as fb, safe_open(str(out / path.name), "pt") as fo:
            for key in fb.keys():
                same = torch.equal(fb.get_tensor(key).view(torch.uint8), fo.get_tensor(key).view(torch.uint8))
                assert same == (key not in adapted), f"{key}: adapted={key in adapted}, unchanged={same}"


# torchtune module -> HF module, written out here rather than taken from the code under test.
_HF_MODULES = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
               "attn.output_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
               "mlp.w2": "mlp.down_proj"}
# Phi-3's HF files fuse q, k, v (rows in that order) and gate, up.
_HF_MODULES_FUSED = {**_HF_MODULES, "attn.q_proj": "self_attn.qkv_proj", "attn.k_proj": "self_attn.qkv_proj",
                     "attn.v_proj": "self_attn.qkv_proj", "mlp.w1": "mlp.gate_up_proj", "mlp.w3": "mlp.gate_up_proj"}
FUSED_FAMILIES = ("phi3", "phi4-mini")


def hf_weight_name(tune_layer: str, family: str = "llama") -> str:
    _, i, module = tune_layer.split(".", 2)
    modules = _HF_MODULES_FUSED if family in FUSED_FAMILIES else _HF_MODULES
    return f"model.layers.{i}.{modules[module]}.weight"


CASES = [  # family, adapter kind, sharded
    ("llama", "pmss", True),
    ("qwen2", "pmss", False),
    ("gemma", "pmss", False),
    ("mistral", "lora", True),
    ("qwen3", "pmss", True),
    ("gemma2", "lora", False),
    ("phi3", "pmss", True),
    ("phi4-mini", "lora", False),
]


@pytest.mark.parametrize("family,kind,sharded", CASES, ids=[f"{f}-{k}-{'sharded' if s else 'single'}" for f, k, s in CASES])
def test_merged_export_loads_in_transformers(tmp_path, family, kind, sharded):
    base, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    make_hf_checkpoint(base, family, max_shard_size="20KB" if sharded else None)
    write_tokenizer(base, 97)
    model = trained_adapter(our_model(base), kind, size=4, alpha=8.0, seed=5)
    save_run_adapter(model, adapter_dir, base, kind, 4, 8.0)
    ours = logits_of(model, tokens())
    ours_merged = logits_of(merge_adapters(copy.deepcopy(model)), tokens())

    export_merged(adapter_dir, base, out, progress=False)
    adapted = {hf_weight_name(n, family) for n in adapter_layers(model)}
    assert len(adapted) == 2 * (4 if family in FUSED_FAMILIES else 7)
    assert_same_layout_and_untouched_tensors(base, out, adapted)
    merged = transformers_logits(out, tokens())
    # Same weights, same arithmetic: tight. Against the unmerged adapter, fp32 reassociation of the
    # update (W·x + s·C·U·R·x versus (W + s·C·U·R)·x) leaves ~1e-5 of the logits' scale.
    # Gemma's two implementations (embedding scaled by sqrt(d), tanh-GELU) round differently in fp32:
    # up to ~3e-6 of the scale on identical weights, the same noise the import test allows.
    assert_close_to_scale(merged, ours_merged, 5e-6 if family.startswith("gemma") else 2e-6)
    assert_close_to_scale(merged, ours, 3e-5)
    assert (merged - transformers_logits(base, tokens())).abs().max() > 1e-2  # the adapter matters


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune's fp32 RMSNorm
def test_bf16_base_stays_bf16(tmp_path):
    base, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    make_hf_checkpoint(base, "llama", dtype=torch.bfloat16, max_shard_size="12KB")
    model = trained_adapter(our_model(base, dtype=torch.bfloat16), "pmss", size=4, alpha=8.0, seed=6)
    save_run_adapter(model, adapter_dir, base, "pmss", 4, 8.0)
    export_merged(adapter_dir, base, out, progress=False)
    for path in set(weight_files(out).values()):
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, path.name

    # Weight by weight against merge_adapters + torchtune's own tune->HF conversion.
    hf_config = json.loads((base / "config.json").read_text())
    ours_merged = tune_to_hf(merge_adapters(model).state_dict(), num_heads=hf_config["num_attention_heads"],
                             num_kv_heads=hf_config["num_key_value_heads"], dim=hf_config["hidden_size"])
    exported = {}
    for path in set(weight_files(out).values()):
        exported.update(load_file(str(path)))
    assert set(exported) == set(ours_merged)
    for key, value in exported.items():
        assert value.dtype == torch.bfloat16
        # Both round the same fp32 sum to bf16 (bit-identical here); allow one bf16 ulp for BLASes
        # whose kernels round permuted rows differently.
        torch.testing.assert_close(value, ours_merged[key], rtol=2 ** -7, atol=0, msg=key)
    # All in bf16 (model is merged now): each implementation is ~2% of the logits' scale off the
    # fp32 result here, so only a loose check; then the same bf16 weights computed in fp32: tight.
    assert_close_to_scale(transformers_logits(out, tokens(), torch.bfloat16), logits_of(model, tokens()), 0.08)
    assert_close_to_scale(transformers_logits(out, tokens(), torch.float32), logits_of(model.float(), tokens()), 1e-4)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A sharded Llama base with a PMSS adapter and a LoRA adapter trained on it."""
    root = tmp_path_factory.mktemp("llama_run")
    base = root / "base"
    make_hf_checkpoint(base, "llama", max_shard_size="20KB")
    out = {"base": base}
    for kind in ("pmss", "lora"):
        model = trained_adapter(our_model(base), kind, size=4, alpha=8.0, seed=7)
        save_run_adapter(model, root / kind, base, kind, 4, 8.0)
        out[kind] = root / kind
        out[f"{kind}_logits"] = logits_of(model, tokens())
    return out


def test_ranks_split_the_files(llama_run, tmp_path):
    base, adapter = llama_run["base"], llama_run["pmss"]
    export_merged(adapter, base, tmp_path / "one", progress=False)
    (tmp_path / "two").mkdir()
    for rank in (1, 0):
        write_merged(adapter, base, tmp_path / "two", progress=False, rank=rank, world_size=2)
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))


@pytest.mark.parametrize("kind", ["pmss", "lora"])
def test_peft_adapter_is_the_same_update(llama_run, tmp_path, capsys, kind):
    """Without peft: the PEFT file's B·A is exactly merged − base, in HF layout: the adapter's
    scale is in B, PEFT's (alpha / r) is 1, no patterns; the export says how vLLM serves it."""
    base, out = llama_run["base"], tmp_path / "peft"
    export_peft(llama_run[kind], base, out)
    assert "export_peft: vLLM serves this adapter (rank 4) with --max-lora-rank 8" in capsys.readouterr().err
    export_merged(llama_run[kind], base, tmp_path / "merged", progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", EXPORT_RECORD}
    assert json.loads((out / EXPORT_RECORD).read_text())["export"] == "peft"
    lora = load_file(str(out / "adapter_model.safetensors"))
    assert len(lora) == 2 * 2 * 7
    for hf_key, path in weight_files(base).items():
        module = hf_key.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        with safe_open(str(path), "pt") as fb, safe_open(str(tmp_path / "merged" / path.name), "pt") as fm:
            delta = fm.get_tensor(hf_key) - fb.get_tensor(hf_key)
        if a_key not in lora:
            assert not delta.any(), hf_key
            continue
        a, b = lora[a_key], lora[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == 4 and b.shape[1] == 4 and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b @ a, delta, rtol=1e-4, atol=1e-6, msg=hf_key)


@pytest.mark.slow
def test_peft_loads_in_stock_peft(stock_peft, llama_run, tmp_path):
    # Unmerged PEFT vs our unmerged adapter, and PEFT's merge: fp32 reassociation as above.
    args = ["--base", llama_run["base"], "--atol", "1e-4"]
    for kind in ("pmss", "lora"):
        export_peft(llama_run[kind], llama_run["base"], tmp_path / kind)
        expected = tmp_path / f"{kind}.safetensors"
        save_file({"tokens": tokens(), "logits": llama_run[f"{kind}_logits"].contiguous()}, str(expected))
        args += ["--adapter", str(tmp_path / kind), "--expected", str(expected)]
    status, output = stock_peft(args)
    assert status == 0, output
    assert output.count("ok: ") == 2


def test_export_tool_on_a_builtin_run(tmp_path, capsys):
    """``--run`` reads <run>/config.json and <run>/adapter; builtin:tiny's base is <run>/base_model."""
    run = tmp_path / "run"
    base = write_tiny_checkpoint(run / "base_model", seed=0)
    model = trained_adapter(our_model(base), "pmss", size=8, alpha=16.0, seed=8)
    save_run_adapter(model, run / "adapter", base, "pmss", 8, 16.0)
    (run / "config.json").write_text(json.dumps(to_dict(TrainConfig(output_dir=str(run)))))
    (run / "summary.json").write_text(json.dumps({"completed": True}))  # what marks a finished run
    toks = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    assert run_tool("export", ["--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "export_merged: [1/1] model.safetensors: 28 adapted weight(s) merged" in capsys.readouterr().err
    assert (tmp_path / "merged" / "byte_tokenizer.json").is_file()
    torch.testing.assert_close(transformers_logits(tmp_path / "merged", toks), logits_of(model, toks),
                               rtol=1e-5, atol=1e-5)
    assert run_tool("export", ["--run", str(run), "--out", str(tmp_path / "peft"), "--peft"]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    # --out over the run's own files: refused in one line, the run untouched
    config = (run / "config.json").read_bytes()
    for out in (run, run / "adapter", run / "exports"):
        assert run_tool("export", ["--run", str(run), "--out", str(out)]) == 2
        assert "an input of this command" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == config and not (run / "exports").exists()


def test_tool_help_and_missing_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_tool("export", ["--help"])
    assert exit_info.value.code == 0 and "--peft" in capsys.readouterr().out
    (tmp_path / "run").mkdir()
    assert run_tool("export", ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "is neither a finished run (summary.json, adapter/) nor has a complete checkpoint" in capsys.readouterr().err


def _adapter_copy(llama_run, tmp_path, edit) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_run["pmss"], adapter)
    state = load_file(str(adapter / "adapter.safetensors"))
    meta = json.loads((adapter / "adapter.json").read_text())
    state, meta = edit(state, meta)
    save_file(state, str(adapter / "adapter.safetensors"))
    (adapter / "adapter.json").write_text(json.dumps(meta))
    return adapter


def _rename(state, old, new):
    return {k.replace(old, new): v for k, v in state.items()}


@pytest.mark.parametrize("edit,message", [
    (lambda s, m: (_rename(s, "layers.1.attn.q_proj.core", "layers.1.attn.q_proj.scores"), m),
     "tensor 'layers.1.attn.q_proj.scores' is not part of a pmss adapter"),
    (lambda s, m: (_rename(s, "layers.1.attn.q_proj.", "layers.1.attn.qkv_proj."), m),
     "tensor 'layers.1.attn.qkv_proj.col_idx' is not part of a pmss adapter on a projection"),
    (lambda s, m: (_rename(s, "layers.1.", "layers.9."), m),
     "has no tensor model.layers.9.self_attn.k_proj.weight for adapter layer layers.9.attn.k_proj"),
    (lambda s, m: ({**s, "layers.0.mlp.w1.col_idx": s["layers.0.mlp.w1.col_idx"] + 1000}, m),
     "adapter layer layers.0.mlp.w1 .* does not fit model.layers.0.mlp.gate_proj.weight"),
    (lambda s, m: (s, {**m, "base_fingerprint": "0123456789abcdef"}), "trained on a base with fingerprint 0123"),
    (lambda s, m: (s, {**m, "kind": "dora"}), "unknown adapter kind 'dora'"),
], ids=["unknown-tensor", "unknown-layer", "layer-not-in-base", "index-out-of-range", "other-base", "kind"])
def test_export_refuses_what_it_cannot_map(llama_run, tmp_path, edit, message):
    adapter = _adapter_copy(llama_run, tmp_path, edit)
    for export in (export_merged, export_peft):
        with pytest.raises(ExportError, match=message):
            export(adapter, llama_run["base"], tmp_path / "out")
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_output_directory_rules(llama_run, tmp_path):
    """An export replaces its directory whole, so it goes to a new or empty directory or over a
    previous export of its kind; never over, into or around an input."""
    base, adapter = llama_run["base"], llama_run["pmss"]
    for out, relation in ((base, "is the base"), (base / "sub", "lies inside the base"),
                          (adapter, "is the adapter")):
        with pytest.raises(OutputPathError, match=f"output directory {out} {relation}"):
            export_merged(adapter, base, out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "tokenizer.json").write_text("{}")  # another model's file
    for export in (export_merged, export_peft):
        with pytest.raises(ExportError, match="holds files of something else \\(tokenizer.json"):
            export(adapter, base, foreign)
    assert [p.name for p in foreign.iterdir()] == ["tokenizer.json"]
    export_merged(adapter, base, tmp_path / "merged", progress=False)
    with pytest.raises(ExportError, match="holds a merged export"):
        export_peft(adapter, base, tmp_path / "merged")
    (tmp_path / "merged" / "stray.txt").write_text("left from before")
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir() if p.name != "stray.txt"}
    export_merged(adapter, base, tmp_path / "merged", progress=False)  # a previous merged export: replaced whole
    after = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left

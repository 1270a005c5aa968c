"""Every supported family against transformers, on a tiny random model of that very architecture.

A new family (or a variant: RoPE scaling, a sliding window, tied output) adds itself with ONE row in
``FAMILIES`` of tests/hf/test_load.py: its transformers config class and the tiny overrides that
exercise it. Every check below then runs on it:

(a) our logits on the imported checkpoint equal transformers' (fp32), on a sequence as long as the
    tiny config's ``max_position_embeddings``: choose the row's sliding window / RoPE-scaling
    ``original_max_position_embeddings`` well below it, so that the sequence crosses them;
(b) import -> skeleton selection -> merged export of a zero adapter gives back the HF files byte for
    byte (names, dtypes, shapes, values, shard layout), single-file fp32 and sharded bf16;
(c) [slow; one row per HF class, TRAINED_CASES] after a few PMSS and LoRA steps on 2 processes (the
    trainer, torchrun), transformers on
    <run>/merged gives our model's logits (base + the run's adapter), and stock peft on the base +
    the run's PEFT export (``pmss-export --run RUN --peft``) gives the merged export's logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import FAST, REPO, run_job

# The one table of tiny family configs lives beside the import tests, which use it too.
sys.path.insert(0, str(REPO / "tests" / "hf"))
from test_export import assert_close_to_scale, transformers_logits, write_tokenizer  # noqa: E402
from test_load import FAMILIES, TINY, make_hf_checkpoint, our_model, run_tool  # noqa: E402

from pmss_dist.adapters.io import save_adapter  # noqa: E402
from pmss_dist.adapters.layers import AdapterSpec, apply_adapters, assign_skeletons, reset_adapters  # noqa: E402
from pmss_dist.eval.model import load_eval_model  # noqa: E402
from pmss_dist.hf.export import EXPORT_RECORD, ORIGINAL_WEIGHTS, export_merged  # noqa: E402
from pmss_dist.checkpoints.fingerprint import base_fingerprint  # noqa: E402
from pmss_dist.hf.load import read_model_spec  # noqa: E402
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE  # noqa: E402

FAMILY_CASES = list(FAMILIES)
# (c) trains: one row per HF class, the one whose variant touches the most code (RoPE scaling, a
# window, tied output, fused weights); (a) and (b) check every row for exactness.
TRAINED_CASES = ["llama3.1", "mistral-window", "qwen2.5-tied", "qwen3", "gemma", "gemma2", "phi4-mini"]


def long_tokens(hf_config: dict, vocab_size: int, seed: int = 1) -> torch.Tensor:
    """Two sequences filling the tiny config's whole context: past any window or RoPE knee in it."""
    length = hf_config.get("max_position_embeddings", TINY["max_position_embeddings"])
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


def our_logits(model, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).float()


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_logits_match_transformers(tmp_path, family):
    hf_model = make_hf_checkpoint(tmp_path, family)
    toks = long_tokens(read_model_spec(tmp_path).config, TINY["vocab_size"])
    with torch.no_grad():
        expected = hf_model(toks).logits.float()
    assert_close_to_scale(our_logits(our_model(tmp_path), toks), expected, 1e-5)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("sharded", [False, True], ids=["single-fp32-pmss", "sharded-bf16-lora"])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_zero_adapter_export_is_byte_identical(tmp_path, family, sharded):
    base, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    dtype, kind = (torch.bfloat16, "lora") if sharded else (torch.float32, "pmss")
    make_hf_checkpoint(base, family, dtype=dtype, max_shard_size="20KB" if sharded else None)
    write_tokenizer(base, TINY["vocab_size"])
    if sharded:
        assert (base / "model.safetensors.index.json").is_file()
    model = our_model(base, dtype=dtype)
    apply_adapters(model, AdapterSpec(kind, size=4, alpha=8.0))
    reset_adapters(model, seed=0)  # PMSS cores and LoRA B start at zero: the update is zero
    if kind == "pmss":
        assign_skeletons(model, "deim")
    save_adapter(model, adapter_dir, {"kind": kind, "rank": 4, "alpha": 8.0, "targets": list(AdapterSpec().targets),
                                      "method": "deim", "base_model": str(base),
                                      "base_fingerprint": base_fingerprint(base)})
    export_merged(adapter_dir, base, out, progress=False)
    base_files, out_files = _files(base), _files(out)
    record = json.loads(out_files.pop(EXPORT_RECORD))  # the one file the base has not: what made it
    assert record["merged_into"] == ORIGINAL_WEIGHTS and record["adapter"] == str(adapter_dir.resolve())
    assert list(out_files) == list(base_files)
    changed = [name for name in base_files if out_files[name] != base_files[name]]
    assert not changed, f"{family}: export changed {changed}"


# ---- (c) the trainer on 2 processes, then transformers and stock peft on its exports ----------

def _byte_tokenized_checkpoint(path: Path, family: str) -> None:
    """The family's tiny checkpoint with a vocabulary large enough for the byte tokenizer (256 bytes
    + BOS/EOS/PAD), so the trainer's built-in task can run on it."""
    make_hf_checkpoint(path, family, vocab_size=320)
    tok = {"type": "bytes", "bos_id": 256, "eos_id": 257, "pad_id": 258}
    (path / BYTE_TOKENIZER_FILE).write_text(json.dumps(tok))


@pytest.mark.slow
@pytest.mark.parametrize("family", TRAINED_CASES)
def test_trained_exports_match_transformers_and_peft(stock_peft, tmp_path, family):
    base = tmp_path / "base"
    _byte_tokenized_checkpoint(base, family)
    toks = long_tokens(read_model_spec(base).config, 320)
    peft_args, scale = ["--base", base], 0.0
    for kind, lr in (("pmss", "5e-2"), ("lora", "1e-2")):
        run = tmp_path / kind
        run_job(2, [*FAST, "max_steps=3", f"optim.lr={lr}", f"adapter.kind={kind}", f"model.path={base}",
                    f"output_dir={run}", "checkpoint.every_steps=0"])
        ours = our_logits(load_eval_model(base, run / "adapter", device=torch.device("cpu")), toks)
        merged = transformers_logits(run / "merged", toks)
        # Merged weights vs the unmerged adapter: fp32 reassociation of the update, ~1e-5 of the scale.
        assert_close_to_scale(merged, ours, 3e-5)
        assert (merged - transformers_logits(base, toks)).abs().max() > 1e-3, f"{kind}: training changed nothing"

        assert run_tool("export", ["--run", str(run), "--out", str(tmp_path / f"{kind}-peft"), "--peft"]) == 0
        expected = tmp_path / f"{kind}-expected.safetensors"
        save_file({"tokens": toks, "logits": merged.contiguous()}, str(expected))
        peft_args += ["--adapter", str(tmp_path / f"{kind}-peft"), "--expected", str(expected),
                      "--merged", str(run / "merged")]
        scale = max(scale, merged.abs().max().item())
    # PEFT's unmerged forward reassociates the update as ours does: ~1e-5 of the logits' scale
    # (Gemma's are several times Llama's); merged, it is the same weights.
    status, output = stock_peft([*peft_args, "--atol", f"{3e-5 * scale:.3g}"])
    assert status == 0, output
    assert output.count("ok: ") == 2


# ---- the features the rows exercise: each changes the logits, each is exact ---------------------

def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` whose config.json has ``changes`` (None removes a key)."""
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    config = {k: v for k, v in {**read_model_spec(src).config, **changes}.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_llama3_rope_scaling_matters_and_reads_both_layouts(tmp_path):
    hf_model = make_hf_checkpoint(tmp_path / "nested", "llama3.1")
    config = read_model_spec(tmp_path / "nested").config
    toks = long_tokens(config, TINY["vocab_size"])
    with torch.no_grad():
        expected = hf_model(toks).logits.float()
    scaling = {k: v for k, v in config["rope_parameters"].items() if k != "rope_theta"}
    assert scaling["rope_type"] == "llama3" and toks.shape[1] > scaling["original_max_position_embeddings"]
    # The same weights with plain RoPE are far off: the exactness test sees the scaled frequencies.
    plain = _edited_copy(tmp_path / "nested", tmp_path / "plain",
                         rope_parameters={"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]})
    assert (our_logits(our_model(plain), toks) - expected).abs().max() > 1e-2 * expected.abs().max()
    # Llama-3.1's own config.json layout (transformers < 5): rope_scaling and rope_theta at the top level.
    legacy = _edited_copy(tmp_path / "nested", tmp_path / "legacy", rope_parameters=None, rope_scaling=scaling,
                          rope_theta=config["rope_parameters"]["rope_theta"])
    assert_close_to_scale(our_logits(our_model(legacy), toks), expected, 1e-5)
    assert_close_to_scale(transformers_logits(legacy, toks), expected, 1e-6)


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window"])
def test_sliding_window_matters_and_holds_with_packing_and_kv_cache(tmp_path, family):
    from torchtune.modules.common_utils import local_kv_cache

    from pmss_dist.data.packing import document_mask_and_positions

    hf_model = make_hf_checkpoint(tmp_path / "ckpt", family)
    config = read_model_spec(tmp_path / "ckpt").config
    window, toks = config["sliding_window"], long_tokens(config, TINY["vocab_size"])
    total = toks.shape[1]
    with torch.no_grad():
        expected = hf_model(toks).logits.float()
    ours = our_model(tmp_path / "ckpt")

    # Without the window the first `window` positions agree and the rest do not.
    no_window = _edited_copy(tmp_path / "ckpt", tmp_path / "no-window", sliding_window=None, layer_types=None,
                             use_sliding_window=False)
    full = our_logits(our_model(no_window), toks)
    assert_close_to_scale(full[:, :window], expected[:, :window], 1e-5)
    assert (full[:, window:] - expected[:, window:]).abs().max() > 1e-2 * expected.abs().max()

    # A packed row (the trainer's per-document mask, positions restarting) = each document alone.
    split = total * 5 // 8
    mask, positions = document_mask_and_positions([split, total - split], total)
    with torch.no_grad():
        packed = ours(toks[:1], mask=mask[None], input_pos=positions[None]).float()
        alone = [hf_model(toks[:1, :split]).logits.float(), hf_model(toks[:1, split:]).logits.float()]
    assert_close_to_scale(packed, torch.cat(alone, dim=1), 1e-5)

    # Decoding with a KV cache, as eval.generation does: a prefill, then one token at a time.
    causal = torch.ones(total, total, dtype=torch.bool).tril()[None].expand(2, -1, -1)
    pos = torch.arange(total)[None].expand(2, -1)
    prefill = window + 1
    with torch.no_grad(), local_kv_cache(ours, batch_size=2, device=torch.device("cpu"), dtype=torch.float32,
                                         decoder_max_seq_len=total):
        steps = [ours(toks[:, :prefill], mask=causal[:, :prefill], input_pos=pos[:, :prefill])]
        for i in range(prefill, total):
            steps.append(ours(toks[:, i:i + 1], mask=causal[:, i:i + 1], input_pos=pos[:, i:i + 1]))
    assert_close_to_scale(torch.cat(steps, dim=1).float(), expected, 1e-5)


def test_qwen2_5_config_as_released_has_no_window(tmp_path):
    """Qwen2.5's config.json names a sliding_window and max_window_layers but sets use_sliding_window
    false (and, written before transformers 5, no layer_types): transformers uses no window."""
    make_hf_checkpoint(tmp_path / "ckpt", "qwen2.5-tied")
    shipped = _edited_copy(tmp_path / "ckpt", tmp_path / "shipped", use_sliding_window=False, sliding_window=4,
                           max_window_layers=1, layer_types=None)
    toks = long_tokens(read_model_spec(shipped).config, TINY["vocab_size"])
    assert_close_to_scale(our_logits(our_model(shipped), toks), transformers_logits(shipped, toks), 1e-5)

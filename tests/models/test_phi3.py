"""Phi-3 / Phi-4 (``Phi3ForCausalLM``) beyond the per-family checks of test_families: the fused
``qkv_proj`` and ``gate_up_proj`` tensors. Each torchtune projection is a row block of one HF
tensor: import reads only a rank's own rows of it, merged and full export write each block back
(untouched blocks stay byte-identical), and PEFT targets the fused module with stacked ``lora_A``
and block-diagonal ``lora_B`` that stock peft loads and merges to our merged export. Also: old
(transformers 4.x) Phi-3 configs, and refusals.

The tiny configs are ``phi3`` and ``phi4-mini`` of tests/hf/test_load.py's FAMILIES: hidden 32, 4
heads of 8, 2 KV heads, intermediate 45, so ``qkv_proj`` stacks q rows 0:32, k 32:48, v 48:64 and
``gate_up_proj`` gate rows 0:45, up 45:90 (written out below, not taken from the code under test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torchtune.models.phi3._convert_weights import phi3_hf_to_tune, phi3_tune_to_hf

from conftest import FAST, REPO, free_port, run_job

sys.path.insert(0, str(REPO / "tests" / "hf"))
from test_export import (assert_close_to_scale, hf_tensors, logits_of, trained_adapter,  # noqa: E402
                         transformers_logits)
from test_load import TINY, make_hf_checkpoint, our_model, tokens  # noqa: E402

from pmss_dist.adapters.io import save_adapter  # noqa: E402
from pmss_dist.hf.export import export_merged, export_peft  # noqa: E402
from pmss_dist.checkpoints.fingerprint import base_fingerprint  # noqa: E402
from pmss_dist.hf.load import read_model_spec  # noqa: E402
from pmss_dist.models import build_decoder, model_spec  # noqa: E402

QKV = {"q_proj": (0, 32), "k_proj": (32, 48), "v_proj": (48, 64)}
GATE_UP = {"gate_proj": (0, 45), "up_proj": (45, 90)}
# Each HF module the adapters target, with its projections' rows (o_proj and down_proj are unfused).
MODULES = {"self_attn.qkv_proj": QKV, "mlp.gate_up_proj": GATE_UP, "self_attn.o_proj": {"o_proj": (0, 32)},
           "mlp.down_proj": {"down_proj": (0, 32)}}
# The torchtune layer of each HF projection name.
TUNE = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "o_proj": "attn.output_proj",
        "gate_proj": "mlp.w1", "up_proj": "mlp.w3", "down_proj": "mlp.w2"}
PARTIAL = ("q_proj", "v_proj", "o_proj", "up_proj")  # k and gate left out
K = 4


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory):
    """A sharded phi3 base; PMSS and LoRA adapters on every projection and PMSS on ``PARTIAL``,
    each trained a little, with its merged export and our model's logits."""
    root = tmp_path_factory.mktemp("phi_run")
    base = root / "base"
    make_hf_checkpoint(base, "phi3", max_shard_size="20KB")
    out = {"base": base}
    for name, kind, targets in (("pmss", "pmss", None), ("lora", "lora", None), ("partial", "pmss", PARTIAL)):
        extra = {} if targets is None else {"targets": targets}
        model = trained_adapter(our_model(base), kind, size=K, alpha=8.0, seed=11, **extra)
        save_adapter(model, root / name, {"kind": kind, "rank": K, "alpha": 8.0, "targets": list(targets or []),
                                          "method": "random", "base_model": str(base),
                                          "base_fingerprint": base_fingerprint(base)})
        export_merged(root / name, base, root / f"{name}-merged", progress=False)
        out[name], out[f"{name}_merged"] = root / name, root / f"{name}-merged"
        out[f"{name}_logits"] = logits_of(model, tokens())
    return out


def test_partial_targets_change_only_their_rows(phi_run):
    base, merged = hf_tensors(phi_run["base"]), hf_tensors(phi_run["partial_merged"])
    assert set(base) == set(merged)
    changed = {"q_proj", "v_proj", "up_proj"}
    for layer in range(TINY["num_hidden_layers"]):
        for module, blocks in (("self_attn.qkv_proj", QKV), ("mlp.gate_up_proj", GATE_UP)):
            key = f"model.layers.{layer}.{module}.weight"
            for proj, (start, stop) in blocks.items():
                same = torch.equal(base[key][start:stop].view(torch.uint8), merged[key][start:stop].view(torch.uint8))
                assert same == (proj not in changed), f"{key} rows {start}:{stop} ({proj})"
        key = f"model.layers.{layer}.mlp.down_proj.weight"  # not targeted at all
        assert torch.equal(base[key], merged[key])
    assert_close_to_scale(transformers_logits(phi_run["partial_merged"], tokens()), phi_run["partial_logits"], 3e-5)


@pytest.mark.parametrize("name", ["pmss", "lora", "partial"])
def test_peft_export_stacks_the_parts(phi_run, tmp_path, name):
    """lora_A = the parts' A (PMSS: R = W_part[I, :]) stacked; lora_B = the parts' s·B (PMSS:
    s·W_part[:, J]·U) block-diagonal, zero rows for a part not adapted; every module padded with
    zero rows of lora_A and zero columns of lora_B to one rank r, qkv_proj's (the largest), with
    lora_alpha = r and no patterns; B·A = merged − base."""
    export_peft(phi_run[name], phi_run["base"], tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    lora = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    adapter = load_file(str(phi_run[name] / "adapter.safetensors"))
    base, merged = hf_tensors(phi_run["base"]), hf_tensors(phi_run[f"{name}_merged"])
    r, modules = {"pmss": (3 * K, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
                  "lora": (3 * K, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
                  "partial": (2 * K, ["gate_up_proj", "o_proj", "qkv_proj"])}[name]  # partial: q, v of qkv
    got = (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"], config["target_modules"])
    assert got == (r, r, {}, {}, modules)
    targets = PARTIAL if name == "partial" else tuple(TUNE)
    scale = 8.0 / K  # the adapters' alpha / k, in lora_B: PEFT's own scale is 1
    for layer in range(TINY["num_hidden_layers"]):
        for module, blocks in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            adapted = [proj for proj in blocks if proj in targets]
            if not adapted:
                assert f"{key}.lora_A.weight" not in lora
                continue
            a, b = lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"]
            weight = base[f"model.layers.{layer}.{module}.weight"]
            assert a.shape == (r, weight.shape[1]) and b.shape == (weight.shape[0], r)
            col = 0
            for proj, (start, stop) in blocks.items():
                if proj not in adapted:
                    assert not b[start:stop].any(), f"{key}: rows of {proj}, which is not adapted"
                    continue
                t = {attr: adapter[f"layers.{layer}.{TUNE[proj]}.{attr}"] for attr in
                     (("core", "row_idx", "col_idx") if name != "lora" else ("lora_a", "lora_b"))}
                if name == "lora":
                    want_a, want_b = t["lora_a"], scale * t["lora_b"]
                else:
                    part = weight[start:stop]
                    want_a, want_b = part[t["row_idx"]], scale * part[:, t["col_idx"]] @ t["core"]
                torch.testing.assert_close(a[col:col + K], want_a, rtol=0, atol=0)
                torch.testing.assert_close(b[start:stop, col:col + K], want_b, rtol=1e-6, atol=1e-7)
                off = torch.ones(b.shape[1], dtype=torch.bool)
                off[col:col + K] = False
                assert not b[start:stop, off].any(), f"{key}: {proj} rows outside its own columns"
                col += K
            assert not a[col:].any() and not b[:, col:].any(), f"{key}: padding past rank {col} is not zero"
            delta = merged[f"model.layers.{layer}.{module}.weight"] - weight
            torch.testing.assert_close(b @ a, delta, rtol=1e-4, atol=1e-6, msg=key)


def test_index_outside_its_block_is_refused(phi_run, tmp_path):
    """Row 20 exists in qkv_proj (64 rows) but not in k_proj's block (rows 32:48, 16 rows)."""
    import shutil

    from pmss_dist.hf.export import ExportError

    adapter = tmp_path / "adapter"
    shutil.copytree(phi_run["pmss"], adapter)
    state = load_file(str(adapter / "adapter.safetensors"))
    state["layers.0.attn.k_proj.row_idx"] = state["layers.0.attn.k_proj.row_idx"].clone().fill_(20)
    save_file(state, str(adapter / "adapter.safetensors"))
    for export in (export_merged, export_peft):
        with pytest.raises(ExportError, match=r"adapter layer layers.0.attn.k_proj .* does not fit "
                                              r"model.layers.0.self_attn.qkv_proj.weight rows 32:48 \(16, 32\)"):
            export(adapter, phi_run["base"], tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_stock_peft_loads_and_merges_to_our_export(stock_peft, phi_run, tmp_path):
    args = ["--base", phi_run["base"], "--atol", "1e-4"]
    for name in ("pmss", "lora", "partial"):
        export_peft(phi_run[name], phi_run["base"], tmp_path / name)
        expected = tmp_path / f"{name}.safetensors"
        save_file({"tokens": tokens(), "logits": phi_run[f"{name}_logits"].contiguous()}, str(expected))
        args += ["--adapter", str(tmp_path / name), "--expected", str(expected),
                 "--merged", str(phi_run[f"{name}_merged"])]
    status, output = stock_peft(args)
    assert status == 0, output
    assert output.count("ok: ") == 3


# ---- import: two ranks, each reading only its own rows of the fused tensors ------------------

def _two_rank_worker(rank: int, port: int, ckpt_dir: str, expected_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import pmss_dist.hf.load as load
    from pmss_dist.models import init_rope_caches
    from pmss_dist.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    reads: dict[str, list[tuple[int, int]]] = {}

    class Slice:  # records the rows read from each tensor
        def __init__(self, key, inner):
            self.key, self.inner = key, inner

        def get_shape(self):
            return self.inner.get_shape()

        def get_dtype(self):
            return self.inner.get_dtype()

        def __getitem__(self, rows):
            reads.setdefault(self.key, []).append((rows.start, rows.stop))
            return self.inner[rows]

    class Handle:
        def __init__(self, inner):
            self.inner = inner

        def get_slice(self, key):
            return Slice(key, self.inner.get_slice(key))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    opener = load.open_safetensors
    load.open_safetensors = lambda path: Handle(opener(path))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        spec = read_model_spec(ckpt_dir)
        with torch.device("meta"):
            model = build_decoder(spec)
        model.requires_grad_(False)
        parallelize(model, init_device_mesh("cpu", (2,)), param_dtype=torch.float32, compile=False,
                    activation_checkpointing="none", reshard_after_forward=True)
        model.to_empty(device="cpu")
        init_rope_caches(model, torch.device("cpu"))
        load.load_hf_weights(model, ckpt_dir, spec)

        # Independent reference: torchtune's own Phi-3 conversion of the whole state dict.
        reference = phi3_hf_to_tune(hf_tensors(Path(ckpt_dir)), num_heads=4, num_kv_heads=2, dim=32)
        params = dict(model.named_parameters())
        assert set(params) == set(reference)
        for name, p in params.items():
            torch.testing.assert_close(p.to_local(), torch.chunk(reference[name], 2)[rank], rtol=0, atol=0, msg=name)
        # The rows this rank read of each fused tensor are exactly those of its shards: q 0:32 is
        # split 0:16 / 16:32, k 32:48 into 32:40 / 40:48, ...
        for layer in range(2):
            for module, blocks in (("self_attn.qkv_proj", QKV), ("mlp.gate_up_proj", GATE_UP)):
                key = f"model.layers.{layer}.{module}.weight"
                want = []
                for start, stop in blocks.values():
                    half = -(-(stop - start) // 2)
                    want.append((start, start + half) if rank == 0 else (start + half, stop))
                assert sorted(reads[key]) == want, (key, reads[key])
        expected = load_file(expected_file)
        with torch.no_grad():
            torch.testing.assert_close(model(expected["tokens"]), expected["logits"], rtol=1e-5, atol=1e-5)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_read_their_rows_of_the_fused_tensors(tmp_path):
    hf_model = make_hf_checkpoint(tmp_path / "base", "phi3", max_shard_size="20KB")
    expected = tmp_path / "expected.safetensors"
    with torch.no_grad():
        save_file({"tokens": tokens(), "logits": hf_model(tokens()).logits.contiguous()}, str(expected))
    mp.start_processes(_two_rank_worker, args=(free_port(), str(tmp_path / "base"), str(expected)), nprocs=2,
                       join=True, start_method="fork")


def test_hf_to_dcp_splits_the_fused_tensors(tmp_path):
    import torch.distributed.checkpoint as dcp

    from pmss_dist.hf.load import hf_to_dcp

    make_hf_checkpoint(tmp_path / "base", "phi3", max_shard_size="20KB")
    hf_to_dcp(tmp_path / "base", tmp_path / "dcp", progress=False)
    reference = phi3_hf_to_tune(hf_tensors(tmp_path / "base"), num_heads=4, num_kv_heads=2, dim=32)
    assert set(dcp.FileSystemReader(str(tmp_path / "dcp")).read_metadata().state_dict_metadata) == set(reference)
    state = {name: torch.empty_like(value) for name, value in reference.items()}
    dcp.load(state, checkpoint_id=tmp_path / "dcp", no_dist=True)
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


# ---- full fine-tuning: the trained q/k/v and gate/up fused back -----------------------------

@pytest.mark.slow
def test_full_finetune_export_fuses_the_trained_weights(tmp_path):
    import torch.distributed.checkpoint as dcp

    from test_families import _byte_tokenized_checkpoint

    base, run = tmp_path / "base", tmp_path / "run"
    _byte_tokenized_checkpoint(base, "phi3")
    run_job(2, [*FAST, "max_steps=2", "adapter.kind=full", "optim.lr=1e-3", f"model.path={base}",
                f"output_dir={run}", "checkpoint.every_steps=0"])
    model = build_decoder(read_model_spec(base))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=run / "checkpoints" / "step_000002", no_dist=True)
    trained = {k.removeprefix("model."): v for k, v in state.items()}
    exported, before = hf_tensors(run / "merged"), hf_tensors(base)
    # torchtune's own Phi-3 conversion (it concatenates q, k, v and gate, up) is the reference.
    reference = phi3_tune_to_hf(trained)
    assert set(exported) == set(reference) == set(before)
    for key, value in exported.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
        assert not torch.equal(value, before[key]), f"{key} did not train"
    model.load_state_dict(trained)
    toks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_close_to_scale(transformers_logits(run / "merged", toks), logits_of(model.eval(), toks), 1e-5)


# ---- configs --------------------------------------------------------------------------------

@pytest.mark.parametrize("rope_type", ["longrope", "su"])
def test_transformers_4_config_is_read_alike(tmp_path, rope_type):
    """A Phi-3 config.json as transformers 4.x wrote it (top-level rope_theta and
    partial_rotary_factor, ``rope_scaling`` with ``type``; "su" is LongRoPE's old name) is the same
    model; transformers 5 reads it too (for "su" only with the original length inside the scaling)."""
    make_hf_checkpoint(tmp_path, "phi4-mini")
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config.update(rope_theta=params["rope_theta"], partial_rotary_factor=params["partial_rotary_factor"],
                  rope_scaling={"type": rope_type, "short_factor": params["short_factor"],
                                "long_factor": params["long_factor"], "original_max_position_embeddings": 16})
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = our_model(tmp_path)
    for length in (11, TINY["max_position_embeddings"]):  # short, then past the original 16 tokens
        toks = torch.randint(0, TINY["vocab_size"], (2, length), generator=torch.Generator().manual_seed(length))
        assert_close_to_scale(logits_of(ours, toks), transformers_logits(tmp_path, toks), 1e-5)


@pytest.mark.parametrize("family", ["phi3", "phi4-mini"])
def test_kv_cache_decoding_matches_transformers_cache(tmp_path, family):
    """Decoding with a KV cache (a 5-token prefill, then one token per step, to 40 tokens) gives
    transformers' logits decoding with its own cache: the 4-token window of ``phi3`` and, for
    ``phi4-mini``, LongRoPE switching to its long factors at the step that passes 16 positions
    (keys already cached keep their short-factor rotation, in transformers as here)."""
    import transformers
    from torchtune.modules.common_utils import local_kv_cache

    hf_model = make_hf_checkpoint(tmp_path, family)
    model, total = our_model(tmp_path), 40
    toks = torch.randint(0, TINY["vocab_size"], (1, total), generator=torch.Generator().manual_seed(3))
    steps = [(0, 5), *((t, t + 1) for t in range(5, total))]
    mask, positions = torch.ones(total, total, dtype=torch.bool).tril()[None], torch.arange(total)[None]
    with torch.no_grad():
        cache = transformers.DynamicCache(config=hf_model.config)
        theirs = torch.cat([hf_model(toks[:, a:b], cache=cache, use_cache=True).logits for a, b in steps], 1)
        with local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32,
                            decoder_max_seq_len=total):
            ours = torch.cat([model(toks[:, a:b], mask=mask[:, a:b], input_pos=positions[:, a:b]) for a, b in steps], 1)
    assert_close_to_scale(ours, theirs, 1e-5)


@pytest.mark.parametrize("edit,message", [
    (lambda c: {**c, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     r"rope_scaling type 'dynamic' is not supported for Phi3ForCausalLM \(supported: \['longrope', 'su'\]\)"),
    (lambda c: {**c, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4}},
     r"rope_scaling of type 'longrope' lacks \['long_factor'\]"),
    (lambda c: {**c, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}},
     "rope_scaling short_factor has 3 entries, the rotary dimension 8 needs 4"),
    (lambda c: {**c, "head_dim": 16}, "head_dim=16 differs from hidden_size/num_attention_heads"),
], ids=["dynamic", "no-long-factor", "factor-length", "head-dim"])
def test_refusals_before_any_work(edit, message):
    config = {"architectures": ["Phi3ForCausalLM"], **TINY}
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        build_decoder(model_spec(edit(config)))


def test_config_contradicting_the_fused_weights_names_its_fields(tmp_path):
    make_hf_checkpoint(tmp_path, "phi3")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match=r"qkv_proj.weight has shape \(64, 32\), but config.json's "
                                         r"num_attention_heads=4, .*num_key_value_heads=4 give \(96, 32\) for "
                                         r"layers.0.attn.q_proj.weight, layers.0.attn.k_proj.weight"):
        our_model(tmp_path)


def test_phi4_config_k_is_peft_lora_r8_budget():
    """configs/phi4.yaml's PMSS k (per projection, q,k,v,gate,up apart) trains as many parameters as
    PEFT's LoRA r=8 on Phi-4's HF modules (qkv_proj, o_proj, gate_up_proj, down_proj), counted on
    transformers' own Phi3ForCausalLM of Phi-4's shape, to the nearest whole k."""
    import transformers

    from pmss_dist.adapters.layers import AdapterSpec, apply_adapters
    from pmss_dist.config import load_config

    cfg = load_config(REPO / "configs" / "phi4.yaml")
    config = transformers.Phi3Config(vocab_size=100352, hidden_size=5120, intermediate_size=17920,
                                     num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                                     max_position_embeddings=16384, pad_token_id=None)
    with torch.device("meta"):
        hf_model = transformers.Phi3ForCausalLM(config)
    lora = sum(8 * (m.in_features + m.out_features) for name, m in hf_model.named_modules()
               if name.rpartition(".")[2] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    spec = model_spec({**config.to_dict(), "architectures": ["Phi3ForCausalLM"]})

    def pmss(k: int) -> int:
        with torch.device("meta"):
            model = build_decoder(spec)
        return apply_adapters(model, AdapterSpec("pmss", tuple(cfg.adapter.targets), k, float(k)))["trainable"]

    k = cfg.adapter.rank
    gaps = {size: abs(pmss(size) - lora) for size in (k - 1, k, k + 1)}
    assert min(gaps, key=gaps.get) == k and gaps[k] < 0.005 * lora, (gaps, lora)

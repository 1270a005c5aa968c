"""pmss-plan as a user meets it: bad input fails before any work with the numbers named; the plan
of a one-process run reports the parameter bytes the config's model has; a 405B config on 1024
ranks finishes on this machine; a deep model's step extrapolated from two shallow ones equals the
step at its own depth. The measured comparison with real runs is in test_validation.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from conftest import REPO, TINY_CONFIG
from pmss_dist.adapters.quantize import nf4_scaler_block
from pmss_dist.cli.plan import main
from pmss_dist.config import ConfigError, ParallelConfig, check_world_size, load_config
from pmss_dist.models import model_spec
from pmss_dist.models.builtin import TINY_CONFIG as TINY_MODEL
from pmss_dist.parallel.mesh import ParallelDims
from pmss_dist.plan.comms import Collective, step_volume
from pmss_dist.plan.fake import fake_world
from pmss_dist.plan.planner import SAMPLED_DEPTHS, Setting, _Context, _sampled_depths, valid_dp_shards
from pmss_dist.plan.probe import StepProfile
from pmss_dist.plan.timing import Cluster
from pmss_dist.plan.shapes import KNOWN_CONFIGS

CONFIG_405B = REPO / "configs" / "llama3_1_405b.yaml"


def llama_parameters(c: dict) -> int:
    """Parameters of a Llama decoder, counted from its config.json by hand (untied output)."""
    d, f, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    return layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * v * d + d


@pytest.mark.parametrize("world,gpus_per_node", [(16, 8), (12, 4), (8, 8), (6, 2)])
def test_the_candidate_meshes_are_those_the_trainer_accepts(world, gpus_per_node):
    def accepted(shard: int) -> bool:
        try:
            ParallelDims.resolve(ParallelConfig(dp_shard=shard), world, gpus_per_node, 1, 2**40)
            return True
        except ConfigError:
            return False

    assert valid_dp_shards(world, gpus_per_node) == [s for s in range(1, world + 1) if accepted(s)]


def test_wire_bytes_follow_the_ring_and_hierarchical_algorithms():
    one_node = tuple(range(8))
    assert Collective("all_gather", 800, one_node).wire_bytes(8) == (700, 0)  # the 7 other eighths
    assert Collective("reduce_scatter", 800, one_node).wire_bytes(8) == (700, 0)
    assert Collective("all_reduce", 800, one_node).wire_bytes(8) == (1400, 0)  # reduce-scatter + all-gather
    assert Collective("all_reduce", 800, (0,)).wire_bytes(8) == (0, 0)
    # one GPU on each of 4 nodes: a ring between nodes
    assert Collective("all_reduce", 800, (0, 8, 16, 24)).wire_bytes(8) == (0, 1200)
    # 4 nodes of 8: each node takes in the other 3 nodes' quarter over its 8 NICs
    assert Collective("all_gather", 3200, tuple(range(32))).wire_bytes(8) == (2800, 3200 * 3 / 4 / 8)
    assert not Collective("all_gather", 8, (0, 1, 2, 3)).crosses_nodes(4)
    assert Collective("all_reduce", 8, (0, 4)).crosses_nodes(4)


@pytest.mark.parametrize("args,needle", [
    (["--gpus-per-node", "3"], "data.batch_size=32 is not divisible by data.micro_batch_size (8) x world size (3)"),
    (["--nodes", "0"], "--nodes must be positive, got 0"),
    (["--gpu-memory-gib", "-80"], "--gpu-memory-gib must be positive, got -80.0"),
    (["--mfu", "1.5"], "--mfu is a fraction of the peak, at most 1, got 1.5"),
    (["--nodes", "129", "--gpus-per-node", "8", "data.batch_size=8256", "data.micro_batch_size=8"],
     "--nodes 129 x --gpus-per-node 8 = 1032 ranks; the planner goes up to 1024"),
    (["--gpus-per-node", "8", "data.batch_size=64", "parallel.dp_shard=3"],
     "parallel.dp_shard=3 does not divide the world size 8"),
    (["--gpus-per-node", "4", "parallel.dp_shard=4", "parallel.dp_replicate=2"],
     "parallel.dp_replicate (2) x parallel.dp_shard (4) = 8, but the world size is 4"),
    (["model.path=/nowhere/My-Model"], "model.path=/nowhere/My-Model: no config.json there and 'My-Model' is not a known"),
    (["--hf-config", "/nowhere/config.json"], "--hf-config /nowhere/config.json: no such file"),
    (["adapter.rank=0"], "adapter.rank must be positive, got 0"),
])
def test_bad_input_fails_before_any_work_with_the_numbers(capsys, args, needle):
    assert main(["--config", str(TINY_CONFIG), "--quiet", *args]) == 2
    assert needle in capsys.readouterr().err


def test_one_process_plan_reports_the_models_bytes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--config", str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gib", "1",
                 "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    plan = json.loads(out.read_text())
    k, layers = 32, TINY_MODEL["num_hidden_layers"]  # configs/tiny.yaml: PMSS k=32 on all 7 projections, fp32
    rows = [r for r in plan["rows"] if r["source"] == "measured"]
    assert [r["setting"]["activation_checkpointing"] for r in rows] == ["none", "selective", "full"]
    for r in rows:
        assert r["frozen_bytes"] == 4 * llama_parameters(TINY_MODEL)
        assert r["trained_bytes"] == 4 * 7 * layers * k * k == r["grad_bytes"]
        assert r["optimizer_bytes"] >= 2 * r["trained_bytes"]  # AdamW's two moments (and its step counters)
        assert r["peak_bytes"] >= r["frozen_bytes"] + r["trained_bytes"] + r["optimizer_bytes"]
    full, none = rows[2], rows[0]
    assert full["activation_bytes"] < none["activation_bytes"]  # full AC keeps only each block's input
    assert plan["recommended"]["setting"] == {"dp_shard": 1, "reshard_after_forward": None,
                                              "activation_checkpointing": "none"}
    assert "set parallel.dp_shard=1 parallel.activation_checkpointing=none" in text


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_plan_counts_a_quantized_base_as_stored(tmp_path, capsys, fmt):
    out = tmp_path / "plan.json"
    assert main(["--config", str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gib", "1",
                 "--quiet", "--json", str(out), f"model.quantize={fmt}"]) == 0
    plan = json.loads(out.read_text())
    # By hand: the seven projections of each block stored quantized, everything else fp32.
    c = TINY_MODEL
    d, f, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * 2
    projections = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]  # (d_out, d_in)
    stored = 0
    for d_out, d_in in projections:
        n = d_out * d_in
        if fmt == "nf4":  # 4-bit codes, an int8 scale per 64, an fp32 factor per scaler block, 2 constants
            stored += n // 2 + n // 64 + 4 * (n // 64 // nf4_scaler_block((d_out, d_in))) + 4 + 4 * 16
        else:  # int8 codes and an fp32 scale per row
            stored += n + 4 * d_out
    dense = sum(a * b for a, b in projections)
    expected = 4 * (llama_parameters(c) - c["num_hidden_layers"] * dense) + c["num_hidden_layers"] * stored
    for r in plan["rows"]:
        assert r["frozen_bytes"] == expected
        # the fake step's tracker counts them as stored too (not as the dense size an NF4 weight's
        # wrapper reports): at the peak, the parameters are the frozen and the trained bytes
        assert r["peak_breakdown"]["Parameter"] == expected + r["trained_bytes"]


def test_a_mesh_nf4_cannot_split_is_not_planned_and_refused_when_the_config_asks_for_it(tmp_path, capsys):
    # The tiny model's 128x128 projections are one NF4 double-quantization block (16384 weights),
    # so NF4 cannot split them over 2 ranks: a 2-GPU plan has the replicated base only, and says why.
    out = tmp_path / "plan.json"
    args = ["--config", str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib", "1"]
    why = "model.quantize=nf4: layer layers.0.attn.q_proj (128x128) cannot be split over dp_shard=2"
    assert main([*args, "--json", str(out), "model.quantize=nf4", "parallel.dp_shard=1"]) == 0
    plan = json.loads(out.read_text())
    assert {r["setting"]["dp_shard"] for r in plan["rows"]} == {1}
    assert plan["main_dp_shard"] == 1 and list(plan["unsplittable"]) == ["2"]
    assert f"not planned: dp_shard=2, {why}" in capsys.readouterr().out
    # the config's own mesh: refused before any work, as the trainer's build refuses it
    assert main([*args, "--quiet", "model.quantize=nf4", "parallel.dp_shard=2"]) == 2
    assert why in capsys.readouterr().err


@pytest.mark.slow
def test_405b_on_1024_ranks_finishes_here(tmp_path):
    """A smoke test: its time budget is its timeout. One micro-batch of one sequence per rank."""
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "pmss_dist.cli.plan", "--config", str(CONFIG_405B), "--nodes", "128",
                           "--gpus-per-node", "8", "data.batch_size=1024", "--quiet", "--json", str(out)],
                          capture_output=True, text=True, timeout=3600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert plan["cluster"]["nodes"] * plan["cluster"]["gpus_per_node"] == 1024
    assert plan["sampled_depths"] == list(SAMPLED_DEPTHS)  # 126 alike blocks: stepped at two small depths
    shape = KNOWN_CONFIGS["Llama-3.1-405B"]
    frozen = 2 * llama_parameters(shape)  # bf16
    measured = [r for r in plan["rows"] if r["source"] == "measured"]
    # 3 AC modes, blocks resharded after forward, on the config's own mesh; keeping every block
    # gathered (810 GB) is ruled out without a step
    assert sorted(r["setting"]["activation_checkpointing"] for r in measured) == ["full", "none", "selective"]
    for r in plan["rows"]:
        if r["setting"]["reshard_after_forward"] is False:
            assert not r["fits"] and r["peak_bytes"] >= frozen
    for r in measured:
        shard = r["setting"]["dp_shard"]
        assert frozen / shard <= r["frozen_bytes"] <= frozen / shard * 1.01  # its shard, up to FSDP's padding
        assert r["trained_bytes"] == 4 * 7 * shape["num_hidden_layers"] * 594 ** 2  # the cores, fp32, replicated
        # the cores' gradients cross nodes once per step: their all-reduce over all 1024 ranks
        assert r["payload_bytes"]["all_reduce/inter"] >= r["trained_bytes"]
    assert plan["recommendation"]


# -- depth sampling: a deep model's fake step from two shallow ones (planner.SAMPLED_DEPTHS)

DEEP = 11  # deeper than the two sampled depths together, odd: the middle blocks do not pair up
SMALL_STEP = ["data.seq_len=64", "data.micro_batch_size=2", "data.batch_size=32"]


def gemma2_config(window: int) -> dict:
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e .[test])")
    return transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, num_hidden_layers=DEEP,
                                     sliding_window=window, architectures=["Gemma2ForCausalLM"]).to_dict()


def steps_at_both_depths(hf_config: dict, overrides: list[str], setting: Setting) -> tuple[StepProfile, StepProfile]:
    """(the step extrapolated from SAMPLED_DEPTHS, the step at the model's own depth) on 2 nodes of 4."""
    cfg = load_config(TINY_CONFIG, [*SMALL_STEP, *overrides])
    cluster = Cluster(nodes=2, gpus_per_node=4, gpu_memory_gib=1, peak_tflops=100, intra_gbps=100, inter_gbps=10,
                      mfu=0.5, headroom=0.1)
    with fake_world(cluster.world_size):
        spec = model_spec(hf_config)
        ctx = _Context(cfg, spec, cluster, check_world_size(cfg, cluster.world_size))
        ctx.depths = SAMPLED_DEPTHS
        sampled = ctx.probe(setting)
        assert ctx.depths == SAMPLED_DEPTHS  # extrapolated, not fallen back to the full depth
        return sampled, ctx._probe(setting, spec)


@pytest.mark.slow
@pytest.mark.parametrize("model,overrides,setting", [
    # LoRA under full AC: the shallow steps peak in the loss head, the deep one in the backward
    ("llama", ["adapter.kind=lora"], Setting(4, True, "full")),
    ("llama", [], Setting(4, False, "selective")),  # every block kept gathered from forward to backward
    ("llama", ["adapter.kind=full"], Setting(4, True, "none")),  # HSDP: 2 copies of 4 shards
    ("llama", ["data.packed=true"], Setting(1, None, "none")),  # a replicated base, no FSDP
    ("gemma2", [], Setting(8, True, "selective")),  # windows as long as the sequence: layers alike
])
def test_a_deep_step_extrapolated_from_two_shallow_ones_equals_it(model, overrides, setting):
    hf_config = {**TINY_MODEL, "num_hidden_layers": DEEP} if model == "llama" else gemma2_config(window=64)
    sampled, full = steps_at_both_depths(hf_config, overrides, setting)
    for f in fields(StepProfile):
        value = getattr(full, f.name)
        if isinstance(value, (int, float)):
            assert getattr(sampled, f.name) == pytest.approx(value, rel=1e-12), f.name
    assert (sampled.peak_bytes, sampled.peak_breakdown) == (full.peak_bytes, full.peak_breakdown)
    volumes = [step_volume(p.micro_collectives, p.step_collectives, 2, 4) for p in (sampled, full)]
    assert volumes[0].payload.keys() == volumes[1].payload.keys()
    for key, payload in volumes[1].payload.items():
        assert math.isclose(volumes[0].payload[key], payload, rel_tol=1e-12), key
    assert sum(volumes[1].payload.values()) > 0


def test_layers_with_a_window_shorter_than_the_sequence_are_planned_at_full_depth():
    for window, sampled in ((64, SAMPLED_DEPTHS), (16, None)):  # data.seq_len=64 below
        assert _sampled_depths(DEEP, model_spec(gemma2_config(window)).windows, seq_len=64) == sampled
    assert _sampled_depths(sum(SAMPLED_DEPTHS), [None] * sum(SAMPLED_DEPTHS), seq_len=64) is None  # no time saved


def test_a_dpo_step_is_planned_with_its_reference_forward_and_no_reference_copy(tmp_path):
    # A dpo micro-batch of 4 pairs is 8 rows: the step of an sft micro-batch of 8 rows, plus a
    # forward of those rows with the adapters off. Independent reference for that forward: torch's
    # FLOP counter on a real (unsharded) model.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pmss_dist.adapters.layers import adapters_off
    from pmss_dist.build import build_model
    from pmss_dist.config import adapter_spec

    cluster = Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=1, peak_tflops=100, intra_gbps=100, inter_gbps=10,
                      mfu=0.5, headroom=0.1)
    profiles = {}
    for name, overrides in (("sft", ["data.micro_batch_size=8", "data.batch_size=8"]),
                            ("dpo", ["objective.kind=dpo", "data.micro_batch_size=4", "data.batch_size=4"]),
                            ("dpo-precomputed", ["objective.kind=dpo", "data.micro_batch_size=4", "data.batch_size=4",
                                                 "objective.precompute_reference=true"])):
        cfg = load_config(TINY_CONFIG, ["data.seq_len=64", *overrides])
        with fake_world(1):
            ctx = _Context(cfg, model_spec(TINY_MODEL), cluster, check_world_size(cfg, 1))
            profiles[name] = ctx._probe(Setting(1, None, "none"), model_spec(TINY_MODEL))
    model = build_model(model_spec(TINY_MODEL), adapter=adapter_spec(cfg), mesh=None, device=torch.device("cpu"),
                        dtype=torch.bfloat16, max_seq_len=64)
    with torch.no_grad(), adapters_off(model), FlopCounterMode(display=False) as counter:
        model(torch.zeros(8, 64, dtype=torch.long))
    sft, dpo = profiles["sft"], profiles["dpo"]
    assert dpo.flops - sft.flops == counter.get_total_flops() > 0
    assert dpo.frozen_bytes == sft.frozen_bytes  # one base: the reference is that base, adapters off
    # The reference forward's activations are freed before the policy's forward: what stays is its
    # log-probabilities, one number per row.
    assert 0 <= dpo.peak_bytes - sft.peak_bytes <= 8 * 8
    # With the reference scores precomputed, the step is the sft step on the same rows.
    precomputed = profiles["dpo-precomputed"]
    assert precomputed.flops == sft.flops
    assert abs(precomputed.peak_bytes - sft.peak_bytes) <= 8 * 8

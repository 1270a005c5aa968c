"""The planner against measurement (issue 18, point 3): for the tiny and the ~100M models on 2
processes and on 4 as a 2x2 mesh (2 "nodes" of 2), what `pmss-plan` predicts per rank — parameter
bytes, AdamW state bytes, activation bytes — and per step — bytes all-gathered and all-reduced,
within and between nodes — against what the real trainer allocates and moves on gloo: torch's
memory tracker around a real step, and every call of the torch.distributed collectives counted
(tests/plan/real_step_worker.py). All within 10%.

The planner never sees the real run: it builds the model on fake devices from the config alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, run_job
from pmss_dist.config import load_config
from pmss_dist.models.builtin import write_tiny_checkpoint
from pmss_dist.plan.planner import Setting, plan
from pmss_dist.plan.shapes import resolve_model_spec
from pmss_dist.plan.timing import Cluster

sys.path.insert(0, str(REPO / "bench"))
from benchlib import MODELS  # noqa: E402  (the ~100M shape, kept in one place for every benchmark)

WORKER = REPO / "tests" / "plan" / "real_step_worker.py"
TOLERANCE = 0.10

# model, processes per "node", nodes, AC mode, reshard after forward, micro-batch, accumulation steps
CASES = [
    ("tiny", 2, 1, "none", True, 8, 2),
    ("tiny", 2, 1, "full", False, 8, 1),
    ("tiny", 2, 2, "selective", True, 4, 2),
    ("100m", 2, 1, "none", False, 2, 1),
    ("100m", 2, 2, "full", True, 1, 2),
]


def overrides(model_path: str, out: Path, world: int, ac: str, reshard: bool, micro: int, accum: int) -> list[str]:
    seq_len = 32 if model_path == "builtin:tiny" else 64
    return [f"output_dir={out}", f"model.path={model_path}", "model.dtype=float32", "adapter.kind=pmss",
            "adapter.rank=8", "adapter.alpha=8", "adapter.method=random", "data.num_samples=256",
            f"data.seq_len={seq_len}", f"data.micro_batch_size={micro}", f"data.batch_size={micro * world * accum}",
            "data.eval_every=0", "parallel.compile=false", f"parallel.activation_checkpointing={ac}",
            f"parallel.reshard_after_forward={str(reshard).lower()}", "parallel.dp_shard=2", "max_steps=5",
            "export_merged=false", "checkpoint.resume=none", "log.log_every=1"]


def close(predicted: float, measured: float, what: str) -> None:
    assert measured > 0, f"{what}: nothing measured"
    error = abs(predicted - measured) / measured
    print(f"  {what}: predicted {predicted:,.0f}, measured {measured:,.0f} ({(predicted - measured) / measured:+.2%})")
    assert error <= TOLERANCE, f"{what}: predicted {predicted:,.0f}, measured {measured:,.0f} ({error:.1%} off)"


def collective_bytes(calls: list, kind: str, gpus_per_node: int) -> dict[str, float]:
    """A rank's measured calls of ``kind`` as payload bytes within and between nodes."""
    out = {"intra": 0.0, "inter": 0.0}
    for call_kind, payload, ranks in calls:
        if call_kind == kind:
            out["inter" if len({r // gpus_per_node for r in ranks}) > 1 else "intra"] += payload
    return out


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"tiny": "builtin:tiny", "100m": str(write_tiny_checkpoint(root / "100m", seed=0, **MODELS["100m"]))}


@pytest.mark.slow
@pytest.mark.parametrize("model,gpus_per_node,nodes,ac,reshard,micro,accum", CASES,
                         ids=[f"{c[0]}-{c[2]}x{c[1]}-{c[3]}-{'reshard' if c[4] else 'keep'}-accum{c[6]}" for c in CASES])
def test_planner_predicts_what_the_real_run_allocates_and_moves(model_paths, tmp_path, model, gpus_per_node, nodes,
                                                               ac, reshard, micro, accum):
    world = nodes * gpus_per_node
    keys = overrides(model_paths[model], tmp_path / "run", world, ac, reshard, micro, accum)
    run_job(world, keys, script=WORKER, timeout=900)
    measured = json.loads((tmp_path / "run" / "measured_rank0.json").read_text())
    assert measured["grad_accum"] == accum

    cfg = load_config(TINY_CONFIG, keys)
    spec, source = resolve_model_spec(cfg.model.path)
    cluster = Cluster(nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gib=80, peak_tflops=100, intra_gbps=100,
                      inter_gbps=10)
    result = plan(cfg, spec, cluster, model_name=model, model_source=source)
    row = result.row(Setting(2, reshard, ac))
    assert row is not None and row.source == "measured", row

    close(row.frozen + row.trained, measured["frozen_bytes"] + measured["trained_bytes"], "parameter bytes")
    close(row.optimizer, measured["optimizer_bytes"], "AdamW state bytes")
    close(row.activations, measured["activation_bytes"], f"activation bytes (AC {ac})")
    # Not asserted (the issue asks for parameters, optimizer, activations and collectives), shown:
    # the peak, against the real tracker's (which does not follow the replicated cores)
    real_peak = measured["tracker_peak_bytes"] + measured["trained_bytes"]
    print(f"  peak (not asserted): predicted {row.peak:,}, measured {real_peak:,} "
          f"({(row.peak - real_peak) / real_peak:+.2%})")
    for kind in ("all_gather", "all_reduce"):
        real = collective_bytes(measured["collectives"], kind, gpus_per_node)
        for link in ("intra", "inter"):
            predicted = row.volume.total("payload", link, kind)
            if real[link] == 0:
                assert predicted == 0, f"{kind} {link}: predicted {predicted:,.0f} bytes, none moved"
            else:
                close(predicted, real[link], f"{kind} bytes {link}-node per step")

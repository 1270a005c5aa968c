"""A torchrun worker for the planner's validation: the real trainer (`train.trainer.setup` and
`train_step`, gloo, real weights and data) measured on one steady-state step, to compare with what
`pmss-plan` predicts for the same config.

Per rank it writes ``measured_rank<N>.json`` into the run's output directory:

- parameter bytes this rank holds (frozen shards, trained tensors) and the optimizer's state bytes,
  read off the live model and optimizer after the step;
- activation bytes: torch's memory tracker (`FSDPMemTracker`: the base must be sharded, torch's
  `MemTracker` for a whole model refuses frozen parameters) around the step, its "Activation"
  bytes at the end of the first micro-batch's forward (a forward hook on the model), less the
  model's output (the logits, which the planner reports apart);
- the step's collectives: every call of the torch.distributed collectives FSDP2 and the trainer
  use (all_gather_single, reduce_scatter_single, all_reduce, ...), counted by wrapping those
  public functions in this process only (`bench/benchlib.CollectiveCounter`), with the bytes of
  their tensors and the ranks of their group, from the start to the end of the measured
  `train_step` call.

    torchrun --nproc_per_node 4 tests/plan/real_step_worker.py --config configs/tiny.yaml key=value ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from pmss_dist.config import load_config
from pmss_dist.parallel.env import init_distributed, shutdown
from pmss_dist.train.trainer import setup, train_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from benchlib import CollectiveCounter  # noqa: E402  (the benchmarks' counter, one copy)

MEASURED_STEP = 3  # steps 1-2 create the optimizer state and warm up; step 3 is measured


def named(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot keyed by category names ("Activation", "Total", ...)."""
    return {getattr(k, "value", k): v for k, v in snapshot.items()}


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor's local shard), each storage once."""
    storages = {}
    for t in tensors:
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        storages.setdefault(storage.data_ptr(), storage)
    return sum(s.nbytes() for s in storages.values())


def main() -> None:
    args = sys.argv[1:]
    cfg = load_config(args[args.index("--config") + 1], [a for a in args if "=" in a])
    counter = CollectiveCounter().install()
    env = init_distributed()
    run = setup(cfg, env)
    for _ in range(MEASURED_STEP - 1):
        train_step(run, 0).work.wait()
    if not isinstance(run.model, FSDPModule):
        raise SystemExit("real_step_worker measures sharded bases (parallel.dp_shard > 1) only")
    tracker = FSDPMemTracker(run.model, run.optimizer)
    forward_end: dict = {}

    def hook(module, inputs, output):
        if not forward_end:  # the first micro-batch of the step
            snapshot = named(tracker.get_tracker_snapshot()[env.device])
            forward_end.update(activation=snapshot.get("Activation", 0), output=output.numel() * output.element_size())

    def next_micro_batch(module, inputs):
        if forward_end:  # FSDPMemTracker takes one forward per iteration: keep its peak, drop the rest
            tracker.reset_mod_stats()

    handle = run.model.register_forward_hook(hook)
    first = len(counter.calls)
    with tracker:
        pre_handle = run.model.register_forward_pre_hook(next_micro_batch, prepend=True)  # before the tracker's
        train_step(run, 0).work.wait()
    calls = counter.calls[first:]
    handle.remove()
    pre_handle.remove()
    peak = named(tracker.get_tracker_snapshot("peak")[env.device])
    params = [p for p in run.model.parameters()]
    record = {
        "rank": env.rank, "world_size": env.world_size, "grad_accum": run.grad_accum,
        "frozen_bytes": local_bytes(p for p in params if not p.requires_grad),
        "trained_bytes": local_bytes(p for p in params if p.requires_grad),
        "optimizer_bytes": local_bytes(t for s in run.optimizer.state.values() for t in s.values()
                                       if isinstance(t, torch.Tensor)),
        "activation_bytes": forward_end["activation"] - forward_end["output"],
        "tracker_peak_bytes": peak["Total"],
        "tracker_peak_breakdown": {k: v for k, v in peak.items() if v},
        "collectives": calls,
    }
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / f"measured_rank{env.rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main()

"""A torchrun worker for tests: trains like launch/train.py, then records what each rank holds
(trainable tensors, frozen shard bytes, whether frozen shards changed) in rank<N>.safetensors.

Fault injection for tests only: PMSS_TEST_HANG_SAVE_AT_STEP=N makes the save of step N hang after
its files are written and before it is published, so a test can kill the job mid-save."""

import os
import sys
import time

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from pmss_dist.adapters.layers import plain_name
from pmss_dist.adapters.quantize import stored_tensors, tensor_bytes
from pmss_dist.config import load_config
from pmss_dist.parallel.env import init_distributed, shutdown
from pmss_dist.train.trainer import StopRequest, fit, release_output_dir, setup


def local(p: torch.Tensor) -> torch.Tensor:
    return (p.to_local() if isinstance(p, DTensor) else p).detach()


def stored(p: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a rank stores a frozen parameter in (a quantized one's codes and scales)."""
    return stored_tensors(local(p))


def _hang_save_at(step: int) -> None:
    from pmss_dist.train import checkpoint

    publish = checkpoint.CheckpointManager.publish

    def hanging_publish(self, partial, final, record, *args, **kwargs):
        if record.step == step:
            print(f"hanging in save of step {step}", file=sys.stderr, flush=True)
            time.sleep(600)
        publish(self, partial, final, record, *args, **kwargs)

    checkpoint.CheckpointManager.publish = hanging_publish


def main() -> None:
    if "PMSS_TEST_HANG_SAVE_AT_STEP" in os.environ:
        _hang_save_at(int(os.environ["PMSS_TEST_HANG_SAVE_AT_STEP"]))
    args = sys.argv[1:]
    config = args[args.index("--config") + 1]
    overrides = [a for a in args if "=" in a]
    cfg = load_config(config, overrides)
    env = init_distributed()
    run = setup(cfg, env)
    frozen_before = {n: [t.clone() for t in stored(p)] for n, p in run.model.named_parameters() if not p.requires_grad}
    fit(run, StopRequest())
    tensors, frozen_bytes, frozen_changed = {}, 0, 0
    for name, p in run.model.named_parameters():
        if p.requires_grad:
            tensors[plain_name(name)] = local(p).contiguous()
        else:
            frozen_bytes += tensor_bytes(local(p))
            frozen_changed += int(not all(map(torch.equal, stored(p), frozen_before[name])))
    save_file(tensors, f"{cfg.output_dir}/rank{env.rank}.safetensors",
              metadata={"frozen_bytes": str(frozen_bytes), "frozen_changed": str(frozen_changed)})
    release_output_dir(cfg, env)
    del run  # shutdown frees the process groups, which the model's FSDP state holds too
    shutdown()


if __name__ == "__main__":
    main()

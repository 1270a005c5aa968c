"""One torchrun worker of our real trainer (``launch/train.py``), plus what the benchmarks need
from it: step times and the rank's peak RSS (``BENCH_RECORD_DIR``, see benchlib.record_worker),
and the *frozen-only* baseline (``BENCH_FROZEN_ONLY=1``).

Frozen-only is the trainer's own step on the same model with no adapters: every weight frozen
and a single trainable scalar gain (initialised to 1) on the token-embedding output, so the loss
back-propagates through every block down to the embeddings. Its backward is the input-gradient
GEMMs of the frozen base (no weight gradients), which is the floor any PEFT method pays; a PEFT
step's extra cost over it is the adapters' own work. (With adapters, block 0's input needs no
gradient, so frozen-only does slightly more work there than PMSS or LoRA: one block's input-gradient
GEMMs.) Activation checkpointing is applied only to blocks holding trainable parameters, so
frozen-only runs without it whatever the config says: its AC-on rows are the AC-off baseline.

``BENCH_PROFILE=first:count`` profiles optimizer steps first..first+count-1 on rank 0
(op_timer.StepProfiler).

    torchrun --nproc_per_node 2 bench/trainer_worker.py --config configs/tiny.yaml key=value ...
"""

from __future__ import annotations

import os
import runpy
import sys

import torch
from torch import nn

import pmss_dist.build as build
import pmss_dist.train.trainer as trainer
from benchlib import REPO, record_worker
from op_timer import StepProfiler


GAIN = "input_gain"


def _install_frozen_only() -> None:
    import pmss_dist.hf.load as hf_checkpoint
    from pmss_dist.adapters.layers import count_parameters

    original_reset = build.reset_adapters
    original_base_parameters = hf_checkpoint.base_parameters

    def freeze_all(model: nn.Module, spec) -> dict[str, int]:
        del spec  # no adapters at all
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.tok_embeddings
        setattr(emb, GAIN, nn.Parameter(torch.ones((), device=emb.weight.device)))
        emb.register_forward_hook(lambda module, args, out: out * getattr(module, GAIN))
        return count_parameters(model)

    def reset(model: nn.Module, seed: int) -> None:
        original_reset(model, seed)
        with torch.no_grad():
            getattr(model.tok_embeddings, GAIN).fill_(1.0)  # to_empty left it uninitialised

    def base_parameters(model: nn.Module):  # the gain is not in the checkpoint: not a base weight
        return {n: p for n, p in original_base_parameters(model).items() if not n.endswith(GAIN)}

    build.apply_adapters = freeze_all
    build.reset_adapters = reset
    hf_checkpoint.base_parameters = base_parameters


def _install_step_profiler(profiler) -> None:
    """Wrap the trainer's step in ``profiler`` (op_timer.StepProfiler)."""
    original_step = trainer.train_step

    def profiled_step(run, *args):
        with profiler.step(run.env.rank):
            return original_step(run, *args)

    trainer.train_step = profiled_step


def main() -> None:
    record_dir = os.environ["BENCH_RECORD_DIR"]
    record_worker(record_dir)
    if os.environ.get("BENCH_FROZEN_ONLY") == "1":
        _install_frozen_only()
    profiler = StepProfiler.from_env()
    if profiler.enabled:
        _install_step_profiler(profiler)
    sys.argv = [str(REPO / "launch" / "train.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

"""Run the trainer (``fit``) under torchrun and record, per optimizer step, every all-reduce
(size) and every host read of a tensor (``item``, ``tolist``, ``float``, ``int``, ``bool``) with
the function that made it, from one step's start to the next's; rank 0 writes them to ``<output_dir>/step_counts.json``.

    torchrun --nproc_per_node 2 tests/train/step_counts_worker.py --config configs/tiny.yaml KEY=VALUE...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pmss_dist.config import load_config
from pmss_dist.parallel.env import init_distributed
from pmss_dist.train import trainer

steps: list[dict] = []


def counting(name: str, original, what: str):
    def wrapper(*args, **kwargs):
        if steps:
            if what == "host_reads":  # who read it: the calling function and its file
                caller = sys._getframe(1)
                steps[-1][what].append(f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}:{name}")
            else:
                steps[-1][what].append(int(args[0].numel()))
        return original(*args, **kwargs)
    return wrapper


def main() -> None:
    args = sys.argv[1:]
    cfg = load_config(args[args.index("--config") + 1], [a for a in args if "=" in a])
    dist.all_reduce = counting("all_reduce", dist.all_reduce, "all_reduces")
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name), "host_reads"))
    step = trainer.train_step

    def marked(run, signum):
        steps.append({"step": run.sampler.step + 1, "all_reduces": [], "host_reads": []})
        return step(run, signum)

    trainer.train_step = marked
    env = init_distributed()
    run = trainer.setup(cfg, env)
    trainer.fit(run, trainer.StopRequest())
    if env.rank == 0:
        Path(cfg.output_dir, "step_counts.json").write_text(json.dumps(steps))
    trainer.shutdown()


if __name__ == "__main__":
    main()

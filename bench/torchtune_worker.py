"""One torchrun worker of torchtune 0.6.1's ``lora_finetune_distributed`` recipe, run unmodified
from site-packages (``runpy``) after the few CPU shims it needs are applied at run time:

- the recipe calls ``init_process_group("cuda:nccl,cpu:gloo")``, which fails on a CPU-only torch
  (no NCCL built in): the backend string becomes ``gloo`` when there is no GPU;
- it calls ``training.get_memory_stats`` after building the model, unconditionally, and that
  raises on CPU: on CPU it returns the process's peak RSS instead (logged only);
- ``training.cleanup_before_training`` empties the accelerator cache: on CPU only ``gc.collect``.

Nothing else of the recipe changes. Step times and peak RSS per rank are recorded by
``benchlib.record_worker`` (``BENCH_RECORD_DIR``).

    torchrun --nproc_per_node 2 bench/torchtune_worker.py --config run.yaml
"""

from __future__ import annotations

import gc
import os
import resource
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchtune.training as training  # before record_worker: "after import" means the same for every trainer

from benchlib import record_worker

RECIPE = "lora_finetune_distributed.py"


def recipe_path() -> Path:
    import torchtune

    path = Path(torchtune.__file__).resolve().parents[1] / "recipes" / RECIPE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: torchtune 0.6.1 installs its recipes beside the package")
    return path


def install_cpu_shims() -> None:
    if torch.cuda.is_available():
        return
    init_process_group = dist.init_process_group

    def gloo_init_process_group(backend=None, *args, **kwargs):
        if backend == "cuda:nccl,cpu:gloo":
            backend = "gloo"
        return init_process_group(backend, *args, **kwargs)

    def cpu_memory_stats(device, reset_stats: bool = True) -> dict:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"peak_memory_active": peak_gib, "peak_memory_alloc": peak_gib, "peak_memory_reserved": peak_gib}

    dist.init_process_group = gloo_init_process_group  # the recipe imports it from torch.distributed
    training.get_memory_stats = cpu_memory_stats
    training.cleanup_before_training = gc.collect


def main() -> None:
    record_worker(os.environ["BENCH_RECORD_DIR"])
    install_cpu_shims()
    sys.argv = [str(recipe_path()), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

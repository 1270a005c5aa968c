"""Helpers of the CUDA tests (``pytest -m cuda``; run on a GPU node by tools/gpu_check.sh).

Every test here is marked ``cuda`` and skips, with its reason, where torch sees no CUDA device.
Development aid: ``PMSS_CUDA_TESTS_ON_CPU=1`` runs them on the CPU instead (the "CUDA" side then
runs on CPU too, in the same dtype and compile settings), which checks their logic and
tolerances on a machine without a GPU; it proves nothing about CUDA.

No ``conftest.py`` here on purpose: tests/conftest.py is imported as ``conftest`` by the other
test folders, and a second one would shadow it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
ON_CPU = os.environ.get("PMSS_CUDA_TESTS_ON_CPU") == "1"

cuda_only = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU),
                       reason="needs a CUDA device (tools/gpu_check.sh runs these on a GPU node)"),
]

# The device the "CUDA" side of a test runs on.
DEVICE = torch.device("cuda") if torch.cuda.is_available() and not ON_CPU else torch.device("cpu")

# A short run of the built-in task (the tiny model: 4 blocks, dim 128): 10 optimizer steps of 16
# sequences in 4 micro-batches, a checkpoint every 5, an eval pass at the end.
SHORT = ["max_steps=10", "log.log_every=5", "data.num_samples=256", "data.batch_size=16",
         "data.micro_batch_size=4", "adapter.rank=8", "adapter.alpha=8.0", "checkpoint.every_steps=5",
         "checkpoint.keep_last=3"]


def job_env(on_cuda: bool) -> dict:
    """The environment of a training subprocess: on the CPU, CUDA is hidden from it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    if not on_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def start_run(output_dir: Path, overrides: list[str], on_cuda: bool, log: Path) -> subprocess.Popen:
    """``python launch/train.py`` (a world of one: NCCL on CUDA, gloo on CPU) in the background."""
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY_CONFIG), *SHORT, *overrides, f"output_dir={output_dir}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env=job_env(on_cuda), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """Wait for a run; fail with its log's tail if it failed. Returns the log. A run is never left
    behind: on a timeout, or when pytest itself is interrupted (gpu_check.sh's time limit), it is
    killed."""
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException as err:
        proc.kill()
        proc.wait()
        if isinstance(err, subprocess.TimeoutExpired):
            raise AssertionError(f"run timed out after {timeout} s; log {log}:\n{log.read_text()[-3000:]}") from err
        raise
    text = log.read_text()
    assert rc == 0, f"run failed ({rc}); log {log}:\n{text[-4000:]}"
    return text


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())

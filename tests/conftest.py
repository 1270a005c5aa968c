"""Shared helpers: launching real torchrun jobs of the trainer on CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# Small enough to run many times in CI: 8 steps of the built-in task, fp32 for exact parity.
FAST = ["max_steps=8", "log.log_every=4", "data.num_samples=256", "data.batch_size=16",
        "data.micro_batch_size=4", "adapter.rank=8", "adapter.alpha=8.0", "model.dtype=float32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *target) -> list[str]:
    """torchrun on ``target``: a script path (default launch/train.py), or ``"-m", module``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, target or (TRAIN,))]


def job_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def job_cmd(nproc: int, overrides: list[str], script: Path = TRAIN) -> list[str]:
    return torchrun_cmd(nproc, script) + ["--config", str(TINY_CONFIG), *overrides]


def run_job(nproc: int, overrides: list[str], script: Path = TRAIN, timeout: float = 300,
            check: bool = True, **env: str) -> subprocess.CompletedProcess:
    cmd = job_cmd(nproc, overrides, script)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env(**env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_direct(overrides: list[str], timeout: float = 300, config: Path = TINY_CONFIG,
               **env: str) -> subprocess.CompletedProcess:
    """launch/train.py in one process without torchrun (a world of one): its exit code and stderr
    are the trainer's own, not torchrun's summary of them."""
    cmd = [sys.executable, str(TRAIN), "--config", str(config), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env(**env), cwd=REPO)


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())


PROBE = REPO / "tests" / "dist_probe.py"


def probe(nproc: int, out: Path, *extra: str, overrides: list[str] = FAST) -> dict:
    """Train like launch/train.py through tests/dist_probe.py, which records what each rank holds:
    ``{"summary": summary.json, "ranks": [{"tensors": trainable tensors, "meta": frozen bytes ...}]}``."""
    from safetensors import safe_open

    run_job(nproc, [*overrides, f"output_dir={out}", *extra], script=PROBE)
    ranks = []
    for r in range(nproc):
        with safe_open(str(out / f"rank{r}.safetensors"), "pt") as f:
            ranks.append({"tensors": {k: f.get_tensor(k) for k in f.keys()}, "meta": f.metadata()})
    return {"summary": summary(out), "ranks": ranks}


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")

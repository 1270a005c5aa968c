"""Shared helpers: real runs of the trainer on CPU (torchrun jobs on gloo, and one-process runs),
stock peft's checks, and the runs that several test files assert things about."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# Small enough to run many times in CI: 8 steps of the built-in task, fp32 for exact parity.
FAST = ["max_steps=8", "log.log_every=4", "data.num_samples=256", "data.batch_size=16",
        "data.micro_batch_size=4", "adapter.rank=8", "adapter.alpha=8.0", "model.dtype=float32"]
# Full fine-tuning at FAST's size, with the step-4 checkpoint the resume tests start from.
FULL = [*FAST, "adapter.kind=full", "optim.lr=1e-3", "checkpoint.every_steps=4"]


# The user cache (fingerprints, skeleton selections): the tests never touch ~/.cache/pmss_dist, and
# every job gets an empty one of its own unless a test passes PMSS_CACHE_DIR, so that no run reuses
# what another test's run cached.
CACHE_ROOT = Path(tempfile.mkdtemp(prefix="pmss-test-cache-"))
os.environ["PMSS_CACHE_DIR"] = str(CACHE_ROOT / "session")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *target) -> list[str]:
    """torchrun on ``target``: a script path (default launch/train.py), or ``"-m", module``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, target or (TRAIN,))]


def job_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PMSS_CACHE_DIR": tempfile.mkdtemp(dir=CACHE_ROOT), **extra}


def job_cmd(nproc: int, overrides: list[str], script: Path = TRAIN) -> list[str]:
    return torchrun_cmd(nproc, script) + ["--config", str(TINY_CONFIG), *overrides]


def run_job(nproc: int, overrides: list[str], script: Path = TRAIN, timeout: float = 300,
            check: bool = True, **env: str) -> subprocess.CompletedProcess:
    cmd = job_cmd(nproc, overrides, script)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env(**env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


class ForkServer:
    """tests/train_forkserver.py: ``python SCRIPT ARGS`` as a child forked after the trainer's
    imports, which are most of what a short or refused run costs. Started on first use, stopped
    at the end of the session (``pytest_sessionfinish``)."""

    SCRIPT = REPO / "tests" / "train_forkserver.py"
    running: ForkServer | None = None

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(self.SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=job_env(), cwd=REPO)
        self.unread = b""

    @classmethod
    def get(cls) -> ForkServer:
        if cls.running is None or cls.running.proc.poll() is not None:
            cls.running = cls()
        return cls.running

    def answer(self, cmd: list[str], timeout: float | None = None) -> dict:
        while b"\n" not in self.unread:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(cmd, timeout)
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"{self.SCRIPT.name} ended (exit status {self.proc.wait()}); its stderr is above")
            self.unread += chunk
        line, self.unread = self.unread.split(b"\n", 1)
        return json.loads(line)

    def run(self, cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        """``subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)``
        for ``cmd = [sys.executable, SCRIPT, *args]``."""
        with tempfile.TemporaryDirectory() as tmp:
            stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"script": cmd[1], "args": cmd[2:], "env": env, "cwd": str(REPO), "stdout": str(stdout),
                       "stderr": str(stderr)}
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self.answer(cmd)["pid"]
            try:
                returncode = self.answer(cmd, timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self.answer(cmd)
                raise subprocess.TimeoutExpired(cmd, timeout, stdout.read_text(), stderr.read_text()) from None
            return subprocess.CompletedProcess(cmd, returncode, stdout.read_text(), stderr.read_text())

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def pytest_sessionfinish(session, exitstatus):
    if ForkServer.running is not None:
        ForkServer.running.stop()
    shutil.rmtree(CACHE_ROOT, ignore_errors=True)


def run_direct(overrides: list[str], timeout: float = 300, config: Path = TINY_CONFIG, check: bool = False,
               **env: str) -> subprocess.CompletedProcess:
    """launch/train.py in one process without torchrun (a world of one): its exit code and stderr
    are the trainer's own, not torchrun's summary of them. The process is forked by ForkServer
    after the trainer's imports, which it would otherwise make afresh each time."""
    cmd = [sys.executable, str(TRAIN), "--config", str(config), *overrides]
    proc = ForkServer.get().run(cmd, job_env(**env), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())


def children(pid: int) -> list[int]:
    """The child processes of `pid` (torchrun's: its workers), from /proc."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict; empty once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def signal_in(mask: str, signum: int) -> bool:
    """Whether a /proc/PID/status signal mask (SigCgt, SigPnd, ...) holds `signum`."""
    return bool(int(mask, 16) & (1 << (signum - 1)))


def catches_stop_signals(pid: int) -> bool:
    """Whether the trainer's StopRequest is installed in `pid`: a SIGTERM or SIGUSR1 sent now ends
    the run with a save at its next step, never kills it."""
    caught = proc_status(pid).get("SigCgt", "0")
    return signal_in(caught, signal.SIGTERM) and signal_in(caught, signal.SIGUSR1)


PROBE = REPO / "tests" / "dist_probe.py"


def probe(nproc: int, out: Path, *extra: str, overrides: list[str] = FAST) -> dict:
    """Train like launch/train.py through tests/dist_probe.py, which records what each rank holds:
    ``{"out": out, "summary": summary.json, "ranks": [{"tensors": trainable tensors, "meta": frozen bytes ...}]}``."""
    from safetensors import safe_open

    run_job(nproc, [*overrides, f"output_dir={out}", *extra], script=PROBE)
    ranks = []
    for r in range(nproc):
        with safe_open(str(out / f"rank{r}.safetensors"), "pt") as f:
            ranks.append({"tensors": {k: f.get_tensor(k) for k in f.keys()}, "meta": f.metadata()})
    return {"out": out, "summary": summary(out), "ranks": ranks}


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def stock_peft():
    """tests/peft_check.py in the PMSS_PEFT_PYTHON venv: ``stock_peft(args) -> (exit status,
    output)`` for its command-line ``args``. One server process runs every check of the session,
    so torch, transformers and peft start up once."""
    python = os.environ.get("PMSS_PEFT_PYTHON")
    if not python:
        pytest.skip("PMSS_PEFT_PYTHON is unset: it names a venv's python with torch, transformers, peft and "
                    "safetensors but no torchao (peft refuses torchtune's torchao); tools/run_tests.sh creates it")
    server = subprocess.Popen([python, str(REPO / "tests" / "peft_check.py"), "--serve"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def check(args: list, timeout: float = 300) -> tuple[int, str]:
        server.stdin.write(json.dumps([str(a) for a in args]) + "\n")
        server.stdin.flush()
        if not select.select([server.stdout], [], [], timeout)[0]:
            raise AssertionError(f"peft_check.py gave no answer in {timeout} s")
        line = server.stdout.readline()
        if not line:
            raise AssertionError(f"peft_check.py ended (exit status {server.wait()}); its stderr is above")
        answer = json.loads(line)
        return answer["status"], answer["output"]

    yield check
    server.stdin.close()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:  # still in a check that timed out
        server.kill()
        server.wait()


# -- runs that several test files assert different things about: made once per session, by the
# first test that needs one (each torchrun job costs every rank a start-up of torch and torchtune)


@pytest.fixture(scope="session")
def one_process_probe(session_tmp) -> dict:
    """FAST on one process (four micro-batches of accumulation): the reference every multi-process
    layout must match (tests/train/test_distributed_training.py, tests/parallel/test_mesh.py)."""
    return probe(1, session_tmp / "single")


@pytest.fixture(scope="session")
def four_rank_probe(session_tmp) -> dict:
    """FAST on 4 ranks of one node, two micro-batches of accumulation each. parallel.dp_shard=auto
    shards the base over the node's 4 ranks: the 1x4 mesh."""
    return probe(4, session_tmp / "four-ranks", "data.micro_batch_size=2")


@pytest.fixture(scope="session")
def full_one_process(session_tmp) -> Path:
    """FULL on one process: the full fine-tuning reference (tests/train/test_full_finetune.py,
    tests/parallel/test_mesh.py)."""
    out = session_tmp / "full-n1"
    run_direct([*FULL, f"output_dir={out}"], check=True)
    return out

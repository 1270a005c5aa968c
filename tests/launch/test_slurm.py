"""Multi-node and SLURM launch (launch/slurm/), checked against a single-node 2-process run.

- Two torchrun "nodes" on one machine (--nnodes 2, one c10d rendezvous) train exactly as one
  node with two processes.
- On a real single-node SLURM (tests/slurm_harness.py; installed with apt when missing and we
  are root, else these tests SKIP and say why), the real sbatch scripts:
  train_torchrun.sbatch gets the save-and-requeue signal mid-run (``scancel --batch
  --signal=USR1``, as ``--signal=B:USR1@120`` sends it before the time limit), saves, requeues
  itself and resumes to the same losses, and the export (pmss-export), submitted as a
  job depending on it (afterok), runs after the final attempt; train_srun.sbatch (one srun
  task per rank, no torchrun) is preempted by a job of a higher-priority partition, saves,
  requeues and resumes to the same losses. While SLURM signals them the trainers are held
  (SIGSTOP until the signal is pending), so it lands in their start-up or first step however
  fast the steps run.
- The requeue decision of launch/slurm/job_state.py, case by case (no SLURM needed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import (FAST, REPO, TINY_CONFIG, TRAIN, catches_stop_signals, free_port, job_env, proc_status,
                      run_job, signal_in, summary)
from slurm_harness import SlurmCluster, SlurmUnavailable, ensure_installed

pytestmark = pytest.mark.slow  # a real SLURM

SLURM_DIR = REPO / "launch" / "slurm"
TORCHRUN_SBATCH = SLURM_DIR / "train_torchrun.sbatch"
SRUN_SBATCH = SLURM_DIR / "train_srun.sbatch"
JOB_STATE = SLURM_DIR / "job_state.py"
MAX_STEPS = 16
# A stop signal acted on at the next step (log_every=1), a checkpoint every 4.
RUN = [*FAST, f"max_steps={MAX_STEPS}", "log.log_every=1", "checkpoint.every_steps=4"]
JOB_TIMEOUT_S = 300


def assert_same_losses(run_summary: dict, reference: dict) -> None:
    assert run_summary["completed"] and run_summary["steps"] == MAX_STEPS, run_summary
    assert run_summary["world_size"] == reference["world_size"] == 2
    torch.testing.assert_close(torch.tensor(run_summary["losses"]), torch.tensor(reference["losses"]),
                               rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One node, two processes, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    run_job(2, [*RUN, f"output_dir={out}"])
    result = summary(out)
    assert result["losses"][-1] < result["losses"][0]
    return result


def test_scripts_are_valid_bash():
    for script in (TORCHRUN_SBATCH, SRUN_SBATCH, SLURM_DIR / "torchrun_node.sh", SLURM_DIR / "job_lib.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_two_torchrun_node_groups_match_one_node(reference, tmp_path):
    """What srun does on two nodes: one torchrun per node, one c10d rendezvous endpoint."""
    out, port = tmp_path / "run", free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "--rdzv-conf", f"is_host={str(node_rank == 0).lower()}",  # node 0 hosts the store
               str(TRAIN), "--config", str(TINY_CONFIG), *RUN, f"output_dir={out}"]
        log = open(tmp_path / f"node{node_rank}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env(), cwd=REPO))
        log.close()
    try:
        for node_rank, proc in enumerate(procs):
            assert proc.wait(timeout=JOB_TIMEOUT_S) == 0, (tmp_path / f"node{node_rank}.log").read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_same_losses(summary(out), reference)


# -- the requeue decision -----------------------------------------------------------------

@pytest.fixture(scope="module")
def job_state():
    """launch/slurm/job_state.py as a module: its command line called in this process, where the
    script's own start-up (it imports the trainer's torch) would cost each case seconds."""
    spec = importlib.util.spec_from_file_location("job_state", JOB_STATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def should_requeue(job_state, run_dir: Path, since: float, *flags: str) -> bool:
    status = job_state.main(["should-requeue", str(run_dir), "--since", str(since), *flags])
    assert status in (0, 1)
    return status == 0


@pytest.mark.parametrize("written,flags,expected", [
    ({"completed": True, "stopped_by_signal": None}, [], False),
    ({"completed": True, "stopped_by_signal": None}, ["--stop-requested", "--preempted"], False),  # done
    ({"completed": False, "stopped_by_signal": "SIGUSR1"}, [], True),  # scancel --signal=USR1
    ({"completed": False, "stopped_by_signal": "SIGUSR1"}, ["--stop-requested"], True),  # time-limit warning
    ({"completed": False, "stopped_by_signal": "SIGTERM"}, [], False),  # scancel / time limit
    ({"completed": False, "stopped_by_signal": "SIGTERM"}, ["--preempted"], True),
    (None, [], False),  # crashed before writing a summary: requeueing would only repeat it
    (None, ["--preempted"], True),  # killed by the preemption before saving: resume the last one
    (None, ["--stop-requested"], True),  # the warning came while the trainers were starting up
    ("stale-SIGUSR1", [], False),  # a summary from an earlier attempt does not count
], ids=["completed", "completed-flags", "usr1", "usr1-requested", "term", "term-preempted", "none",
        "none-preempted", "none-requested", "stale"])
def test_requeue_decision(job_state, tmp_path, written, flags, expected):
    start = time.time()
    if written == "stale-SIGUSR1":
        path = tmp_path / "summary.json"
        path.write_text(json.dumps({"completed": False, "stopped_by_signal": "SIGUSR1", "steps": 3}))
        os.utime(path, (start - 60, start - 60))
    elif written is not None:
        (tmp_path / "summary.json").write_text(json.dumps({**written, "steps": 3, "final_loss": 1.0}))
    assert should_requeue(job_state, tmp_path, start, *flags) is expected


# -- a real SLURM ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        cluster.start()  # stops whatever it started if it fails
    except SlurmUnavailable as err:
        pytest.skip(f"SLURM tests SKIPPED, the sbatch scripts were not run: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


def submit(slurm: SlurmCluster, script: Path, sbatch_options: list[str], out: Path, log: Path, **env) -> int:
    # PYTHON: the job must use this interpreter (its venv), whatever `python` is on PATH.
    # MASTER_PORT: a free one; the job-id-derived default could collide with a second test run's
    # private cluster on this machine, whose job ids also start at 1.
    return slurm.sbatch([*sbatch_options, f"--output={log}", script, "--config", TINY_CONFIG, *RUN,
                         f"output_dir={out}"], cwd=REPO,
                        env={**job_env(), "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), **env})


def trainer_pids(out: Path) -> list[int]:
    """The training processes writing to `out` that catch the stop signals (the trainer's
    StopRequest is installed): Python running launch/train.py, not the srun, torchrun or
    batch-shell processes whose command lines name it too."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, or not a process directory
            continue
        if not (Path(argv[0]).name.startswith("python") and f"output_dir={out}" in argv
                and any(arg.endswith("launch/train.py") for arg in argv)
                and not any(arg == "torch.distributed.run" or arg.endswith("torchrun") for arg in argv)):
            continue
        if catches_stop_signals(int(proc.name)):
            pids.append(int(proc.name))
    return pids


@contextmanager
def trainers_held(out: Path, nproc: int, signum: int, slurm: SlurmCluster, job: int, timeout_s: float = 180):
    """Once every trainer catches the stop signals, stop them (SIGSTOP) while the block makes
    SLURM signal them, and let them go on once `signum` is pending in every one (or SLURM
    continued them itself). The signal then lands at a known point, however fast the run's
    steps are: during start-up or the first step, so the trainers act on it after step 1 (or 2,
    had step 1 begun)."""
    deadline = time.monotonic() + timeout_s
    while len(pids := trainer_pids(out)) < nproc:
        state = slurm.job_fields(job).get("JobState")
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"job {job} ({state}): {len(pids)} of {nproc} trainers started\n{slurm.logs()}"
        time.sleep(0.05)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
        while any((status := proc_status(pid)) and status["State"].startswith("T")
                  and not signal_in(status["SigPnd"], signum) and not signal_in(status["ShdPnd"], signum)
                  for pid in pids):
            assert time.monotonic() < deadline, f"{signal.Signals(signum).name} never reached trainers {pids}"
            time.sleep(0.05)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def assert_resumed_to_completion(slurm, job: int, log: Path, out: Path, reference: dict, stop_line: str) -> None:
    fields = slurm.wait_for_job(job, JOB_TIMEOUT_S)
    text = log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{text[-6000:]}"
    assert fields["Restarts"] == "1", fields
    stopped = re.search(stop_line, text)
    assert stopped, text[-6000:]
    step = int(stopped.group(1))
    assert 1 <= step < MAX_STEPS
    assert f"job {job} attempt 2 " in text
    assert f"resumed from {out}/checkpoints/step_{step:06d} at step {step}" in text, text[-6000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS:06d}"
    assert_same_losses(summary(out), reference)


def test_torchrun_sbatch_saves_on_usr1_requeues_and_resumes(slurm, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = submit(slurm, TORCHRUN_SBATCH, ["--gpus-per-node=0"], out, log, PMSS_NPROC_PER_NODE="2")
    # The export as docs/SLURM.md submits it: a job that depends on the training job (afterok).
    export_dir, export_log = tmp_path / "export", tmp_path / "export.log"
    export_cmd = [sys.executable, "-m", "pmss_dist.cli.export", "--run", str(out), "--out", str(export_dir)]
    export = slurm.sbatch([f"--dependency=afterok:{job}", f"--output={export_log}",
                           "--wrap", shlex.join(export_cmd)], cwd=REPO)
    with trainers_held(out, 2, signal.SIGUSR1, slurm, job):
        # What `#SBATCH --signal=B:USR1@120` does before the time limit: SIGUSR1 to the batch shell.
        slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    assert_resumed_to_completion(slurm, job, log, out, reference,
                                 r"requeueing: save-and-requeue requested, stopped after saving step (\d+)")
    export_state = slurm.wait_for_job(export, 120)["JobState"]
    assert export_state == "COMPLETED", export_log.read_text()[-4000:]
    # It waited for the final attempt, not the first one (which also wrote an adapter when it stopped).
    exported = sorted(export_dir.glob("*.safetensors"))
    assert exported and (export_dir / "config.json").is_file()
    assert min(p.stat().st_mtime for p in exported) >= (out / "summary.json").stat().st_mtime


def test_srun_sbatch_preempted_requeues_and_resumes(slurm, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = submit(slurm, SRUN_SBATCH, ["--gpus-per-node=0", "--ntasks=2", "--ntasks-per-node=2",
                                      "--cpus-per-task=1"], out, log)
    # The training job holds the whole node; a job of the higher-priority partition preempts it
    # (SIGTERM to the job's processes; GraceTime leaves them time to save).
    urgent_log = tmp_path / "urgent.log"
    with trainers_held(out, 2, signal.SIGTERM, slurm, job):
        urgent = slurm.sbatch(["--partition=urgent", "--exclusive", f"--output={urgent_log}",
                               "--wrap", "echo urgent job ran"], cwd=tmp_path)
    assert_resumed_to_completion(slurm, job, log, out, reference,
                                 r"requeueing: preempted, stopped after saving step (\d+)")
    assert slurm.wait_for_job(urgent, 30)["JobState"] == "COMPLETED"
    assert "urgent job ran" in urgent_log.read_text()

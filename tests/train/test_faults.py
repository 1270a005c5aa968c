"""Nothing saved is lost: SIGKILL mid-training and mid-save, SIGTERM, resume on another world size,
corrupted checkpoints, NaN loss. Every resumed run must reproduce the uninterrupted one."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, catches_stop_signals, children, job_cmd, job_env, run_direct, run_job, summary

pytestmark = pytest.mark.slow  # torchrun jobs, killed and resumed

PROBE = REPO / "tests" / "dist_probe.py"
# keep_last=4: the fallback test damages the newest three checkpoints and resumes from the fourth.
LONG = [*FAST, "max_steps=40", "checkpoint.every_steps=5", "checkpoint.keep_last=4", "log.log_every=5"]


def latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().split("_")[1]) if latest.is_file() else 0


def wait_for(predicate, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the job")


def cores(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def assert_same_run(out: Path, reference: Path, tol=1e-6):
    torch.testing.assert_close(torch.tensor(summary(out)["losses"]), torch.tensor(summary(reference)["losses"]),
                               rtol=tol, atol=tol)
    ref = cores(reference)
    for name, value in cores(out).items():
        torch.testing.assert_close(value, ref[name], rtol=tol * 10, atol=tol)


@pytest.fixture(scope="module")
def uninterrupted(session_tmp) -> Path:
    out = session_tmp / "faults-ref"
    run_job(2, [*LONG, f"output_dir={out}"])
    assert summary(out)["steps"] == 40
    return out


def _killed_then_resumed(out: Path, when, victim, **env) -> subprocess.CompletedProcess:
    job = subprocess.Popen(job_cmd(2, [*LONG, f"output_dir={out}"], PROBE), env=job_env(**env), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: when(out) or job.poll() is not None)
        assert job.poll() is None, f"job ended before the fault:\n{job.stderr.read()[-3000:]}"
        os.kill(victim(job.pid), signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert not (out / "summary.json").exists()
    return run_job(2, [*LONG, f"output_dir={out}"])


def test_sigkill_mid_training_resumes_to_the_same_result(uninterrupted, session_tmp):
    out = session_tmp / "kill-train"
    resumed = _killed_then_resumed(out, lambda o: latest_step(o) >= 10, lambda pid: children(pid)[-1])
    assert "resumed from" in resumed.stderr
    assert_same_run(out, uninterrupted)


def test_sigkill_mid_save_never_publishes_the_partial_checkpoint(uninterrupted, session_tmp):
    out = session_tmp / "kill-save"
    partial = out / "checkpoints" / "step_000015.partial"
    resumed = _killed_then_resumed(out, lambda o: partial.is_dir() and any(partial.glob("*.distcp")),
                                   lambda pid: children(pid)[0], PMSS_TEST_HANG_SAVE_AT_STEP="15")
    assert "resumed from" in resumed.stderr and "step_000010 at step 10" in resumed.stderr
    assert not partial.exists()  # cleaned at start, never read
    assert_same_run(out, uninterrupted)


def test_sigterm_saves_stops_and_resumes(uninterrupted, session_tmp):
    out = session_tmp / "sigterm"
    job = subprocess.Popen(job_cmd(2, [*LONG, "checkpoint.every_steps=0", f"output_dir={out}"]),
                           env=job_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Sent once both trainers catch it, before their first step: it lands mid-run however fast the
    # steps are.
    wait_for(lambda: job.poll() is not None
             or (len(workers := children(job.pid)) == 2 and all(map(catches_stop_signals, workers))))
    assert job.poll() is None, f"job ended before the signal:\n{job.stderr.read()[-3000:]}"
    for pid in children(job.pid):  # what SLURM's --signal does to the job's tasks
        os.kill(pid, signal.SIGTERM)
    job.wait(timeout=120)
    stopped = summary(out)
    assert not stopped["completed"] and stopped["stopped_by_signal"] == "SIGTERM"
    assert 0 < stopped["steps"] < 40
    assert latest_step(out) == stopped["steps"]  # the checkpoint is at the step it stopped on
    run_job(2, [*LONG, "checkpoint.every_steps=0", f"output_dir={out}"])
    assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("nproc,micro", [(1, 8), (4, 2)])
def test_resume_on_another_world_size(uninterrupted, session_tmp, nproc, micro):
    out = session_tmp / f"reshard{nproc}"
    shutil.copytree(uninterrupted, out)
    for step in (40, 35):
        shutil.rmtree(out / "checkpoints" / f"step_{step:06d}")
    (out / "summary.json").unlink()
    proc = run_job(nproc, [*LONG, f"output_dir={out}", f"data.micro_batch_size={micro}"])
    assert "at step 30" in proc.stderr
    # Same global batches; only the float reduction order differs between world sizes.
    assert_same_run(out, uninterrupted, tol=1e-5)


# One damage on each of the three newest checkpoints, so that one resume meets all three.
DAMAGED_STEP = {"delete_shard": 40, "truncate_metadata": 35, "no_manifest": 30}


@pytest.fixture(scope="module")
def damaged_and_resumed(uninterrupted, session_tmp) -> tuple[Path, str]:
    """A copy of the uninterrupted run, its checkpoints damaged as DAMAGED_STEP says, resumed: the
    run directory and the resume's stderr."""
    out = session_tmp / "corrupt"
    shutil.copytree(uninterrupted, out)
    for damage, step in DAMAGED_STEP.items():
        checkpoint = out / "checkpoints" / f"step_{step:06d}"
        if damage == "delete_shard":
            next(checkpoint.glob("*.distcp")).unlink()
        elif damage == "truncate_metadata":
            with open(checkpoint / ".metadata", "r+b") as f:
                f.truncate(10)
        else:
            (checkpoint / "manifest.json").unlink()
    (out / "summary.json").unlink()
    return out, run_job(2, [*LONG, f"output_dir={out}"]).stderr


@pytest.mark.parametrize("damage", list(DAMAGED_STEP))
def test_corrupted_checkpoint_falls_back_to_previous(uninterrupted, damaged_and_resumed, damage):
    out, stderr = damaged_and_resumed
    skipped = [line for line in stderr.splitlines() if "skipping checkpoint" in line]
    assert any(f"step_{DAMAGED_STEP[damage]:06d}" in line for line in skipped), skipped
    assert "at step 25" in stderr  # the newest undamaged checkpoint
    assert_same_run(out, uninterrupted)


def test_divergence_is_caught_before_its_checkpoint_is_published(session_tmp):
    # Issue 21, item 7: lr=1e30 makes step 1's update poison the cores (finite, ~1e29); step 2's
    # loss is NaN. Step 1's checkpoint must not be published, or a rerun resumes into the poison.
    out = session_tmp / "nan"
    proc = run_direct([*FAST, "checkpoint.every_steps=1", "optim.lr=1e30", f"output_dir={out}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at step 2: the loss is nan") and \
        "step_000001 was not published" in error and "newest good checkpoint is none" in error
    assert latest_step(out) == 0 and not (out / "summary.json").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")]
    # A rerun with a sane lr starts afresh (resume=auto finds nothing to resume) and finishes.
    rerun = run_direct([*FAST, "checkpoint.every_steps=1", f"output_dir={out}"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" not in rerun.stderr and summary(out)["completed"]
    assert all(x == x and abs(x) < 100 for x in summary(out)["losses"])


def test_async_save_publishes_the_same_checkpoints_and_resumes(uninterrupted, session_tmp):
    out = session_tmp / "async"
    run_job(2, [*LONG, "checkpoint.async_save=true", f"output_dir={out}"], timeout=120)
    assert latest_step(out) == 40
    assert_same_run(out, uninterrupted)
    for step in (40, 35):
        shutil.rmtree(out / "checkpoints" / f"step_{step:06d}")
    (out / "summary.json").unlink()
    proc = run_job(2, [*LONG, "checkpoint.async_save=true", f"output_dir={out}"])
    assert "at step 30" in proc.stderr
    assert_same_run(out, uninterrupted)


def test_export_of_an_unfinished_run_uses_its_newest_checkpoint(uninterrupted, session_tmp, capsys):
    # A run killed after its last checkpoint: no adapter/ and no summary.json, only checkpoints.
    # Exported from the checkpoint, it must equal what the trainer itself exported at the end.
    from pmss_dist.cli.export import main as export  # the tool, in this process

    out = session_tmp / "unfinished-export"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "merged")
    (out / "summary.json").unlink()
    (out / "config.json").unlink()
    exported = session_tmp / "unfinished-exported"  # outside the run: an export never writes into its input
    assert export(["--run", str(out), "--out", str(exported)]) == 0
    assert "exporting its checkpoint step_000040" in capsys.readouterr().err
    assert (exported / "model.safetensors").read_bytes() == \
        (uninterrupted / "merged" / "model.safetensors").read_bytes()

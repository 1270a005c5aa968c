"""Checkpoints and run directories you can trust (issue 21): one test per numbered item, each
reproducing the attack or fault and asserting the new behaviour. Runs are one process (launch/train.py
without torchrun, so its exit code and stderr are the trainer's own) except where ranks matter."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, children, job_cmd, job_env, run_direct, run_job, summary

from pmss_dist.checkpoints import storage
from pmss_dist.checkpoints.record import (CheckpointError, newest_valid, prunable, published_checkpoints, read_manifest,
                                          verify)
from pmss_dist.train.run_dir import RunDir, RunDirError, RunLock, process_start

# Four steps, a checkpoint every two (step_000002, step_000004), about five seconds.
SHORT = ["max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "data.num_samples=64",
         "data.batch_size=8", "data.micro_batch_size=4", "adapter.rank=4", "adapter.alpha=4", "model.dtype=float32",
         "log.log_every=1", "export_merged=false", "log.tensorboard=false"]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def user_error(proc: subprocess.CompletedProcess) -> str:
    """The one-line error of a run refused for a user's mistake: exit code 2, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(("error: ", "config error: ")), proc.stderr[-3000:]
    return line


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def fix_manifest(ck: Path, hashes: bool = True) -> None:
    """What an attacker who edits a checkpoint does to its manifest: sizes (and hashes) made to
    match the edited files."""
    manifest = json.loads((ck / "manifest.json").read_text())
    names = [n for n in manifest["files"]]
    manifest["files"] = {n: (ck / n).stat().st_size for n in names}
    if hashes:
        manifest["sha256"] = {n: hashlib.sha256((ck / n).read_bytes()).hexdigest() for n in names}
    else:
        manifest.pop("sha256", None)
    (ck / "manifest.json").write_text(json.dumps(manifest))


def item_range(ck: Path, fqn: str) -> tuple[str, int, int]:
    """(file, offset, length) of one DCP item."""
    for index, info in storage.load_metadata(ck).storage_data.items():
        if index.fqn == fqn:
            return info.relative_path, info.offset, info.length
    raise KeyError(fqn)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


class Payload:
    """A pickle that runs ``touch marker`` when unpickled without restriction."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def same_result(out: Path, reference: Path) -> None:
    assert summary(out)["losses"] == summary(reference)["losses"]
    ours, theirs = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (out, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "ref"
    ok(run_direct([*SHORT, f"output_dir={out}"]))
    return out


def unfinished(ref: Path, tmp_path: Path, name: str = "run") -> Path:
    """A copy of the reference run as a killed run leaves it: checkpoints, no summary or adapter."""
    out = tmp_path / name
    shutil.copytree(ref, out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "adapter")
    return out


# -- 1. no code runs from a checkpoint -----------------------------------------------------------

@pytest.mark.slow
def test_1_crafted_metadata_runs_no_code_on_resume_or_export(ref, tmp_path):
    out = unfinished(ref, tmp_path)
    marker = tmp_path / "pwned"
    newest = step_dir(out, 4)
    (newest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    fix_manifest(newest)  # size and SHA-256 of the crafted file: only the restricted loader stands
    from pmss_dist.cli.export import main as export

    assert export(["--run", str(out), "--out", str(tmp_path / "merged")]) == 0  # from step 2, skipping step 4
    assert not marker.exists()
    proc = ok(run_direct([*SHORT, f"output_dir={out}"]))
    assert not marker.exists()
    assert "skipping checkpoint" in proc.stderr and "posix.system" in proc.stderr and "step_000004" in proc.stderr
    assert "at step 2" in proc.stderr
    same_result(out, ref)


def test_1_pickled_items_inside_distcp_files_are_loaded_weights_only(tmp_path):
    # A .distcp holds torch.save archives; DCP's default planner unpickles non-tensor items freely.
    import torch.distributed.checkpoint as dcp

    marker, ck = tmp_path / "pwned", tmp_path / "ck"
    with pytest.warns(UserWarning):
        dcp.save({"x": torch.ones(2), "evil": Payload(marker)}, checkpoint_id=ck, no_dist=True)
    assert not marker.exists()
    with pytest.raises(storage.StorageError, match="evil is not plain data"), pytest.warns(UserWarning):
        storage.load({"x": torch.zeros(2), "evil": None}, ck, no_dist=True)
    assert not marker.exists()
    # and the metadata of the same checkpoint, crafted, is refused before anything is read
    (ck / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(storage.StorageError, match="posix.system, which is not part of DCP's metadata"):
        storage.load_metadata(ck)
    assert not marker.exists()


# -- 2. corruption is caught by content ------------------------------------------------------------

@pytest.mark.slow
def test_2_bytes_overwritten_inside_a_core_are_caught_and_the_previous_checkpoint_used(ref, tmp_path):
    out = unfinished(ref, tmp_path)
    newest = step_dir(out, 4)
    name, offset, length = item_range(newest, "model.layers.0.attn.q_proj.core")
    item = (newest / name).read_bytes()[offset:offset + length]
    core = torch.load(__import__("io").BytesIO(item), weights_only=True)
    at = item.index(core.numpy().tobytes())  # the tensor's bytes inside its torch.save archive
    overwrite(newest / name, offset + at, struct.pack("<8f", *[1000.35] * 8))  # 32 bytes, same size
    proc = ok(run_direct([*SHORT, f"output_dir={out}"]))
    assert "skipping checkpoint" in proc.stderr and "step_000004 is corrupted" in proc.stderr
    assert "do not match the SHA-256" in proc.stderr and "at step 2" in proc.stderr
    same_result(out, ref)


# -- 3. a broken manifest or a same-size overwrite falls back, it does not crash -------------------

def test_3_manifests_of_the_wrong_shape_are_treated_as_missing(ref, tmp_path):
    ck = tmp_path / "step_000004"
    shutil.copytree(step_dir(ref, 4), ck)
    verify(ck)
    for text in (b"\xff\xfe\x00garbage", b"[1,2,3]", b'{"files": [1]}', b'{"files": {"../x": 3}}', b"null"):
        (ck / "manifest.json").write_bytes(text)
        with pytest.raises(CheckpointError):
            read_manifest(ck)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["binary_manifest", "list_manifest", "pickled_item", "metadata_bytes",
                                    "pickled_item_without_hashes"])
def test_3_damaged_newest_checkpoint_falls_back_with_the_same_result(ref, tmp_path, damage):
    out = unfinished(ref, tmp_path)
    newest = step_dir(out, 4)
    if damage == "binary_manifest":
        (newest / "manifest.json").write_bytes(bytes(range(256)) * 4)
    elif damage == "list_manifest":
        (newest / "manifest.json").write_text("[1,2,3]")
    elif damage == "metadata_bytes":
        overwrite(newest / ".metadata", 1000, b"\x00" * 100)
    else:  # an optimizer hyper-parameter, a pickled item inside the .distcp file, zeroed in place
        name, offset, length = item_range(newest, "optim.param_groups.layers.0.attn.q_proj.core.lr")
        overwrite(newest / name, offset, b"\x00" * length)
        if damage == "pickled_item_without_hashes":
            fix_manifest(newest, hashes=False)  # a checkpoint of an older version: sizes only
    proc = ok(run_direct([*SHORT, f"output_dir={out}"]))
    assert "skipping checkpoint" in proc.stderr and "step_000004" in proc.stderr
    assert "at step 2" in proc.stderr and "Traceback" not in proc.stderr
    same_result(out, ref)


# -- 4. a resume that would change the run is refused ---------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> tuple[Path, Path]:
    from pmss_dist.models.builtin import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("bases")
    return write_tiny_checkpoint(root / "a", seed=0), write_tiny_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def ext_run(bases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ext") / "run"
    ok(run_direct([*SHORT, f"model.path={bases[0]}", f"output_dir={out}"],
                  PMSS_CACHE_DIR=str(out.parent / "cache")))
    return out


def test_4_the_base_fingerprint_covers_the_weights(bases, tmp_path, monkeypatch):
    from pmss_dist.checkpoints import fingerprint
    from pmss_dist.checkpoints.fingerprint import base_fingerprint, cached_fingerprint, header_fingerprint

    monkeypatch.setenv("PMSS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fingerprint, "CACHE_MIN_BYTES", 0)  # cache even the tiny base
    a, b = bases
    assert header_fingerprint(a) == header_fingerprint(b)  # what was compared before: equal
    assert base_fingerprint(a) != base_fingerprint(b)
    assert cached_fingerprint(a) == base_fingerprint(a)  # cached, by size and mtime
    assert not any(p.name.startswith(".") or "cache" in p.name for p in a.iterdir())  # nothing in the base


@pytest.mark.slow
@pytest.mark.parametrize("change,needle", [
    ("adapter.targets=[q_proj,v_proj]", "adapter.targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
                                        "'up_proj', 'down_proj'] -> ['q_proj', 'v_proj']"),
    ("adapter.alpha=1000", "adapter.alpha: 4.0 -> 1000.0"),
    ("model.path=B", "model weights (fingerprint of model.path): 'sha256:"),
])
def test_4_a_resume_that_changes_the_run_is_refused(ext_run, bases, tmp_path, change, needle):
    out = tmp_path / "run"
    shutil.copytree(ext_run, out)
    (out / "summary.json").unlink()
    before = tree(out / "checkpoints")
    change = change.replace("=B", f"={bases[1]}")
    proc = run_direct([*SHORT, f"model.path={bases[0]}", f"output_dir={out}", change],
                      PMSS_CACHE_DIR=str(tmp_path / "cache"))
    error = user_error(proc)
    assert "is a checkpoint of another run" in error and needle in error
    assert "checkpoint.resume=none or another output_dir" in error
    assert tree(out / "checkpoints") == before  # nothing trained, nothing pruned


# -- 5. optim.lr given on resume is applied from the resumed step, and logged ------------------------

@pytest.mark.slow
def test_5_lr_given_on_resume_takes_effect_and_is_logged(ref, tmp_path):
    out = unfinished(ref, tmp_path)
    shutil.rmtree(step_dir(out, 4))
    proc = ok(run_direct([*SHORT, f"output_dir={out}", "optim.lr=5e-4"]))
    assert "resume: changed since step_000002, in effect from step 3: optim.lr 0.05 -> 0.0005" in proc.stderr
    # the lr after step 3 is the new peak times the schedule's factor there (warm-up: 4/11)
    assert "[step 3/4" in proc.stderr and f"lr={5e-4 * 4 / 11:.4g} " in proc.stderr
    new, old = summary(out)["losses"], summary(ref)["losses"]
    assert new[:3] == old[:3] and new[3] != old[3]  # step 4 is the first trained with the new lr
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 5e-4


# -- 6. other adapter sizes or kinds on resume: one line, not a DCP traceback ------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change,needle", [("adapter.rank=16", "adapter.rank: 4 -> 16"),
                                           ("adapter.kind=lora", "adapter.kind: 'pmss' -> 'lora'")])
def test_6_other_adapter_shape_on_resume_is_refused_in_one_line(ref, tmp_path, change, needle):
    out = unfinished(ref, tmp_path)
    error = user_error(run_direct([*SHORT, f"output_dir={out}", change]))
    assert needle in error and "Size mismatch" not in error and "Missing key" not in error


# -- 7. divergence: tests/train/test_faults.py::test_divergence_is_caught_before_its_checkpoint_is_published

def test_7_divergence_criteria():
    from pmss_dist.train.trainer import divergence

    assert divergence(float("nan"), None, [1.0], 10) == "the loss is nan"
    assert divergence(1.0, float("inf"), [1.0], 10) == "the gradient norm is inf"
    assert "above checkpoint.divergence_factor=10" in divergence(11.0, 1.0, [1.0, 1.0], 10)
    assert divergence(9.9, 1.0, [1.0, 1.0], 10) is None
    assert divergence(1e6, 1.0, [1.0], 0) is None  # 0: only non-finite values count
    assert divergence(1e6, 1.0, [], 10) is None  # nothing to compare the first step with


# -- 8. nothing outside the run is written --------------------------------------------------------

@pytest.mark.slow
def test_8_output_dir_equal_to_the_base_is_refused_and_the_base_untouched(bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases[0], base)
    before = tree(base)
    for output_dir in (base, base / "run"):
        error = user_error(run_direct([*SHORT, f"model.path={base}", f"output_dir={output_dir}"],
                                      PMSS_CACHE_DIR=str(tmp_path / "cache")))
        assert f"model.path={base}" in error and "choose an output_dir outside it" in error
        assert tree(base) == before and sorted(p.name for p in base.iterdir()) == sorted(before)


def test_8_no_path_the_run_writes_overlaps_the_base(tmp_path):
    run = RunDir(tmp_path / "run")
    run.check_outside("builtin:tiny")  # its own base_model/, written by the run: fine
    run.check_outside(str(tmp_path / "elsewhere"))
    run.check_outside(str(tmp_path / "run" / "base_model"))  # a base the run does not write
    for base, what in [(tmp_path / "run", "is model.path"), (tmp_path, "lies inside model.path"),
                       (tmp_path / "run" / "merged", "lies inside .*merged, which this run"),
                       (tmp_path / "run" / "checkpoints" / "x", "lies inside .*checkpoints, which this run")]:
        with pytest.raises(RunDirError, match=what):
            run.check_outside(str(base))
    with pytest.raises(RunDirError, match="selection_file=.* would be written inside model.path"):
        run.check_outside(str(tmp_path / "base"), str(tmp_path / "base" / "sel.json"))


# -- 9. only our own checkpoints are pruned, by step number -------------------------------------

@pytest.mark.slow
def test_9_pruning_spares_a_users_step_entries(tmp_path):
    out = tmp_path / "run"
    best = out / "checkpoints" / "step_best"
    best.mkdir(parents=True)
    (best / "note.txt").write_text("mine")
    (out / "checkpoints" / "step_best.partial").mkdir()
    ok(run_direct([*SHORT, "checkpoint.keep_last=1", f"output_dir={out}"]))
    assert (best / "note.txt").read_text() == "mine" and (out / "checkpoints" / "step_best.partial").is_dir()
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"
    assert step_dir(out, 4).is_dir() and not step_dir(out, 2).exists()


def test_9_steps_are_ordered_by_number_not_by_name(ref, tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_999999", "step_1000000", "step_best", "step_12x"):
        shutil.copytree(step_dir(ref, 2), root / name)
    assert [p.name for p in published_checkpoints(root)] == ["step_999999", "step_1000000"]
    assert newest_valid(root).name == "step_1000000"
    assert prunable(["step_1000000", "step_999999", "step_000010"], keep_last=1) == ["step_000010", "step_999999"]


# -- 10. workers die with torchrun; one run per output_dir ------------------------------------------

def _gone(pid: int) -> bool:
    return process_start(pid) in (None, "zombie")


@pytest.mark.slow
def test_10_workers_die_when_torchrun_is_killed_and_a_rerun_takes_over(tmp_path):
    out = tmp_path / "run"
    overrides = [*FAST, "max_steps=400", "checkpoint.every_steps=2", "log.tensorboard=false", "export_merged=false",
                 f"output_dir={out}"]
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(job_cmd(2, overrides), env=job_env(), cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "latest").is_file():
            assert job.poll() is None and time.time() < deadline, "the job did not start training"
            time.sleep(0.05)
        workers = children(job.pid)
        assert len(workers) == 2
        os.kill(job.pid, signal.SIGKILL)  # torchrun alone: its workers are in sessions of their own
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    deadline = time.time() + 60
    while not all(_gone(pid) for pid in workers):
        assert time.time() < deadline, "workers outlived torchrun"
        time.sleep(0.05)
    assert "torchrun (pid" in (tmp_path / "job.log").read_text()  # a watchdog ended its worker
    # Rank 0 held the lock: ended by its watchdog it leaves it (stale); ended by the error of a
    # collective whose peer its watchdog ended first, it releases it on the way out.
    stale = (out / "run.lock").is_file()
    step = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    rerun = run_job(2, [*overrides, f"max_steps={step + 2}"])
    assert ("took over the stale lock" in rerun.stderr) == stale and f"at step {step}" in rerun.stderr
    assert summary(out)["completed"] and not (out / "run.lock").exists()


def _holder(tmp_path: Path, pid: int, host: str | None = None) -> Path:
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": process_start(pid),
                                "since": "earlier"}))
    return lock


def test_10_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _holder(tmp_path, sleeper.pid)
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {sleeper.pid} on {socket.gethostname()}"):
            RunLock(lock).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "took over the stale lock of pid" in RunLock(lock).acquire()  # the holder is dead now
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    RunLock(lock).release()
    assert not lock.exists()
    _holder(tmp_path, os.getpid(), host="another-host")
    with pytest.raises(RunDirError, match="on another-host"):
        RunLock(lock).acquire()  # another host's process cannot be checked: refused
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "1"}))
    assert "stale" in RunLock(lock).acquire()  # our pid, but another process's start time: recycled
    # a requeued SLURM job on another node: the lock of its earlier attempt is stale
    lock.write_text(json.dumps({"pid": 1, "host": "node-a", "slurm_job": "77", "slurm_attempt": 0}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_JOB_ID", "77")
        mp.setenv("SLURM_RESTART_COUNT", "1")
        assert "stale lock of pid 1 on node-a" in RunLock(lock).acquire()


@pytest.mark.slow
def test_10_a_second_run_on_a_live_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _holder(out, os.getpid())  # this test's own process plays the running job
    error = user_error(run_direct([*SHORT, f"output_dir={out}"]))
    assert f"in use by another run (pid {os.getpid()} on {socket.gethostname()}" in error
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing written beside it


# -- 11-13. every bad input in one line, exit code 2 ---------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    rows = [json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}).encode() for i in range(16)]
    rows[2] = b'{"question": "1+\xff=", "answer": "2"}'
    (root / "rows.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    tiny = (REPO / "configs" / "tiny.yaml").read_text()
    (root / "syntax.yaml").write_text(tiny.replace("seed: 0", "seed: [0"))
    (root / "tag.yaml").write_text(tiny + f"\nextra: !!python/object/apply:os.system ['touch {root / 'pwned'}']\n")
    return {"rows": root / "rows.jsonl", "syntax": root / "syntax.yaml", "tag": root / "tag.yaml",
            "pwned": root / "pwned"}


@pytest.mark.slow
@pytest.mark.parametrize("overrides,config,needle", [
    # 11: a byte that is not UTF-8, with or without skipping bad rows (skip: the row is skipped)
    (["data.source=ROWS"], None, "rows.jsonl:3: not valid UTF-8 (byte 0xff at column 17)"),
    # 12: every sample cut before its first trained token
    (["data.seq_len=4"], None, "data.seq_len=4 cuts every one of the 64 samples of builtin:arithmetic"),
    # 13: values that passed validation, YAML errors, tags, errors found after start-up
    (["optim.lr=.nan"], None, "optim.lr must be a finite number in (0, inf), got nan"),
    (["adapter.alpha=-32"], None, "adapter.alpha must be a finite number in (0, inf), got -32.0"),
    (["optim.warmup_steps=-5"], None, "optim.warmup_steps must be >= 0, got -5"),
    (["adapter.targets=[3"], None, "override 'adapter.targets=[3': expected ',' or ']'"),
    ([], "syntax", "syntax.yaml:6: expected ',' or ']', but got ':' (while parsing a flow sequence started on line 5)"),
    ([], "tag", "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    (["adapter.rank=1000"], None, "adapter.rank=1000 is larger than layer"),
])
def test_11_to_13_bad_input_ends_in_one_line(bad_inputs, tmp_path, overrides, config, needle):
    overrides = [o.replace("ROWS", str(bad_inputs["rows"])) for o in overrides]
    config = bad_inputs[config] if config else REPO / "configs" / "tiny.yaml"
    error = user_error(run_direct([*SHORT, f"output_dir={tmp_path / 'run'}", *overrides], config=config))
    assert needle in error
    assert not bad_inputs["pwned"].exists()


@pytest.mark.slow
def test_11_skipped_bad_bytes_train_on(bad_inputs, tmp_path):
    proc = ok(run_direct([*SHORT, "max_steps=1", f"data.source={bad_inputs['rows']}", "data.on_bad_row=skip",
                          "data.seq_len=32", f"output_dir={tmp_path / 'run'}"]))
    assert "skipped 1 malformed rows of 16" in proc.stderr and "rows.jsonl:3: not valid UTF-8" in proc.stderr


@pytest.mark.slow
def test_13_an_error_after_start_up_is_one_line_printed_once(tmp_path):
    proc = run_job(2, [*SHORT, "data.micro_batch_size=8", f"output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode != 0  # torchrun's own exit code and report of its failed workers
    needle = "config error: data.batch_size=8 is not divisible by data.micro_batch_size (8) x world size (2)"
    assert proc.stderr.count(needle) == 1  # every rank stops on it, rank 0 says it, in one line
    assert "exitcode  : 2" in proc.stderr
    assert "pmss_dist/" not in "".join(line for line in proc.stderr.splitlines() if line.strip().startswith("File "))

"""pmss_dist.files: a published directory is the whole old one, the whole new one, or absent (and
then recovered), wherever its writer dies; nothing is written through a link or into a device;
outputs are never inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from pmss_dist import files
from pmss_dist.files import (OutputPathError, atomic_write, begin_staged, check_not_over_inputs, clean_stale,
                             publish_dir, publish_staged, recover)

OLD = {"a.bin": b"old a", "b.bin": b"old b"}
NEW = {"a.bin": b"new a", "b.bin": b"new b", "c.bin": b"new c"}


def contents(directory: Path) -> dict[str, bytes] | None:
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def fill(directory: Path, data: dict[str, bytes]) -> None:
    for name, value in data.items():
        (directory / name).write_bytes(value)


class Killed(BaseException):
    """Stands for the process dying at that point: nothing after it runs, no cleanup."""


# Where a writer dies: inside its writes (after one file), after writing and before publication,
# between publication's two renames, after them and before the old copy is removed.
KILL_POINTS = ["mid-write", "before-publish", "between-renames", "before-removing-old"]


def publish_killed(final: Path, point: str, monkeypatch) -> None:
    staging = begin_staged(final)
    if point == "mid-write":
        fill(staging, dict(list(NEW.items())[:1]))
        return
    fill(staging, NEW)
    if point == "before-publish":
        return
    published, real_replace, real_remove = [], os.replace, files.remove_path

    def replace(src, dst):
        if Path(dst) == final:  # the new directory's rename into place (the old one is aside)
            if point == "between-renames":
                raise Killed
            published.append(dst)
        real_replace(src, dst)

    def remove(path):
        if point == "before-removing-old" and published:
            raise Killed
        real_remove(path)

    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(files, "remove_path", remove)
    with pytest.raises(Killed):
        publish_staged(final)
    monkeypatch.undo()


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("previous", [True, False], ids=["over-old", "fresh"])
def test_a_killed_publication_leaves_old_new_or_nothing_then_recovers(tmp_path, monkeypatch, point, previous):
    final = tmp_path / "merged"
    if previous:
        final.mkdir()
        fill(final, OLD)
    publish_killed(final, point, monkeypatch)
    assert contents(final) in (OLD if previous else None, NEW, None)
    clean_stale(tmp_path)  # what the next run (or export) does first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pmss-")]
    assert contents(final) in ((OLD if previous else None), NEW)
    if point == "between-renames" and previous:
        assert contents(final) == OLD  # the kept old copy was put back, not lost
    publish_dir(final, lambda d: fill(d, NEW))  # and the next publication completes
    assert contents(final) == NEW


def test_sigkill_of_a_real_writer_mid_publication(tmp_path):
    """The same with a real SIGKILL, in a child process killed inside its second file."""
    final = tmp_path / "out"
    final.mkdir()
    fill(final, OLD)
    script = (f"import os, signal, sys; sys.path.insert(0, {str(REPO / 'src')!r})\n"
              "from pmss_dist.files import publish_dir\n"
              "def write(d):\n"
              "    (d / 'a.bin').write_bytes(b'new a')\n"
              "    with open(d / 'b.bin', 'wb') as f:\n"
              "        f.write(b'new'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"publish_dir({str(final)!r}, write)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert contents(final) == OLD
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and contents(final) == OLD


def test_a_link_is_replaced_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    fill(outside, OLD)
    run = tmp_path / "run"
    run.mkdir()
    (run / "merged").symlink_to(outside, target_is_directory=True)
    publish_dir(run / "merged", lambda d: fill(d, NEW))
    assert not (run / "merged").is_symlink() and contents(run / "merged") == NEW
    assert contents(outside) == OLD  # what the link pointed at is untouched
    (run / "summary.json").symlink_to(outside / "a.bin")
    atomic_write(run / "summary.json", lambda p: Path(p).write_text("{}"))
    assert not (run / "summary.json").is_symlink() and (outside / "a.bin").read_bytes() == b"old a"


def test_devices_fifos_and_files_where_a_directory_goes_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="fifo exists and is a device, FIFO or socket"):
        atomic_write(fifo, lambda p: Path(p).write_text("x"))
    with pytest.raises(OutputPathError, match="/dev/null exists and is a device"):
        atomic_write("/dev/null", lambda p: Path(p).write_text("x"))
    assert Path("/dev/null").is_char_device() and fifo.exists() and not fifo.is_file()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputPathError, match="exists and is not a directory"):
        publish_dir(tmp_path / "file", lambda d: fill(d, NEW))
    assert (tmp_path / "file").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pmss-")]


@pytest.mark.parametrize("out,relation", [("base", "is"), ("base/sub", "lies inside"), (".", "contains")])
def test_outputs_over_inputs_are_refused(tmp_path, out, relation):
    (tmp_path / "base").mkdir()
    with pytest.raises(OutputPathError, match=f"--out {tmp_path / out} {relation} the base"):
        check_not_over_inputs(tmp_path / out, {"the base": tmp_path / "base"}, "--out")
    check_not_over_inputs(tmp_path / "elsewhere", {"the base": tmp_path / "base"}, "--out")


def test_recover_does_nothing_while_the_directory_is_there(tmp_path):
    final, old = tmp_path / "merged", tmp_path / ".pmss-old.merged"
    final.mkdir()
    old.mkdir()
    fill(final, NEW)
    recover(final)
    assert contents(final) == NEW and old.is_dir()  # clean_stale then removes the leftover
    assert clean_stale(tmp_path) == [".pmss-old.merged"] and contents(final) == NEW

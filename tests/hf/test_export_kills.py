"""pmss-export killed (SIGKILL, at exact points by tests/faults/sitecustomize.py) while it writes:
what is on disk afterwards is the whole previous export, the whole new one, or nothing, and the
next export completes and leaves no temporary file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_export import save_run_adapter, trained_adapter, write_tokenizer
from test_load import make_hf_checkpoint, our_model

from pmss_dist.hf.export import export_merged

pytestmark = pytest.mark.slow  # a child process per kill

# Where the export dies: before its 2nd weight file, inside its 3rd file's atomic write (data
# written, not yet renamed), while copying the side files, just before publication.
KILL_POINTS = ["pmss_dist.hf.export:_write_replaced_file:2", "pmss_dist.files:_fsync:3",
               "pmss_dist.hf.export:copy_side_files:1", "pmss_dist.files:publish_staged:1"]


def contents(directory: Path) -> dict[str, bytes] | None:
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A sharded base, two adapters, and the complete merged export of each."""
    root = tmp_path_factory.mktemp("kills")
    base = root / "base"
    make_hf_checkpoint(base, "llama", max_shard_size="20KB")
    write_tokenizer(base, 97)
    out = {"root": root, "base": base}
    for name, seed in (("old", 1), ("new", 2)):
        adapter = root / f"adapter-{name}"
        save_run_adapter(trained_adapter(our_model(base), "pmss", size=4, alpha=8.0, seed=seed), adapter, base,
                         "pmss", 4, 8.0)
        out[name] = {"adapter": adapter, "export": export_merged(adapter, base, root / f"ref-{name}", progress=False)}
    assert len(list(base.glob("*.safetensors"))) >= 4  # several weight files: kills inside the sequence
    return out


def export(exports, out: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "faults"), str(REPO / "src")])}
    if kill_at:
        env["PMSS_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "pmss_dist.cli.export", "--adapter", str(exports["new"]["adapter"]),
           "--base", str(exports["base"]), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kill_at", KILL_POINTS)
@pytest.mark.parametrize("previous", [True, False], ids=["over-a-previous-export", "fresh"])
def test_killed_export_leaves_the_old_the_new_or_nothing(exports, tmp_path, kill_at, previous):
    out = tmp_path / "merged"
    old, new = contents(exports["old"]["export"]), contents(exports["new"]["export"])
    if previous:
        shutil.copytree(exports["old"]["export"], out)
    proc = export(exports, out, kill_at)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert contents(out) in ((old if previous else None), new)  # never a mix, never a partial directory
    again = export(exports, out, None)
    assert again.returncode == 0, again.stderr[-2000:]
    assert contents(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the killed export's staging is gone

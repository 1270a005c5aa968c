"""A finished entry point leaves no gloo worker thread behind on any rank.

torch's DTensor caches keep device meshes, and with them the process groups, alive until the
interpreter exits. A gloo worker still releasing a finished collective's tensors then needs the
GIL while Python finalises, and the rank aborts ("terminate called without an active exception",
SIGABRT) after its work is done: a flake of every 2-rank job on a loaded machine. The reference
here is the operating system's thread list, read once the entry point has returned."""

import re
import subprocess
from pathlib import Path

import pytest

from conftest import FAST, REPO, TINY_CONFIG, job_env, torchrun_cmd

pytestmark = pytest.mark.slow  # torchrun jobs

EXIT_PROBE = REPO / "tests" / "exit_probe.py"


def threads_left(entry: str, *argv: str) -> list[int]:
    proc = subprocess.run(torchrun_cmd(2, EXIT_PROBE, entry, *argv), capture_output=True, text=True,
                          timeout=300, env=job_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(int(n) for n in re.findall(r"gloo threads left: (\d+)", proc.stderr))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[int]]:
    """A 2-step run on 2 ranks, to the merged export: its directory and the threads left."""
    out = tmp_path_factory.mktemp("exit") / "run"
    return out, threads_left("train", "--config", str(TINY_CONFIG), *FAST, "max_steps=2", f"output_dir={out}")


def test_training_leaves_no_gloo_thread(trained):
    out, left = trained
    assert (out / "merged").is_dir()  # the run went all the way, export included
    assert left == [0, 0]


def test_selection_leaves_no_gloo_thread(trained, tmp_path):
    assert threads_left("select", "--hf", str(trained[0] / "base_model"), "--k", "8", "--dtype", "float32",
                        "--out", str(tmp_path / "selection.json")) == [0, 0]


def test_evaluation_leaves_no_gloo_thread(trained, tmp_path):
    assert threads_left("evaluate", "--model", str(trained[0] / "merged"), "--data", "builtin:arithmetic",
                        "--limit", "4", "--out", str(tmp_path / "eval.json")) == [0, 0]

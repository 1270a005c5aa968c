"""Files written by earlier code still load: before the package restructure (commit 45f93b8,
tests/fixtures/run_45f93b8) and before the checkpoints package, the model spec and the one step
(commit 2df2a24, tests/fixtures/run_2df2a24). Each step checkpoint resumes to the same result as an
uninterrupted run of today's code, each selection file is reused as is, and each adapter exports
to the update it holds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_direct, summary

pytestmark = pytest.mark.slow

FIXTURES = ("run_45f93b8", "run_2df2a24")
# The settings the fixture was written with (its README), run here to 4 steps.
SETTINGS = ["adapter.rank=4", "adapter.alpha=4", "model.dtype=float32", "data.num_samples=64", "data.batch_size=8",
            "data.micro_batch_size=4", "log.log_every=1", "export_merged=false", "log.tensorboard=false",
            "checkpoint.every_steps=2", "max_steps=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / "uninterrupted"
    run_direct([*SETTINGS, f"output_dir={out}"], check=True)
    return out


@pytest.fixture(params=FIXTURES)
def old(request):
    return REPO / "tests" / "fixtures" / request.param


def test_old_checkpoint_resumes_like_an_uninterrupted_run(uninterrupted, old, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(old / "checkpoints", out / "checkpoints")
    shutil.copy(old / "selection.json", out / "selection.json")
    proc = run_direct([*SETTINGS, f"output_dir={out}"], check=True)
    assert "at step 2" in proc.stderr  # resumed from the old step checkpoint, did not start over
    # The fixture's first two steps ran on another machine, whose CPU kernels round the last bits
    # differently (here: cores 2e-6 apart on an AVX-512 EPYC), so equal up to that, not bitwise.
    # A resume that lost the optimizer state or restarted moves the cores by orders more.
    torch.testing.assert_close(torch.tensor(summary(out)["losses"]), torch.tensor(summary(uninterrupted)["losses"]),
                               rtol=1e-5, atol=0)
    ours, theirs = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (out, uninterrupted))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)


def test_old_selection_file_is_reused(uninterrupted, old, tmp_path):
    out = tmp_path / "reuse"
    proc = run_direct([*SETTINGS, f"output_dir={out}", "max_steps=1",
                       f"adapter.selection_file={old / 'selection.json'}"], check=True)
    assert "reusing skeleton selection" in proc.stderr
    # 45f93b8's file was accepted by its header fingerprint; the run records the base's content fingerprint.
    was, new = json.loads((old / "selection.json").read_text()), json.loads((out / "selection.json").read_text())
    assert was.pop("base_fingerprint") in ("38ff1f62042b016f", new["base_fingerprint"])
    assert new.pop("base_fingerprint").startswith("sha256:")
    assert new == was


def test_old_adapter_exports_the_update_it_holds(uninterrupted, old, tmp_path):
    from pmss_dist.cli.export import main as export

    base = uninterrupted / "base_model"
    assert export(["--adapter", str(old / "adapter"), "--base", str(base), "--out", str(tmp_path / "merged")]) == 0
    meta = json.loads((old / "adapter" / "adapter.json").read_text())
    adapter = load_file(str(old / "adapter" / "adapter.safetensors"))
    w = load_file(str(base / "model.safetensors"))["model.layers.1.mlp.gate_proj.weight"]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))["model.layers.1.mlp.gate_proj.weight"]
    core, rows, cols = (adapter[f"layers.1.mlp.w1.{name}"] for name in ("core", "row_idx", "col_idx"))
    expected = w + meta["alpha"] / meta["rank"] * (w[:, cols] @ core @ w[rows, :])  # W + s·C·U·R, by hand
    assert core.abs().sum() > 0
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)

"""A run's files are whole or absent, never outside the run, never silently stale:

* the final merged export killed (SIGKILL at an exact point, tests/faults/sitecustomize.py) leaves
  no directory that looks complete, on a fresh run, and the previous export whole on a resumed one;
  a resumed run is not "finished" until it finishes again, so pmss-export takes its newest
  checkpoint, and says which;
* links inside output_dir (merged/, adapter/, base_model/, a checkpoint's .partial and published
  names) are replaced, never written through; a FIFO is never written;
* a resume is the same run by content: data with the same path and row count but other rows, and
  other tokenizer files in the base, are refused by name;
* a base holding NaN is reported as the base's, not as a divergence.
"""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from conftest import FAST, REPO, run_direct, run_job
from pmss_dist.cli.export import main as export
from pmss_dist.hf.export import export_merged
from pmss_dist.models.builtin import write_tiny_checkpoint

pytestmark = pytest.mark.slow  # torchrun jobs, killed and run again

KILL_IN_EXPORT = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "faults"), str(REPO / "src")]),
                  "PMSS_KILL_AT": "pmss_dist.hf.export:copy_side_files:1", "PMSS_KILL_RANK": "0"}


def contents(directory):
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".pmss-"))


def test_a_fresh_run_killed_in_its_export_leaves_no_export_then_completes(tmp_path):
    out = tmp_path / "run"
    killed = run_job(2, [*FAST, f"output_dir={out}"], check=False, **KILL_IN_EXPORT)
    assert killed.returncode != 0
    assert not (out / "merged").exists() and not (out / "summary.json").exists()
    assert leftovers(out) == [".pmss-staging.merged"]  # the half-written export, under our temporary name
    again = run_job(2, [*FAST, f"output_dir={out}"])
    assert "at step 8" in again.stderr and "removed what a killed write left" in again.stderr
    assert leftovers(out) == []
    reference = export_merged(out / "adapter", out / "base_model", tmp_path / "reference", progress=False)
    assert contents(out / "merged") == contents(reference)


def test_a_resumed_run_killed_in_its_export_keeps_the_old_one_and_exports_its_newest_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    run_job(2, [*FAST, f"output_dir={out}"])
    finished = contents(out / "merged")
    assert json.loads((out / "merged" / "pmss_export.json").read_text())["step"] == 8
    killed = run_job(2, [*FAST, "max_steps=12", f"output_dir={out}"], check=False, **KILL_IN_EXPORT)
    assert killed.returncode != 0 and "at step 8" in killed.stderr
    assert contents(out / "merged") == finished  # the previous export, whole
    assert not (out / "summary.json").exists() and (out / "summary.previous.json").is_file()
    assert export(["--run", str(out), "--out", str(tmp_path / "exported")]) == 0
    assert "has not finished: exporting its checkpoint step_000012" in capsys.readouterr().err
    assert json.loads((tmp_path / "exported" / "pmss_export.json").read_text())["step"] == 12
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() != finished["model.safetensors"]


def test_links_inside_the_run_are_replaced_never_written_through(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside"
    linked = ["merged", "adapter", "base_model", "checkpoints/step_000004.partial", "checkpoints/step_000004"]
    for i, name in enumerate(linked):
        target = outside / str(i)
        target.mkdir(parents=True)
        (target / "keep.txt").write_text(name)
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to(target, target_is_directory=True)
    run_job(2, [*FAST, f"output_dir={out}", "checkpoint.every_steps=4", "checkpoint.keep_last=2"])
    for i, name in enumerate(linked):
        assert contents(outside / str(i)) == {"keep.txt": name.encode()}, name  # nothing written through
    for name in ("merged", "adapter", "base_model", "checkpoints/step_000004"):
        assert (out / name).is_dir() and not (out / name).is_symlink(), name
    assert (out / "checkpoints" / "step_000004" / "manifest.json").is_file()


def test_a_fifo_as_selection_file_is_refused_not_replaced(tmp_path):
    fifo = tmp_path / "selection.fifo"
    os.mkfifo(fifo)
    proc = run_direct([*FAST, f"output_dir={tmp_path / 'run'}", f"adapter.selection_file={fifo}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"adapter.selection_file: {fifo} exists and is a device, FIFO or socket" in proc.stderr
    assert fifo.exists() and not fifo.is_file()


def _qa_rows(path, seed: int) -> None:
    rows = [{"question": f"{seed} plus {i}?", "answer": str(seed + i)} for i in range(64)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_resume_on_other_data_or_tokenizer_files_is_refused_by_name(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "base", seed=0)
    data = tmp_path / "rows.jsonl"
    _qa_rows(data, 1)
    out = tmp_path / "run"
    settings = [*FAST, f"model.path={base}", f"data.source={data}", "data.seq_len=32", f"output_dir={out}"]
    run_direct([*settings, "max_steps=4"], check=True, timeout=300)
    _qa_rows(data, 2)  # the same path and number of rows, other rows
    proc = run_direct(settings, timeout=300)
    assert proc.returncode == 2 and "is a checkpoint of another run (data.contents:" in proc.stderr
    _qa_rows(data, 1)
    (base / "chat_template.jinja").write_text("{{ messages }}")  # not used by these rows, but the run's tokenizer
    proc = run_direct(settings, timeout=300)
    assert proc.returncode == 2 and "(model.tokenizer_files:" in proc.stderr and "data.contents" not in proc.stderr
    (base / "chat_template.jinja").unlink()
    assert "at step 4" in run_direct(settings, check=True, timeout=300).stderr  # the same run again: resumed


def test_nan_in_the_base_is_the_base_s_fault_not_a_divergence(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "base", seed=0)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")  # a norm: no skeleton is selected from it
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    proc = run_direct([*FAST, f"model.path={base}", f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "diverged" not in proc.stderr
    assert "the base checkpoint holds non-finite values (NaN or Inf) in norm.scale" in proc.stderr


def test_eval_output_over_the_model_is_refused(tmp_path):
    from pmss_dist.cli.evaluate import main as evaluate

    base = write_tiny_checkpoint(tmp_path / "base", seed=0)
    weights = (base / "model.safetensors").read_bytes()
    for out in (base / "model.safetensors", base / "sub" / "eval.json"):
        assert evaluate(["--model", str(base), "--data", "builtin:arithmetic", "--out", str(out)]) == 2
    assert (base / "model.safetensors").read_bytes() == weights and not (base / "sub").exists()


def test_select_output_over_the_model_is_refused(tmp_path, capsys):
    from pmss_dist.cli.select import main as select

    base = write_tiny_checkpoint(tmp_path / "base", seed=0)
    weights = (base / "model.safetensors").read_bytes()
    for out in (base / "model.safetensors", base / "selection.json", base):
        assert select(["--hf", str(base), "--k", "4", "--out", str(out)]) == 2
        assert "an input of this command" in capsys.readouterr().err
    assert (base / "model.safetensors").read_bytes() == weights and not (base / "selection.json").exists()

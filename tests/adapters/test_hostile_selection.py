"""Hostile selection inputs: a selection file with bad entries, a base weight with NaN/Inf, and bad
pmss-select arguments are each refused with one line naming the file, layer, weight or flag."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pmss_dist.adapters.distributed_selection import select_skeletons
from pmss_dist.adapters.selection import SelectionError, load_selection, save_selection, select_skeleton
from pmss_dist.cli import select as select_cli
from pmss_dist.models.builtin import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
KEY = dict(method="deim", k=4, seed=0, base_fingerprint="sha256:aaa")
SHAPES = {"layers.0.q": (20, 12), "layers.0.o": (8, 30)}
NESTED = "[" * 100_000 + "]" * 100_000


def _saved(tmp_path) -> Path:
    path = tmp_path / "selection.json"
    sel = {n: (torch.arange(4), torch.arange(4) + 1) for n in SHAPES}
    save_selection(path, sel, shapes=SHAPES, **KEY)
    return path


def _edit(path: Path, layer: str, **fields) -> None:
    doc = json.loads(path.read_text())
    doc["layers"][layer].update(fields)
    path.write_text(json.dumps(doc))


def _refused(path: Path, shapes=SHAPES) -> str:
    with pytest.raises(SelectionError) as err:
        load_selection(path, shapes=shapes, **KEY)
    message = str(err.value)
    assert message.startswith(f"selection file {path}") and "\n" not in message and len(message) < 600, message
    return message


@pytest.mark.parametrize("fields,needle", [
    ({"rows": [0, 1, 2], "cols": [0, 1, 2]}, "layers.0.q.rows has 3 indices, k is 4"),
    ({"rows": [0, 1, 2, 3, 4], "cols": [0, 1, 2, 3, 4]}, "layers.0.q.rows has 5 indices, k is 4"),
    ({"rows": ["0", "1", "2", "3"]}, "layers.0.q.rows must be a list of integers, got ['0', '1', '2', '3']"),
    ({"rows": [0.0, 1.0, 2.0, 3.0]}, "layers.0.q.rows must be a list of integers, got [0.0, 1.0, 2.0, 3.0]"),
    ({"rows": [[0], [1], [2], [3]]}, "layers.0.q.rows must be a list of integers"),
    ({"rows": [True, False, 2, 3]}, "layers.0.q.rows must be a list of integers, got [True, False, 2, 3]"),
    ({"rows": "0123"}, "layers.0.q.rows must be a list of integers, got '0123'"),
    ({"rows": None}, "layers.0.q.rows must be a list of integers, got None"),
    ({"rows": [0, 1, 1, 2]}, "layers.0.q.rows repeats an index"),
    ({"rows": [0, 1, 2, 20]}, "layers.0.q.rows has an index outside [0, 20)"),
    ({"cols": [-1, 0, 1, 2]}, "layers.0.q.cols has an index outside [0, 12)"),
    ({"shape": [20]}, "layers.0.q.shape must be null or two positive integers, got [20]"),
    ({"shape": [True, 12]}, "layers.0.q.shape must be null or two positive integers, got [True, 12]"),
    ({"shape": "20x12"}, "layers.0.q.shape must be null or two positive integers"),
])
def test_bad_entries_are_refused_naming_the_file_and_layer(tmp_path, fields, needle):
    path = _saved(tmp_path)
    _edit(path, "layers.0.q", **fields)
    assert needle in _refused(path)


def test_a_layer_that_is_not_an_object_is_refused(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads(path.read_text())
    doc["layers"]["layers.0.q"] = [[0, 1, 2, 3], [0, 1, 2, 3]]
    path.write_text(json.dumps(doc))
    assert "layers.0.q must be an object with rows and cols" in _refused(path)


def test_indices_are_checked_without_shapes_too(tmp_path):
    path = tmp_path / "selection.json"
    save_selection(path, {"layers.0.q": (torch.arange(4), torch.arange(4))}, **KEY)  # "shape": null
    _edit(path, "layers.0.q", rows=[-4, 0, 1, 2])
    assert "layers.0.q.rows has an index outside [0, 9223372036854775808) (the file records no shape)" in _refused(
        path, shapes=None)
    _edit(path, "layers.0.q", rows=[0, 1, 2], cols=[0, 1, 2])
    assert "layers.0.q.rows has 3 indices, k is 4" in _refused(path, shapes=None)


@pytest.mark.parametrize("text,needle", [
    (lambda doc: doc.replace('"rows":[0,1,2,3]', '"rows":' + NESTED, 1), "not valid JSON (nested too deeply)"),
    (lambda doc: doc.replace('"rows":[0,1,2,3]', '"rows":[' + "1" * 5000 + "]", 1),
     "not valid JSON (a number of more than 4300 digits)"),
])
def test_files_python_cannot_read_are_refused(tmp_path, text, needle):
    path = _saved(tmp_path)
    path.write_text(text(path.read_text()))
    assert needle in _refused(path)


# ---------------------------------------------------------------------------------------------
# NaN/Inf in a base weight


def _poisoned(shape=(20, 12)) -> torch.Tensor:
    w = torch.randn(shape)
    w[3, 5], w[7, 1] = float("nan"), float("inf")
    return w


def test_a_non_finite_weight_is_refused_naming_it():
    with pytest.raises(SelectionError) as err:
        select_skeleton(_poisoned(), 4, name="layers.3.attn.q_proj")
    assert str(err.value) == ("layers.3.attn.q_proj: the base checkpoint holds non-finite values (NaN or Inf) in "
                              "this weight (2 of 240); it is damaged: convert or download it again")
    weights = {"layers.0.q": torch.randn(20, 12), "layers.1.q": _poisoned()}
    with pytest.raises(SelectionError, match=r"^layers\.1\.q: the base checkpoint holds non-finite .* \(2 of 240\)"):
        select_skeletons(weights, {n: 4 for n in weights}, progress=False)


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
        # plain tensors on every rank: the replicated base, whose layers are dealt over the ranks
        weights = {f"layers.{i}.q": torch.randn(20, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)}
        weights["layers.2.q"] = _poisoned()  # owned by one rank only
        try:
            select_skeletons(weights, {n: 4 for n in weights}, progress=False)
        except SelectionError as err:
            Path(out_dir, f"rank{rank}.txt").write_text(str(err))
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_non_finite_weight_is_refused_on_every_rank_of_a_distributed_selection(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert len(messages) == 1, messages  # the same line on both ranks
    assert messages.pop() == ("layers.2.q: the base checkpoint holds non-finite values (NaN or Inf) in this weight "
                              "(2 of 240); it is damaged: convert or download it again")


# ---------------------------------------------------------------------------------------------
# pmss-select


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("k", ["0", "-3", "1000"])
def test_select_refuses_a_k_the_model_cannot_take(tiny, tmp_path, capsys, k):
    assert select_cli.main(["--hf", str(tiny), "--k", k, "--out", str(tmp_path / "s.json")]) == 2
    # the tiny model's k_proj/v_proj are 64 x 128: its smallest targeted side is 64
    assert capsys.readouterr().err == (f"error: --k {k} is out of range for this model: k must be in [1, 64] "
                                       "(layers.0.attn.k_proj is 64x128); choose --k in that range\n")
    assert not (tmp_path / "s.json").exists()


def test_select_limit_is_that_of_the_targeted_matrices(tiny, tmp_path, capsys):
    args = ["--hf", str(tiny), "--k", "200", "--targets", "q_proj", "--out", str(tmp_path / "s.json")]
    assert select_cli.main(args) == 2
    assert "k must be in [1, 128] (layers.0.attn.q_proj is 128x128)" in capsys.readouterr().err


@pytest.mark.parametrize("breakage,needle", [
    (lambda d: (d / "config.json").unlink(), "config.json not found"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}'), "unsupported architecture"),
])
def test_select_user_errors_exit_2_with_one_line(tmp_path, capsys, breakage, needle):
    base = write_tiny_checkpoint(tmp_path / "base")
    breakage(base)
    assert select_cli.main(["--hf", str(base), "--k", "8", "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --hf ") and needle in err and err.count("\n") == 1, err


def _select_in_a_process(base: Path, out: Path) -> list[str]:
    """pmss-select in a process of its own (it starts a process group): its ``error:`` lines."""
    proc = subprocess.run([sys.executable, "-m", "pmss_dist.cli.select", "--hf", str(base), "--k", "8", "--dtype",
                           "float32", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_select_refuses_a_base_with_non_finite_weights(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert _select_in_a_process(base, tmp_path / "s.json") == [
        f"error: --hf {base}: layers.1.attn.output_proj: the base checkpoint holds non-finite values (NaN or Inf) "
        "in this weight (1 of 16384); it is damaged: convert or download it again"]


def test_select_refuses_an_out_it_cannot_write(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "base")
    (tmp_path / "a-file").write_text("")
    (line,) = _select_in_a_process(base, tmp_path / "a-file" / "s.json")
    assert line.startswith(f"error: --out {tmp_path / 'a-file' / 's.json'}: cannot write it (")

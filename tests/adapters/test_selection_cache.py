"""Selection once per base: the trainer caches a fresh run's skeleton selection in the user cache
(checkpoints/selection_cache.py) and a later run on the same base and request reuses it; a damaged
entry is refused and selected again. And one process's batched SVDs give each matrix the indices
it gets alone (adapters/distributed_selection.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAST, run_direct

from pmss_dist.adapters import distributed_selection
from pmss_dist.adapters.distributed_selection import select_skeletons
from pmss_dist.adapters.selection import METHODS, select_skeleton
from pmss_dist.checkpoints.selection_cache import SelectionCache
from pmss_dist.models.builtin import write_tiny_checkpoint

RUN = [*FAST, "max_steps=2", "export_merged=false", "log.tensorboard=false"]
REUSED = "reusing skeleton selection from the cache: "
REFUSED = "note: refusing the cached skeleton selection "
SELECTED = "skeleton selection: "  # select_skeletons' progress line, printed whenever it runs (rank 0)


def train(out: Path, cache: Path, *overrides: str):
    return run_direct([*RUN, f"output_dir={out}", *overrides], check=True, PMSS_CACHE_DIR=str(cache))


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "selections").glob("*.json"))


def rehash(doc: dict) -> dict:
    """``doc`` with the SHA-256 the cache stores: of its JSON, keys sorted, without that field."""
    rest = {key: value for key, value in doc.items() if key != "sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    return {**rest, "sha256": hashlib.sha256(canonical).hexdigest()}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> dict:
    """A fresh run on the built-in base with an empty cache: it selects, and caches one entry."""
    root = tmp_path_factory.mktemp("selection-cache")
    proc = train(root / "first", root / "cache")
    assert SELECTED in proc.stderr and REUSED not in proc.stderr
    [entry] = entries(root / "cache")
    return {"out": root / "first", "cache": root / "cache", "entry": entry, "bytes": entry.read_bytes()}


@pytest.fixture
def cache(first, tmp_path) -> Path:
    """A copy of the first run's cache, for a test to use or damage."""
    return Path(shutil.copytree(first["cache"], tmp_path / "cache"))


def cached_entry(first, cache: Path) -> Path:
    return cache / first["entry"].relative_to(first["cache"])


# ---------------------------------------------------------------------------------------------
# The trainer


def test_a_second_run_on_the_same_base_reuses_the_cached_selection(first, cache, tmp_path):
    proc = train(tmp_path / "second", cache)
    entry = cached_entry(first, cache)
    assert [line for line in proc.stderr.splitlines() if "reusing" in line] == [REUSED + str(entry)]
    assert SELECTED not in proc.stderr  # nothing was selected
    assert (tmp_path / "second" / "selection.json").read_bytes() == (first["out"] / "selection.json").read_bytes()
    ours, theirs = adapter(tmp_path / "second"), adapter(first["out"])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert entries(cache) == [entry] and entry.read_bytes() == first["bytes"]


def test_the_run_takes_its_indices_from_the_entry(first, cache, tmp_path):
    # Other valid indices under a recomputed hash: a run that reuses the entry holds them, a run
    # that selected again would not.
    entry = cached_entry(first, cache)
    doc = json.loads(entry.read_text())
    name = sorted(doc["layers"])[0]
    fresh = doc["layers"][name]["rows"]
    doc["layers"][name]["rows"] = other = [i for i in range(64) if i not in fresh][:len(fresh)]
    entry.write_text(json.dumps(rehash(doc)))
    proc = train(tmp_path / "run", cache)
    assert REUSED in proc.stderr and SELECTED not in proc.stderr
    assert json.loads((tmp_path / "run" / "selection.json").read_text())["layers"][name]["rows"] == other != fresh


def test_another_seed_reuses_a_selection_that_draws_nothing_from_it(first, cache, tmp_path):
    proc = train(tmp_path / "seed", cache, "seed=7")  # deim on exact SVDs
    assert REUSED in proc.stderr and SELECTED not in proc.stderr
    ours, theirs = (json.loads((out / "selection.json").read_text()) for out in (tmp_path / "seed", first["out"]))
    assert ours.pop("seed") == 7 and theirs.pop("seed") == 0 and ours == theirs


@pytest.mark.parametrize("change", [["adapter.rank=4", "adapter.alpha=4.0"], ["adapter.method=qdeim"],
                                    ["adapter.targets=[q_proj,v_proj]"], ["adapter.method=random", "seed=3"]],
                         ids=["k", "method", "targets", "the seed of random"])
def test_another_request_is_selected_again_under_its_own_entry(first, cache, tmp_path, change):
    if change[-1] == "seed=3":  # random draws from the seed: seed 3 cannot reuse seed 0's entry
        assert SELECTED in train(tmp_path / "seed0", cache, "adapter.method=random").stderr
    before = entries(cache)
    proc = train(tmp_path / "run", cache, *change)
    assert REUSED not in proc.stderr and SELECTED in proc.stderr
    assert len(entries(cache)) == len(before) + 1 and set(before) < set(entries(cache))


def test_a_changed_base_is_selected_again_under_another_entry(tmp_path):
    base, cache = write_tiny_checkpoint(tmp_path / "base"), tmp_path / "cache"
    one = train(tmp_path / "one", cache, f"model.path={base}")
    assert SELECTED in one.stderr and len(entries(cache)) == 1
    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] += 0.01  # one value
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    two = train(tmp_path / "two", cache, f"model.path={base}")
    assert REUSED not in two.stderr and SELECTED in two.stderr and len(entries(cache)) == 2
    fingerprints = {json.loads((tmp_path / out / "selection.json").read_text())["base_fingerprint"]
                    for out in ("one", "two")}
    assert len(fingerprints) == 2


def _flip(data: bytes) -> bytes:
    at = data.index(b'"rows":[') + 8  # a digit of an index: still JSON, other content
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _out_of_range(data: bytes) -> bytes:
    doc = json.loads(data)
    layer = doc["layers"][sorted(doc["layers"])[0]]
    layer["cols"][-1] = layer["shape"][1]  # one past the last column
    return json.dumps(rehash(doc)).encode()


DAMAGE = {
    "a flipped byte": (_flip, "its SHA-256 does not match its content"),
    "truncated": (lambda data: data[:len(data) // 2], "not valid JSON"),
    "valid JSON, wrong hash": (lambda data: json.dumps({**json.loads(data), "sha256": "0" * 64}).encode(),
                               "its SHA-256 does not match its content"),
    "an index out of range, hash recomputed": (_out_of_range, "has an index outside"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_refused_with_a_note_and_selected_again(first, cache, tmp_path, damage):
    spoil, why = DAMAGE[damage]
    entry = cached_entry(first, cache)
    entry.write_bytes(spoil(first["bytes"]))
    proc = train(tmp_path / "run", cache)
    notes = [line for line in proc.stderr.splitlines() if line.startswith(REFUSED)]
    assert len(notes) == 1 and notes[0].startswith(f"{REFUSED}{entry} (") and why in notes[0], notes
    assert SELECTED in proc.stderr and REUSED not in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "selection.json").read_bytes() == (first["out"] / "selection.json").read_bytes()
    assert entry.read_bytes() == first["bytes"]  # written anew


def test_a_cache_that_cannot_be_written_is_a_note(first, tmp_path):
    (tmp_path / "file").write_text("")
    proc = train(tmp_path / "run", tmp_path / "file" / "cache")
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: cannot cache the skeleton selection")]
    assert len(notes) == 1 and "PMSS_CACHE_DIR" in notes[0] and REFUSED not in proc.stderr, proc.stderr
    assert (tmp_path / "run" / "selection.json").read_bytes() == (first["out"] / "selection.json").read_bytes()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_selection_file_takes_precedence_over_the_cache(first, cache, tmp_path):
    doc = json.loads((first["out"] / "selection.json").read_text())
    name = sorted(doc["layers"])[0]
    doc["layers"][name]["cols"] = list(range(len(doc["layers"][name]["cols"])))
    given = tmp_path / "given.json"
    given.write_text(json.dumps(doc))
    proc = train(tmp_path / "run", cache, f"adapter.selection_file={given}")
    assert f"reusing skeleton selection from {given}" in proc.stderr and REUSED not in proc.stderr
    assert json.loads((tmp_path / "run" / "selection.json").read_text())["layers"] == doc["layers"]
    assert entries(cache) == [cached_entry(first, cache)] and cached_entry(first, cache).read_bytes() == first["bytes"]


# ---------------------------------------------------------------------------------------------
# The cache's key and entries, without a run

SHAPES = {"layers.0.q": (12, 10), "layers.0.up": (20, 10)}
KEY = dict(base_fingerprint="sha256:aaa", dtype="float32", device="cpu", method="deim", k=4, seed=0, svd="auto",
           shapes=SHAPES)


def a_selection() -> dict:
    g = torch.Generator().manual_seed(0)
    return select_skeletons({n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, {n: 4 for n in SHAPES},
                            progress=False)


@pytest.mark.parametrize("change", [dict(base_fingerprint="sha256:bbb"), dict(dtype="bfloat16"), dict(device="cuda"),
                                    dict(method="qdeim"), dict(k=3), dict(shapes={"layers.0.q": (12, 10)}),
                                    dict(svd="randomized")], ids=lambda c: next(iter(c)))
def test_each_input_of_the_indices_has_its_own_entry(change, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMSS_CACHE_DIR", str(tmp_path))
    SelectionCache(**KEY).store(a_selection())
    other = SelectionCache(**{**KEY, **change})
    assert other.path != SelectionCache(**KEY).path and other.load() is None
    assert capsys.readouterr().err == ""  # a miss, not a refusal


def test_the_seed_is_in_the_key_only_where_the_selection_draws_from_it():
    path = lambda **change: SelectionCache(**{**KEY, **change}).path  # noqa: E731
    assert path(seed=5) == path() and path(svd="exact") == path()  # auto is exact at these shapes
    assert path(method="random", seed=5) != path(method="random")
    assert path(svd="randomized", seed=5) != path(svd="randomized")


def test_an_entry_round_trips(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMSS_CACHE_DIR", str(tmp_path))
    selection = a_selection()
    SelectionCache(**KEY).store(selection)
    loaded = SelectionCache(**KEY).load()
    assert {n: [t.tolist() for t in s] for n, s in loaded.items()} == {n: [t.tolist() for t in s]
                                                                        for n, s in selection.items()}
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("spoil,why", [
    (lambda doc, raw: b"[1, 2]", "its SHA-256 does not match"),
    (lambda doc, raw: b"\xff" + raw, "not valid JSON"),
    (lambda doc, raw: json.dumps(rehash({**doc, "cache_key": {**doc["cache_key"], "dtype": "bfloat16"}})).encode(),
     "made for another base"),
    (lambda doc, raw: json.dumps(rehash({**doc, "rank": 3})).encode(), "was made for k (adapter.rank) 3"),
], ids=["not an object", "not UTF-8", "another key, hash recomputed", "another k, hash recomputed"])
def test_a_damaged_entry_is_refused_once(tmp_path, monkeypatch, capsys, spoil, why):
    monkeypatch.setenv("PMSS_CACHE_DIR", str(tmp_path))
    cache = SelectionCache(**KEY)
    cache.store(a_selection())
    raw = cache.path.read_bytes()
    cache.path.write_bytes(spoil(json.loads(raw), raw))
    assert cache.load() is None
    [note] = capsys.readouterr().err.splitlines()
    assert note.startswith(f"{REFUSED}{cache.path} (") and why in note and note.endswith("; selecting again")


def test_a_directory_in_the_entry_s_place_is_refused_and_not_written_through(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMSS_CACHE_DIR", str(tmp_path))
    cache = SelectionCache(**KEY)
    cache.path.mkdir(parents=True)
    assert cache.load() is None and capsys.readouterr().err.startswith(REFUSED)
    cache.store(a_selection())
    assert cache.path.is_dir() and capsys.readouterr().err.startswith("note: cannot cache the skeleton selection")


# ---------------------------------------------------------------------------------------------
# One process's batched SVDs


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapted matrices of the built-in model: 4 blocks of q, k, v, o, gate, up, down, in
    four shapes (q/o, k/v, gate/up, down)."""
    weights = load_file(str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")) / "model.safetensors"))
    return {key.removesuffix(".weight"): w for key, w in weights.items() if key.endswith("_proj.weight")}


@pytest.mark.parametrize("stack_bytes", [distributed_selection.STACK_BYTES, 3 * 8 * 128 * 128], ids=["whole", "split"])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_selection_equals_one_matrix_at_a_time(tiny_weights, method, svd, stack_bytes, monkeypatch):
    stacks, batched = [], distributed_selection.select_same_shape

    def recorded(weights, names, *args, **kwargs):
        stacks.append(len(names))
        return batched(weights, names, *args, **kwargs)

    monkeypatch.setattr(distributed_selection, "select_same_shape", recorded)
    monkeypatch.setattr(distributed_selection, "STACK_BYTES", stack_bytes)
    got = select_skeletons(tiny_weights, {n: 8 for n in tiny_weights}, method, seed=3, svd=svd, progress=False)
    assert sum(stacks) == len(tiny_weights) == 28 and max(stacks) > 1  # batched, every matrix once
    for name, weight in tiny_weights.items():
        rows, cols = select_skeleton(weight, 8, method, seed=3, svd=svd, name=name)
        assert torch.equal(got[name][0], rows) and torch.equal(got[name][1], cols), name

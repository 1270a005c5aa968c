"""Single-process skeleton selection and the selection file, checked against plain-numpy references."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pmss_dist.adapters.selection import (METHODS, deim_indices, load_selection, qdeim_indices, save_selection,
                                 select_skeleton)


def orthonormal(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def matrix_with_svd(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u @ np.diag(s) @ v.T)


def ref_deim(u: np.ndarray) -> list[int]:
    """DEIM as written in Sorensen & Embree (2016), Alg. 1, with explicit selection matrices P."""
    n, k = u.shape
    p = [int(np.argmax(np.abs(u[:, 0])))]
    for j in range(1, k):
        P = np.eye(n)[:, p]  # n x j
        Uj = u[:, :j]
        c = np.linalg.solve(P.T @ Uj, P.T @ u[:, j])
        r = u[:, j] - Uj @ c
        p.append(int(np.argmax(np.abs(r))))
    return p


def ref_pivoted_qr(a: np.ndarray, k: int) -> list[int]:
    """Householder QR with column pivoting (Golub & Van Loan, Alg. 5.4.1), trailing norms recomputed."""
    a = a.copy()
    m, n = a.shape
    perm = list(range(n))
    for j in range(k):
        norms = np.linalg.norm(a[j:, j:], axis=0)
        piv = j + int(np.argmax(norms))
        a[:, [j, piv]] = a[:, [piv, j]]
        perm[j], perm[piv] = perm[piv], perm[j]
        x = a[j:, j]
        v = x.copy()
        v[0] += np.copysign(np.linalg.norm(x), x[0])
        v /= np.linalg.norm(v)
        a[j:, j:] -= 2.0 * np.outer(v, v @ a[j:, j:])
    return perm[:k]


def cur_error(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    c, r = w[:, cols], w[rows, :]
    return float(torch.linalg.norm(w - c @ torch.linalg.pinv(c) @ w @ torch.linalg.pinv(r) @ r))


# ---------------------------------------------------------------------------------------------
# Algorithms against references


def test_deim_on_permuted_diagonal_picks_the_top_singular_positions():
    # W = P diag(s) Q^T with permutations: singular vectors are unit vectors, so DEIM must pick
    # exactly the rows/cols where the k largest singular values sit.
    s = np.array([1.0, 7.0, 3.0, 9.0, 5.0, 2.0])
    w = np.zeros((8, 6))
    row_of = [5, 0, 7, 2, 4, 1]
    col_of = [3, 5, 0, 1, 4, 2]
    for i in range(6):
        w[row_of[i], col_of[i]] = s[i]
    top3 = np.argsort(-s)[:3]
    rows, cols = select_skeleton(torch.from_numpy(w), 3, "deim", svd="exact")
    assert rows.tolist() == sorted(row_of[i] for i in top3)
    assert cols.tolist() == sorted(col_of[i] for i in top3)


@pytest.mark.parametrize("shape,k", [((60, 40), 12), ((35, 80), 9), ((50, 50), 50)])
def test_deim_matches_numpy_reference_on_known_singular_vectors(shape, k):
    rng = np.random.default_rng(1)
    r = min(shape)
    u, v = orthonormal(shape[0], r, rng), orthonormal(shape[1], r, rng)
    w = matrix_with_svd(u, np.linspace(10.0, 1.0, r), v)
    rows, cols = select_skeleton(w, k, "deim", svd="exact")
    assert rows.tolist() == sorted(ref_deim(u[:, :k]))
    assert cols.tolist() == sorted(ref_deim(v[:, :k]))
    # Pick order too, not just the set.
    assert deim_indices(torch.from_numpy(u[:, :k])).tolist() == ref_deim(u[:, :k])


@pytest.mark.parametrize("n,k", [(70, 10), (40, 30), (200, 25)])
def test_qdeim_pivots_match_householder_pivoted_qr(n, k):
    # (n == k would make every row norm 1: pivots decided by rounding, nothing to compare.)
    u = orthonormal(n, k, np.random.default_rng(n + k))
    assert qdeim_indices(torch.from_numpy(u)).tolist() == ref_pivoted_qr(u.T, k)


def test_qdeim_leverage_norm_match_references_through_select_skeleton():
    rng = np.random.default_rng(2)
    u, v = orthonormal(45, 30, rng), orthonormal(30, 30, rng)
    w = matrix_with_svd(u, np.geomspace(50.0, 0.5, 30), v)
    k = 8
    assert select_skeleton(w, k, "qdeim", svd="exact")[0].tolist() == sorted(ref_pivoted_qr(u[:, :k].T, k))
    assert select_skeleton(w, k, "qdeim", svd="exact")[1].tolist() == sorted(ref_pivoted_qr(v[:, :k].T, k))
    lev_rows = np.argsort(-(u[:, :k] ** 2).sum(1), kind="stable")[:k]
    assert select_skeleton(w, k, "leverage", svd="exact")[0].tolist() == sorted(lev_rows.tolist())
    wn = w.numpy()
    rows, cols = select_skeleton(w, k, "norm")
    assert rows.tolist() == sorted(np.argsort(-np.linalg.norm(wn, axis=1), kind="stable")[:k].tolist())
    assert cols.tolist() == sorted(np.argsort(-np.linalg.norm(wn, axis=0), kind="stable")[:k].tolist())


def test_norm_ties_go_to_the_lowest_index():
    w = torch.ones(6, 5)
    rows, cols = select_skeleton(w, 3, "norm")
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [0, 1, 2]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,k", [((37, 29), 7), ((16, 64), 16), ((64, 16), 1), ((33, 33), 33)])
def test_every_method_returns_k_distinct_sorted_in_range_indices(method, shape, k):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    rows, cols = select_skeleton(w, k, method, svd="exact")
    for idx, dim in ((rows, shape[0]), (cols, shape[1])):
        assert idx.dtype == torch.int64 and idx.device.type == "cpu"
        assert idx.numel() == k and idx.unique().numel() == k
        assert torch.equal(idx, idx.sort().values)
        assert 0 <= int(idx.min()) and int(idx.max()) < dim


def test_rank_deficient_weight_still_gives_distinct_indices():
    w = torch.zeros(20, 15, dtype=torch.float64)
    w[3, 4] = 1.0
    for method in METHODS:
        rows, cols = select_skeleton(w, 6, method, svd="exact")
        assert rows.unique().numel() == 6 and cols.unique().numel() == 6, method


def test_low_precision_input_is_selected_on_its_float64_values():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    for method in ("deim", "qdeim", "norm"):
        a = select_skeleton(w, 6, method, svd="exact")
        b = select_skeleton(w.double(), 6, method, svd="exact")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("weight,k,kwargs,needles", [
    (torch.zeros(3, 4, 5), 2, {}, ["2-D", "(3, 4, 5)"]),
    (torch.zeros(10, 6), 0, {}, ["k=0", "[1, 6]"]),
    (torch.zeros(10, 6), 7, {}, ["k=7", "[1, 6]", "(10, 6)"]),
    (torch.zeros(10, 6), 2, {"method": "cur"}, ["'cur'", "deim, qdeim, leverage, norm, random"]),
    (torch.zeros(10, 6), 2, {"svd": "lanczos"}, ["'lanczos'", "auto, exact, randomized"]),
    (torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]]), 1, {}, ["non-finite", "2 "]),
])
def test_bad_requests_raise_clear_errors(weight, k, kwargs, needles):
    with pytest.raises(ValueError) as err:
        select_skeleton(weight, k, name="layers.3.mlp.up_proj", **kwargs)
    msg = str(err.value)
    assert "layers.3.mlp.up_proj" in msg
    for needle in needles:
        assert needle in msg, msg


# ---------------------------------------------------------------------------------------------
# Quality


def test_deim_cur_error_is_within_3x_of_best_rank_k_and_beats_random():
    # Sorensen & Embree bound ||W - CUR|| <= (eta_p + eta_q) sigma_{k+1} is loose (eta grows like
    # 2^k); on low-rank-plus-noise matrices DEIM lands at ~1.9x the SVD's error, so 3x is the
    # documented tolerance.
    k, deim_errs, random_errs = 10, [], []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        f64 = dict(generator=g, dtype=torch.float64)
        w = torch.randn(120, k, **f64) @ torch.randn(k, 90, **f64) + 0.1 * torch.randn(120, 90, **f64)
        best = float(torch.linalg.svdvals(w)[k:].square().sum().sqrt())
        deim_errs.append(cur_error(w, *select_skeleton(w, k, "deim", svd="exact")))
        random_errs.append(cur_error(w, *select_skeleton(w, k, "random", seed=seed)))
        assert deim_errs[-1] <= 3.0 * best, (seed, deim_errs[-1] / best)
    assert np.mean(deim_errs) < np.mean(random_errs)


@pytest.mark.parametrize("method", ["deim", "qdeim", "leverage"])
def test_randomized_svd_gives_the_exact_indices_on_a_decaying_spectrum(method):
    # sigma_i = 0.7^i: the sketch (k + 10 columns, 2 power iterations) resolves the top-k subspace to
    # ~(0.7^11)^5 ~ 1e-8, far below any gap between competing scores.
    rng = np.random.default_rng(5)
    u, v = orthonormal(400, 300, rng), orthonormal(300, 300, rng)
    w = matrix_with_svd(u, 0.7 ** np.arange(300), v)
    exact = select_skeleton(w, 20, method, svd="exact")
    rand = select_skeleton(w, 20, method, svd="randomized", seed=1, name="q_proj")
    assert torch.equal(exact[0], rand[0]) and torch.equal(exact[1], rand[1])


# ---------------------------------------------------------------------------------------------
# Determinism


_SUBPROCESS_SNIPPET = """
import json, torch
from pmss_dist.adapters.selection import METHODS, select_skeleton
w = torch.randn(96, 80, generator=torch.Generator().manual_seed(7))
out = {f"{m}/{s}": [t.tolist() for t in select_skeleton(w, 12, m, svd=s, seed=3, name="layers.0.q_proj")]
       for m in METHODS for s in ("exact", "randomized")}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_indices_are_identical_in_a_separate_process_and_across_calls():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_SNIPPET], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    theirs = json.loads(proc.stdout)
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(7))
    for m in METHODS:
        for s in ("exact", "randomized"):
            ours = [t.tolist() for t in select_skeleton(w, 12, m, svd=s, seed=3, name="layers.0.q_proj")]
            again = [t.tolist() for t in select_skeleton(w, 12, m, svd=s, seed=3, name="layers.0.q_proj")]
            assert ours == again == theirs[f"{m}/{s}"], (m, s)


def test_random_depends_on_seed_and_name_only():
    w = torch.randn(300, 200)
    a = select_skeleton(w, 16, "random", seed=5, name="layers.0.q_proj")
    same = select_skeleton(w * 3, 16, "random", seed=5, name="layers.0.q_proj")
    assert torch.equal(a[0], same[0]) and torch.equal(a[1], same[1])
    other_name = select_skeleton(w, 16, "random", seed=5, name="layers.0.k_proj")
    other_seed = select_skeleton(w, 16, "random", seed=6, name="layers.0.q_proj")
    assert not torch.equal(a[0], other_name[0]) and not torch.equal(a[0], other_seed[0])


# ---------------------------------------------------------------------------------------------
# Selection file


def _some_selections():
    w1, w2 = torch.randn(20, 12), torch.randn(8, 30)
    sel = {"layers.0.q": select_skeleton(w1, 4), "layers.0.o": select_skeleton(w2, 4)}
    return sel, {"layers.0.q": (20, 12), "layers.0.o": (8, 30)}


KEY = dict(method="deim", k=4, seed=0, base_fingerprint="sha256:aaa")


def test_selection_file_round_trip(tmp_path):
    sel, shapes = _some_selections()
    path = tmp_path / "sub" / "selection.json"
    save_selection(path, sel, shapes=shapes, **KEY)
    assert [p.name for p in path.parent.iterdir()] == ["selection.json"]  # no temp file left behind
    doc = json.loads(path.read_text())
    assert doc["layers"]["layers.0.q"]["shape"] == [20, 12]
    for shapes_arg in (shapes, None):
        back = load_selection(path, shapes=shapes_arg, **KEY)
        assert back.keys() == sel.keys()
        for n in sel:
            assert torch.equal(back[n][0], sel[n][0]) and torch.equal(back[n][1], sel[n][1])
            assert back[n][0].dtype == torch.int64


def test_selection_file_with_per_layer_ks_round_trips(tmp_path):
    sel, shapes = _some_selections()
    key = dict(KEY, k={"layers.0.q": 4, "layers.0.o": 4})
    save_selection(tmp_path / "s.json", sel, **key)
    assert load_selection(tmp_path / "s.json", **key).keys() == sel.keys()
    with pytest.raises(ValueError, match=r"k \(adapter.rank\)"):
        load_selection(tmp_path / "s.json", **dict(key, k={"layers.0.q": 4, "layers.0.o": 8}))


@pytest.mark.parametrize("change,needles", [
    ({"base_fingerprint": "sha256:bbb"}, ["base fingerprint 'sha256:aaa'", "'sha256:bbb'", "delete it"]),
    ({"method": "qdeim"}, ["method 'deim'", "'qdeim'"]),
    ({"k": 8}, ["k (adapter.rank) 4", "k (adapter.rank) is 8"]),
    ({"seed": 1}, ["seed 0", "seed is 1"]),
])
def test_mismatched_selection_file_is_refused(tmp_path, change, needles):
    sel, shapes = _some_selections()
    path = tmp_path / "selection.json"
    save_selection(path, sel, shapes=shapes, **KEY)
    with pytest.raises(ValueError) as err:
        load_selection(path, shapes=shapes, **dict(KEY, **change))
    for needle in [str(path)] + needles:
        assert needle in str(err.value), str(err.value)


def test_selection_file_for_other_shapes_or_layers_is_refused(tmp_path):
    sel, shapes = _some_selections()
    path = tmp_path / "selection.json"
    save_selection(path, sel, shapes=shapes, **KEY)
    with pytest.raises(ValueError, match=r"layers\.0\.q of shape \(20, 12\).*\(24, 12\)"):
        load_selection(path, shapes=dict(shapes, **{"layers.0.q": (24, 12)}), **KEY)
    with pytest.raises(ValueError, match=r"missing \[layers\.1\.q\]"):
        load_selection(path, shapes=dict(shapes, **{"layers.1.q": (20, 12)}), **KEY)
    # Saved without shapes: indices are still checked against the caller's shapes.
    save_selection(path, sel, **KEY)
    assert load_selection(path, shapes=shapes, **KEY).keys() == sel.keys()
    with pytest.raises(ValueError, match="outside"):
        load_selection(path, shapes=dict(shapes, **{"layers.0.o": (3, 30)}), **KEY)


def test_missing_or_corrupt_selection_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_selection(tmp_path / "nope.json", **KEY)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_selection(bad, **KEY)
    sel, shapes = _some_selections()
    save_selection(bad, sel, shapes=shapes, **KEY)
    doc = json.loads(bad.read_text())
    doc["layers"]["layers.0.q"]["rows"] = [1, 1, 2, 3]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="repeats"):
        load_selection(bad, **KEY)

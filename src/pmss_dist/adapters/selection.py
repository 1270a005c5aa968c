"""PMSS skeleton selection for one weight matrix, and the selection file.

A skeleton of W (d_out x d_in) is k rows I and k columns J; PMSS trains a k x k core U in
W' = W + s * W[:, J] @ U @ W[I, :]. Every method here is deterministic given (weight, k, seed, name),
so ranks that each compute a selection agree without talking to each other.

All numerics are float64 on CPU whatever the weight's dtype or device: the choices are argmaxes
over small differences, and doing them in one precision on one kind of device keeps the indices
the same for the same weights everywhere.
"""
from __future__ import annotations

import contextlib
import json
import operator
import zlib
from pathlib import Path
from typing import Mapping

import torch

from pmss_dist.errors import SelectionError
from pmss_dist.data.quote import cut, quote
from pmss_dist.data.rows import JSON_ERRORS, json_problem
from pmss_dist.files import atomic_write

METHODS = ("deim", "qdeim", "leverage", "norm", "random")
SVD_MODES = ("auto", "exact", "randomized")

# svd="auto" keeps the exact SVD where it is cheap or where a sketch would not save much.
AUTO_EXACT_MAX_DIM = 1024
AUTO_EXACT_MIN_K_FRACTION = 0.25

# Randomized range finder (Halko, Martinsson & Tropp 2011): sketch width k + max(10, k // 2) and two
# power iterations are enough for the leading singular vectors of weight-like spectra.
POWER_ITERATIONS = 2

_FILE_FORMAT = "pmss_dist.selection"  # the file format's name (it predates the adapters package): never change it
_FILE_VERSION = 1

Selection = tuple[torch.Tensor, torch.Tensor]
_INT64_LIMIT = 2**63  # indices are held as int64


def select_skeleton(weight: torch.Tensor, k: int, method: str = "deim", *, seed: int = 0,
                    svd: str = "auto", name: str = "weight") -> Selection:
    """Return (rows, cols): int64 CPU tensors, each k distinct indices, sorted ascending.
    rows index dim 0 of weight (I, for R = W[I, :]), cols index dim 1 (J, for C = W[:, J])."""
    if _is_dtensor(weight):
        raise TypeError(f"{name}: select_skeleton takes a full tensor, got a DTensor; use "
                        "pmss_dist.adapters.distributed_selection.select_skeletons for sharded weights")
    check_selection_args(tuple(weight.shape), k, method, svd, name)
    k = operator.index(k)
    # .cpu() before the cast so a GPU weight is not first widened to float64 on the GPU.
    w = weight.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise SelectionError(f"{name}: the base checkpoint holds non-finite values (NaN or Inf) in this weight "
                             f"({bad} of {w.numel()}); it is damaged: convert or download it again")

    if method == "norm":
        rows = _top_k(torch.linalg.vector_norm(w, dim=1), k)
        cols = _top_k(torch.linalg.vector_norm(w, dim=0), k)
    elif method == "random":
        gen = _generator(seed, name)
        rows = torch.randperm(w.shape[0], generator=gen)[:k]
        cols = torch.randperm(w.shape[1], generator=gen)[:k]
    else:
        u, v = top_singular_vectors(w, k, svd=svd, seed=seed, name=name)
        pick = PICKERS[method]
        with single_threaded():
            rows, cols = pick(u), pick(v)
    return torch.sort(rows.to(torch.int64)).values, torch.sort(cols.to(torch.int64)).values


def check_selection_args(shape: tuple[int, ...], k: int, method: str, svd: str, name: str) -> None:
    """Everything about a request that can be refused without looking at the weight's values."""
    if len(shape) != 2:
        raise ValueError(f"{name}: weight must be 2-D (d_out, d_in), got shape {tuple(shape)}")
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise ValueError(f"{name}: k must be an int, got {type(k).__name__}")
    limit = min(shape)
    if not 1 <= k <= limit:
        raise ValueError(f"{name}: k={k} is out of range; it must be in [1, min(d_out, d_in)] = "
                         f"[1, {limit}] for weight shape {tuple(shape)}")
    if method not in METHODS:
        raise ValueError(f"{name}: unknown selection method {method!r}; valid methods: {', '.join(METHODS)}")
    if svd not in SVD_MODES:
        raise ValueError(f"{name}: unknown svd mode {svd!r}; valid modes: {', '.join(SVD_MODES)}")


# ---------------------------------------------------------------------------------------------
# Singular vectors


def top_singular_vectors(w: torch.Tensor, k: int, *, svd: str = "auto", seed: int = 0,
                         name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Leading k left (d_out x k) and right (d_in x k) singular vectors of a float64 CPU matrix."""
    if svd == "auto":
        small = min(w.shape) <= AUTO_EXACT_MAX_DIM or k > AUTO_EXACT_MIN_K_FRACTION * min(w.shape)
        svd = "exact" if small else "randomized"
    if svd == "exact":
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
    elif svd == "randomized":
        u, vh = _randomized_svd(w, k, _generator(seed, name))
    else:
        raise ValueError(f"{name}: unknown svd mode {svd!r}; valid modes: {', '.join(SVD_MODES)}")
    return u[:, :k].contiguous(), vh[:k].T.contiguous()


def _randomized_svd(w: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    width = min(k + max(10, k // 2), min(w.shape))
    omega = torch.randn(w.shape[1], width, generator=gen, dtype=w.dtype)
    q = torch.linalg.qr(w @ omega).Q
    # Re-orthonormalising between the half steps keeps the small singular directions from being
    # rounded away (Halko et al., Alg. 4.4).
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(w.T @ q).Q
        q = torch.linalg.qr(w @ q).Q
    ub, _, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    return q @ ub, vh


# ---------------------------------------------------------------------------------------------
# Index pickers: each takes an orthonormal basis (n x k) and returns k distinct row indices.


def deim_indices(basis: torch.Tensor) -> torch.Tensor:
    """DEIM (Chaturantabut & Sorensen 2010; Sorensen & Embree 2016): index j is the largest entry of
    the j-th basis vector's residual after interpolating it at the indices already chosen."""
    n, k = basis.shape
    picked = torch.empty(k, dtype=torch.int64)
    taken = torch.zeros(n, dtype=torch.bool)
    residual = basis[:, 0]
    for j in range(k):
        if j:
            p = picked[:j]
            coef = torch.linalg.solve(basis[p, :j], basis[p, j])
            residual = basis[:, j] - basis[:, :j] @ coef
        # The residual is zero at chosen indices up to rounding; masking makes that exact.
        score = residual.abs().masked_fill(taken, -1.0)
        picked[j] = torch.argmax(score)
        taken[picked[j]] = True
    return picked


def qdeim_indices(basis: torch.Tensor) -> torch.Tensor:
    """Q-DEIM (Drmac & Gugercin 2016): the pivots of QR with column pivoting of basis.T, i.e. greedy
    selection of the row with the largest norm outside the span of the rows already chosen."""
    n, k = basis.shape
    # Squared norm of each row's part orthogonal to the chosen directions. Each new direction is
    # orthogonal to the earlier ones, so a row's component along it is just basis @ direction and
    # the deflated matrix never has to be formed: O(n k) per step instead of rewriting n x k.
    remaining = (basis * basis).sum(dim=1)
    directions = basis.new_zeros(k, k)
    picked = torch.empty(k, dtype=torch.int64)
    taken = torch.zeros(n, dtype=torch.bool)
    for j in range(k):
        p = int(torch.argmax(remaining.masked_fill(taken, -1.0)))
        picked[j] = p
        taken[p] = True
        d, done = basis[p], directions[:j]
        for _ in range(2):  # Gram-Schmidt twice ("twice is enough") keeps directions orthonormal
            d = d - (done @ d) @ done
        directions[j] = d / torch.linalg.vector_norm(d)
        remaining -= (basis @ directions[j]).square()
    return picked


def leverage_indices(basis: torch.Tensor) -> torch.Tensor:
    """The k largest leverage scores (squared row norms of the basis)."""
    return _top_k((basis * basis).sum(dim=1), basis.shape[1])


PICKERS = {"deim": deim_indices, "qdeim": qdeim_indices, "leverage": leverage_indices}


@contextlib.contextmanager
def single_threaded():
    """The pickers are k sequential steps of small matrix-vector work, where OpenMP fork/join costs
    more than it saves: 0.3 s on one thread vs 1.5-12 s on two busy cores for 11008 x 256."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    # torch.topk's order among ties is unspecified; a stable sort keeps the lowest index first.
    return torch.argsort(scores, descending=True, stable=True)[:k]


def _generator(seed: int, name: str) -> torch.Generator:
    # crc32, not hash(): str hashes are salted per process, and every rank must draw the same.
    # The CPU generator keeps only 32 bits of its seed, so seed and name are mixed into 32 bits;
    # crc32 is a bijection of its start value, so two seeds (mod 2**32) never collide for a name.
    return torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8"), int(seed) % (1 << 32)))


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


# ---------------------------------------------------------------------------------------------
# Selection file


def save_selection(path, selections: Mapping[str, Selection], *, method: str, k: int | dict,
                   seed: int, base_fingerprint: str,
                   shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Write the selection as JSON, atomically (a reader never sees a half-written file).
    ``k`` is the skeleton size (one int, or per layer). ``shapes`` (layer -> weight shape) is
    stored so a later load can refuse another model."""
    layers = {}
    for name in sorted(selections):
        rows, cols = selections[name]
        shape = shapes.get(name) if shapes is not None else None
        layers[name] = {"shape": [int(d) for d in shape] if shape is not None else None,
                        "rows": [int(i) for i in torch.as_tensor(rows).tolist()],
                        "cols": [int(i) for i in torch.as_tensor(cols).tolist()]}
    # The file keeps k under the key "rank" (its name before k was called k), so that files
    # written before still load.
    doc = {"format": _FILE_FORMAT, "version": _FILE_VERSION, "method": method,
           "rank": _json_k(k), "seed": int(seed), "base_fingerprint": base_fingerprint,
           "layers": layers}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, separators=(",", ":"))))


def load_selection(path, *, method: str, k: int | dict, seed: int, base_fingerprint: str,
                   shapes: Mapping[str, tuple[int, int]] | None = None,
                   header_fingerprint: str | None = None) -> dict[str, Selection]:
    """Read a selection file, refusing one made for another base, method, k, seed or model, and
    any entry that is not k distinct in-range indices per side (`SelectionError`, naming the file
    and the layer). A file written before content fingerprints records the base's header
    fingerprint (``checkpoints.fingerprint.header_fingerprint``): it is accepted when it equals ``header_fingerprint``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selection file {path} does not exist")
    hint = "delete it or point selection_file elsewhere"
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise SelectionError(f"selection file {path} is not valid JSON ({e}); {hint}") from None
    except JSON_ERRORS as e:
        raise SelectionError(f"selection file {path} is not valid JSON ({json_problem(e)}); {hint}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FILE_FORMAT:
        raise SelectionError(f"{path} is not a pmss_dist selection file")
    if doc.get("version") != _FILE_VERSION:
        raise SelectionError(f"selection file {path} has format version {quote(doc.get('version'))}, "
                             f"this code reads version {_FILE_VERSION}")

    if header_fingerprint is not None and doc.get("base_fingerprint") == header_fingerprint:
        base_fingerprint = header_fingerprint  # an older file: the base is checked by its headers
    expected = {"base fingerprint": ("base_fingerprint", base_fingerprint), "method": ("method", method),
                "k (adapter.rank)": ("rank", _json_k(k)), "seed": ("seed", int(seed))}
    for what, (key, want) in expected.items():
        if doc.get(key) != want:
            raise SelectionError(f"selection file {path} was made for {what} {quote(doc.get(key))}, "
                                 f"this run's {what} is {want!r}; {hint}")

    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise SelectionError(f"selection file {path} has no 'layers' table")
    if shapes is not None:
        missing = sorted(set(shapes) - set(layers))
        extra = sorted(set(layers) - set(shapes))
        if missing or extra:
            raise SelectionError(f"selection file {path} covers other layers than this model: missing "
                                 f"{_few(missing)}, not in the model {_few(extra)}; {hint}")

    out = {}
    for name, entry in layers.items():
        where = f"selection file {path}: {cut(name)}"
        if not isinstance(entry, dict):
            raise SelectionError(f"{where} must be an object with rows and cols, got {quote(entry)}; {hint}")
        stored = _shape(where, entry.get("shape"))
        want = tuple(shapes[name]) if shapes is not None else None
        if want is not None and stored is not None and stored != want:
            raise SelectionError(f"selection file {path} was made for {cut(name)} of shape {stored}, this "
                                 f"model's is {want}; {hint}")
        size = _json_k(k).get(name) if isinstance(k, Mapping) else k
        if size is None:
            raise SelectionError(f"{where}: this run gives no k for the layer; {hint}")
        rows, cols = entry.get("rows"), entry.get("cols")
        for label, idx, dim in (("rows", rows, 0), ("cols", cols, 1)):
            _check_indices(f"{where}.{label}", idx, size, (want or stored or (None, None))[dim])
        out[name] = (torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64))
    return out


def _shape(where: str, shape) -> tuple[int, int] | None:
    """A layer's stored weight shape: null, or two positive integers."""
    if shape is None:
        return None
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
        raise SelectionError(f"{where}.shape must be null or two positive integers, got {quote(shape)}")
    return tuple(shape)


def _check_indices(where: str, idx, k: int, bound: int | None) -> None:
    """``k`` distinct indices into ``bound`` rows or columns (``None``: a file saved without shapes,
    for a caller that gave none: then any int64)."""
    if not isinstance(idx, list) or not all(_is_int(i) for i in idx):
        raise SelectionError(f"{where} must be a list of integers, got {quote(idx)}")
    if len(idx) != k:
        raise SelectionError(f"{where} has {len(idx)} indices, k is {k}")
    if len(set(idx)) != len(idx):
        raise SelectionError(f"{where} repeats an index")
    limit = bound if bound is not None else _INT64_LIMIT
    if not all(0 <= i < limit for i in idx):
        raise SelectionError(f"{where} has an index outside [0, {limit})"
                             + (" for the layer's weight" if bound is not None else " (the file records no shape)"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false load as bools, which are ints


def _json_k(k):
    # JSON object keys are strings; normalise so a saved dict compares equal to the caller's.
    if isinstance(k, Mapping):
        return {str(name): int(v) for name, v in sorted(k.items())}
    return int(k)


def _few(names: list[str], n: int = 3) -> str:
    return "[]" if not names else "[" + ", ".join(map(cut, names[:n])) + (", ..." if len(names) > n else "") + "]"

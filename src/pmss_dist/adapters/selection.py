"""PMSS skeleton selection for one weight matrix (or a stack of equal shapes), and the selection file.

A skeleton of W (d_out x d_in) is k rows I and k columns J; PMSS trains a k x k core U in
W' = W + s * W[:, J] @ U @ W[I, :]. Every method here is deterministic given (weight, k, seed, name),
so ranks that each compute a selection agree without talking to each other.

All numerics are float64 whatever the weight's dtype: the choices are argmaxes over small
differences. The SVDs (and `norm`'s norms) run on the weights' device, the one heavy step; the
index pickers, k small sequential steps each, run on CPU. The indices are the same for the same
weights in every process on the same kind of device.
"""
from __future__ import annotations

import contextlib
import json
import operator
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import torch

from pmss_dist.errors import SelectionError
from pmss_dist.data.quote import cut, quote
from pmss_dist.data.rows import JSON_ERRORS, json_problem
from pmss_dist.files import atomic_write

METHODS = ("deim", "qdeim", "leverage", "norm", "random")
SVD_MODES = ("auto", "exact", "randomized")
# Bump when a change here gives other indices for the same weights and request: selections cached
# by an earlier version (checkpoints.selection_cache) are then not reused.
INDICES_VERSION = 1

# svd="auto" keeps the exact SVD where it is cheap or where a sketch would not save much.
AUTO_EXACT_MAX_DIM = 1024
AUTO_EXACT_MIN_K_FRACTION = 0.25

# Randomized range finder (Halko, Martinsson & Tropp 2011): sketch width k + max(10, k // 2) and two
# power iterations are enough for the leading singular vectors of weight-like spectra.
POWER_ITERATIONS = 2

_FILE_FORMAT = "pmss_dist.selection"  # the file format's name (it predates the adapters package): never change it
_FILE_VERSION = 1

_HINT = "; delete it or point selection_file elsewhere"  # how a user fixes a file that is refused

Selection = tuple[torch.Tensor, torch.Tensor]
_INT64_LIMIT = 2**63  # indices are held as int64


def select_skeleton(weight: torch.Tensor, k: int, method: str = "deim", *, seed: int = 0,
                    svd: str = "auto", name: str = "weight") -> Selection:
    """Return (rows, cols): int64 CPU tensors, each k distinct indices, sorted ascending.
    rows index dim 0 of weight (I, for R = W[I, :]), cols index dim 1 (J, for C = W[:, J])."""
    return select_same_shape([weight], [name], k, method, seed=seed, svd=svd)[0]


def select_same_shape(weights: Sequence[torch.Tensor], names: Sequence[str], k: int, method: str = "deim", *,
                      seed: int = 0, svd: str = "auto") -> list[Selection]:
    """`select_skeleton` of each of ``weights`` (named ``names``), matrices of one shape on one
    device, their SVDs stacked into one batched call there: each gets the indices it gets alone."""
    for w, name in zip(weights, names, strict=True):
        if _is_dtensor(w):
            raise TypeError(f"{name}: select_skeleton takes a full tensor, got a DTensor; use "
                            "pmss_dist.adapters.distributed_selection.select_skeletons for sharded weights")
        check_selection_args(tuple(w.shape), k, method, svd, name)
        if w.shape != weights[0].shape:
            raise ValueError(f"{name}: select_same_shape takes matrices of one shape, got {tuple(w.shape)} and "
                             f"{tuple(weights[0].shape)}")
    k = operator.index(k)
    w = _float64_stack(weights, names)
    if method == "norm":
        scores = [(torch.linalg.vector_norm(m, dim=1).cpu(), torch.linalg.vector_norm(m, dim=0).cpu()) for m in w]
        picked = [(_top_k(rows, k), _top_k(cols, k)) for rows, cols in scores]
    elif method == "random":
        gens = [_generator(seed, name) for name in names]
        picked = [(torch.randperm(w.shape[1], generator=g)[:k], torch.randperm(w.shape[2], generator=g)[:k])
                  for g in gens]
    else:
        u, v = top_singular_vectors(w, k, svd=svd, seed=seed, names=names)
        u, v = u.cpu(), v.cpu()
        pick = PICKERS[method]
        with single_threaded():
            picked = [(pick(u[i].contiguous()), pick(v[i].contiguous())) for i in range(len(names))]
    return [(torch.sort(rows.to(torch.int64)).values, torch.sort(cols.to(torch.int64)).values)
            for rows, cols in picked]


def _float64_stack(weights: Sequence[torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The weights as one float64 tensor (count x d_out x d_in) on their device, refusing
    non-finite values by the weight's name."""
    w = torch.empty((len(weights), *weights[0].shape), dtype=torch.float64, device=weights[0].device)
    for i, weight in enumerate(weights):
        w[i].copy_(weight.detach())
    bad = (~torch.isfinite(w)).sum(dim=(1, 2)).tolist()
    for name, count in zip(names, bad):
        if count:
            raise SelectionError(f"{name}: the base checkpoint holds non-finite values (NaN or Inf) in this weight "
                                 f"({count} of {w[0].numel()}); it is damaged: convert or download it again")
    return w


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


def selection_inputs(shape: tuple[int, int], k: int, method: str, svd: str, seed: int) -> dict:
    """What a matrix's indices depend on besides its values, its name and the device of its SVD:
    ``svd`` resolved ("auto" is "exact" or "randomized"), and each of ``svd`` and ``seed`` None
    where the method does not use it."""
    svd = resolved_svd(shape, k, svd) if method in PICKERS else None
    draws = method == "random" or svd == "randomized"
    return {"shape": [int(d) for d in shape], "k": int(k), "method": method, "svd": svd,
            "seed": int(seed) if draws else None}


# ---------------------------------------------------------------------------------------------
# Singular vectors


def resolved_svd(shape: tuple[int, int], k: int, svd: str) -> str:
    """The SVD ``svd`` runs for a k-skeleton of a matrix of ``shape``: "exact" or "randomized"."""
    if svd != "auto":
        return svd
    small = min(shape) <= AUTO_EXACT_MAX_DIM or k > AUTO_EXACT_MIN_K_FRACTION * min(shape)
    return "exact" if small else "randomized"


def top_singular_vectors(w: torch.Tensor, k: int, *, svd: str = "auto", seed: int = 0,
                         names: Sequence[str] = ("weight",)) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading k left (count x d_out x k) and right (count x d_in x k) singular vectors of a stack
    of float64 matrices (count x d_out x d_in), one name each (it seeds a randomized sketch)."""
    svd = resolved_svd(tuple(w.shape[1:]), k, svd)
    if svd == "exact":
        # One call for the stack: torch runs the same routine on each matrix of a batch as on one
        # alone (LAPACK's gesdd on CPU; cuSOLVER's gesvdj, chosen by shape, on CUDA): the same bits.
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
    elif svd == "randomized":
        gens = [_generator(seed, name) for name in names]
        if w.device.type == "cpu":  # batched GEMMs and QRs loop over the matrices: the same bits
            u, vh = _randomized_svd(w, k, gens)
        else:
            # A GPU's batched GEMM and QR kernels are not its one-matrix kernels and may round
            # differently, so there each matrix is sketched alone.
            parts = [_randomized_svd(w[i:i + 1], k, gens[i:i + 1]) for i in range(len(gens))]
            u, vh = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        raise ValueError(f"{names[0]}: unknown svd mode {svd!r}; valid modes: {', '.join(SVD_MODES)}")
    return u[..., :k], vh[..., :k, :].mT


def _randomized_svd(w: torch.Tensor, k: int, gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    width = min(k + max(10, k // 2), min(w.shape[1:]))
    # Drawn on CPU, one generator per matrix: the same sketch whatever the device and batch.
    omega = torch.stack([torch.randn(w.shape[2], width, generator=g, dtype=w.dtype) for g in gens]).to(w.device)
    q = torch.linalg.qr(w @ omega).Q
    # Re-orthonormalising between the half steps keeps the small singular directions from being
    # rounded away (Halko et al., Alg. 4.4).
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(w.mT @ q).Q
        q = torch.linalg.qr(w @ q).Q
    ub, _, vh = torch.linalg.svd(q.mT @ w, full_matrices=False)
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
    doc = selection_doc(selections, method=method, k=k, seed=seed, base_fingerprint=base_fingerprint, shapes=shapes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, separators=(",", ":"))))


def selection_doc(selections: Mapping[str, Selection], *, method: str, k: int | dict, seed: int,
                  base_fingerprint: str, shapes: Mapping[str, tuple[int, int]] | None = None) -> dict:
    """The JSON object of a selection file (`save_selection`)."""
    layers = {}
    for name in sorted(selections):
        rows, cols = selections[name]
        shape = shapes.get(name) if shapes is not None else None
        layers[name] = {"shape": [int(d) for d in shape] if shape is not None else None,
                        "rows": [int(i) for i in torch.as_tensor(rows).tolist()],
                        "cols": [int(i) for i in torch.as_tensor(cols).tolist()]}
    # The file keeps k under the key "rank" (its name before k was called k), so that files
    # written before still load.
    return {"format": _FILE_FORMAT, "version": _FILE_VERSION, "method": method,
            "rank": _json_k(k), "seed": int(seed), "base_fingerprint": base_fingerprint,
            "layers": layers}


def load_selection(path, *, method: str, k: int | dict, seed: int, base_fingerprint: str,
                   shapes: Mapping[str, tuple[int, int]] | None = None,
                   header_fingerprint: str | None = None) -> dict[str, Selection]:
    """Read a selection file, refusing one made for another base, method, k, seed or model, and
    any entry that is not k distinct in-range indices per side (`SelectionError`, naming the file
    and the layer). A file written before content fingerprints records the base's header
    fingerprint (``checkpoints.fingerprint.header_fingerprint``): it is accepted when it equals
    ``header_fingerprint``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selection file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise SelectionError(f"selection file {path} is not valid JSON ({e}){_HINT}") from None
    except JSON_ERRORS as e:
        raise SelectionError(f"selection file {path} is not valid JSON ({json_problem(e)}){_HINT}") from None
    return selection_from_doc(doc, path, method=method, k=k, seed=seed, base_fingerprint=base_fingerprint,
                              shapes=shapes, header_fingerprint=header_fingerprint)


def selection_from_doc(doc, path, *, method: str, k: int | dict, seed: int, base_fingerprint: str,
                       shapes: Mapping[str, tuple[int, int]] | None = None, header_fingerprint: str | None = None,
                       hint: str = _HINT) -> dict[str, Selection]:
    """`load_selection` of a file already parsed: ``doc`` is its JSON, ``path`` names it in the
    errors, ``hint`` ends those that a user can fix."""
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
                                 f"this run's {what} is {want!r}{hint}")

    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise SelectionError(f"selection file {path} has no 'layers' table")
    if shapes is not None:
        missing = sorted(set(shapes) - set(layers))
        extra = sorted(set(layers) - set(shapes))
        if missing or extra:
            raise SelectionError(f"selection file {path} covers other layers than this model: missing "
                                 f"{_few(missing)}, not in the model {_few(extra)}{hint}")

    out = {}
    for name, entry in layers.items():
        where = f"selection file {path}: {cut(name)}"
        if not isinstance(entry, dict):
            raise SelectionError(f"{where} must be an object with rows and cols, got {quote(entry)}{hint}")
        stored = _shape(where, entry.get("shape"))
        want = tuple(shapes[name]) if shapes is not None else None
        if want is not None and stored is not None and stored != want:
            raise SelectionError(f"selection file {path} was made for {cut(name)} of shape {stored}, this "
                                 f"model's is {want}{hint}")
        size = _json_k(k).get(name) if isinstance(k, Mapping) else k
        if size is None:
            raise SelectionError(f"{where}: this run gives no k for the layer{hint}")
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

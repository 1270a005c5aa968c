"""Skeleton selection for all PMSS layers of a model whose weights may be FSDP2 shards.

Design (see docs/SELECTION.md): the layers, largest first, are dealt round-robin to the ranks in
rounds of N. In each round every rank sends its shard of each layer to that layer's owner (one
``dist.gather`` per layer), each owner reassembles its one full matrix, runs ``select_skeleton`` on
it exactly as a single process would, and frees it. A round lasts as long as its slowest layer, so
dealing by size puts layers of equal cost in the same round. At the end the indices
are exchanged so every rank has all of them. The indices therefore do not depend on the world size,
and no rank holds more than one full matrix at a time beyond its own shards.

One process (or a world of one) selects the layers of one shape in stacks, one batched SVD each
(``select_same_shape``), which gives every matrix the indices it gets alone.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from pmss_dist.adapters.selection import (Selection, SelectionError, _is_dtensor, check_selection_args,
                                          select_same_shape, select_skeleton)

PROGRESS_EVERY_S = 10.0
# One process selects the layers of one shape with one batched SVD per stack of this many bytes
# of float64 matrices: its SVD and workspace then take a few times that beside the model.
STACK_BYTES = 256 << 20


def select_skeletons(weights: Mapping[str, torch.Tensor], ks: Mapping[str, int], method: str = "deim", *,
                     seed: int = 0, svd: str = "auto", process_group=None, progress: bool = True,
                     original: Callable[[str], torch.Tensor] | None = None) -> dict[str, Selection]:
    """Return {name: (rows, cols)}, ``ks[name]`` of each, for every weight, identical on every rank
    and for every world size. Weights are DTensors placed Shard(0), Shard(1) or Replicate on a 1-D
    mesh, or on the shard dimension of an HSDP mesh (each replica group then selects the same
    indices on its own), or plain tensors (a replicated base: the layers are dealt over the
    process group, no weight moves). Collective when a process group is up: every rank must call
    this with the same names. Progress goes to stderr on rank 0 when ``progress``.

    ``original``: for weights stored quantized, name -> the unquantized weight in the same layout,
    called once per layer when its round comes (so one round's worth is in memory at a time);
    ``weights`` then only give shapes and placements."""
    original = original or weights.__getitem__
    names = sorted(weights)
    missing = [n for n in names if n not in ks]
    if missing:
        raise ValueError(f"no k given for {len(missing)} layer(s), e.g. {missing[:3]}")
    # Refuse what can be refused before any collective, so every rank raises the same error.
    for n in names:
        check_selection_args(tuple(weights[n].shape), ks[n], method, svd, n)

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return _select_local(weights, original, ks, names, method, seed, svd, progress)
    return _select_distributed(weights, original, ks, names, method, seed, svd, process_group, progress)


def _select_local(weights, original, ks, names, method, seed, svd, progress) -> dict[str, Selection]:
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    meter = _Progress(len(names), enabled=progress and main)
    out = {}
    for group in _stacks(weights, ks, names):
        # A world of one: a shard is the whole tensor. The SVDs run where the model's weights are
        # (a quantized base's original weights are read into host memory).
        full = [_whole(original(n)).to(weights[n].device) for n in group]
        out.update(zip(group, select_same_shape(full, group, ks[group[0]], method, seed=seed, svd=svd)))
        del full
        meter.update(len(out))
    return out


def _whole(w: torch.Tensor) -> torch.Tensor:
    return w.full_tensor() if _is_dtensor(w) else w


def _stacks(weights, ks, names) -> list[list[str]]:
    """The layers in groups of one shape and k, name order, of at most `STACK_BYTES` in float64
    (or one layer): one batched SVD each."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault((tuple(weights[n].shape), ks[n]), []).append(n)
    stacks = []
    for (shape, _), group in groups.items():
        size = max(1, STACK_BYTES // (8 * shape[0] * shape[1]))
        stacks += [group[i:i + size] for i in range(0, len(group), size)]
    return stacks


def _select_distributed(weights, original, ks, names, method, seed, svd, process_group,
                        progress) -> dict[str, Selection]:
    group = _group_of(weights, process_group)
    world, me = dist.get_world_size(group), dist.get_rank(group)
    layouts = {n: _layout(n, weights[n]) for n in names}

    # One small exchange up front: every rank learns every shard's length, and a rank whose layer
    # names or layouts differ is found here, on all ranks, instead of hanging a gather later.
    mine = {n: (tuple(weights[n].shape), lay[0], lay[1]) for n, lay in layouts.items()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    for r, theirs in enumerate(everyone):
        if theirs.keys() != mine.keys() or any(theirs[n][:2] != mine[n][:2] for n in names):
            raise ValueError(f"select_skeletons: rank {r} passed different layer names, shapes or "
                             f"placements than rank {me}; every rank must pass the same layers")
    shard_lengths = {n: [everyone[r][n][2] for r in range(world)] for n in names}

    meter = _Progress(len(names), enabled=progress and dist.get_rank() == 0)  # one line per job, not per replica
    results: dict[str, tuple[list[int], list[int]]] = {}
    failures: dict[str, tuple[bool, str]] = {}  # layer -> (the input's fault, message)
    schedule = sorted(names, key=lambda n: (-_svd_cost(weights[n].shape), n))
    for start in range(0, len(schedule), world):
        batch = schedule[start:start + world]
        full = _receive_round(batch, original, layouts, shard_lengths, me, group)
        if full is not None:
            n = batch[me]
            # A failure keeps this rank in the collectives; it is raised on every rank at the end.
            try:
                rows, cols = select_skeleton(full, ks[n], method, seed=seed, svd=svd, name=n)
                results[n] = (rows.tolist(), cols.tolist())
            except SelectionError as e:
                failures[n] = (True, str(e))
            except (ValueError, RuntimeError) as e:
                failures[n] = (False, f"{type(e).__name__}: {e}")
            del full
        meter.update(min(start + world, len(names)))

    gathered: list = [None] * world
    dist.all_gather_object(gathered, (results, failures), group=group)
    merged = {k: v for part, _ in gathered for k, v in part.items()}
    failed = {k: v for _, part in gathered for k, v in sorted(part.items())}
    if failed:
        raise _failure(failed)
    return {n: (torch.tensor(merged[n][0], dtype=torch.int64), torch.tensor(merged[n][1], dtype=torch.int64))
            for n in names}


def _failure(failed: dict[str, tuple[bool, str]]) -> Exception:
    """One error for the layers that failed, the same on every rank: a `SelectionError` (one line
    for the user) when each was refused for its input, else a ValueError (a bug, with its traceback)."""
    messages = [message for _, message in failed.values()]
    if all(refused for refused, _ in failed.values()):
        more = f" (and {len(messages) - 1} more layer(s))" if len(messages) > 1 else ""
        return SelectionError(messages[0] + more)
    return ValueError(f"skeleton selection failed for {len(messages)} layer(s): " + "; ".join(messages[:3]))


def _svd_cost(shape) -> int:
    """Relative cost of selecting one matrix: an SVD of an m x n matrix takes O(m n min(m, n))."""
    m, n = shape
    return m * n * min(m, n)


def _group_of(weights, process_group):
    """The process group the shards of the DTensors are spread over (their mesh, or its shard
    dimension); the default group for plain tensors; a given ``process_group`` must span the same
    ranks."""
    mesh_ranks, group = None, None
    for n, w in sorted(weights.items()):
        if not _is_dtensor(w):
            continue
        mesh, dim = w.device_mesh, _shard_dim(n, w)
        r = mesh.mesh.flatten().tolist()
        if mesh_ranks is None:
            mesh_ranks, group = r, mesh.get_group(dim)
        elif r != mesh_ranks:
            raise ValueError(f"{n}: all DTensors must live on the same device mesh ({mesh_ranks} vs {r})")
    if mesh_ranks is None:  # plain tensors: every rank holds every weight
        return process_group
    mesh_ranks = dist.get_process_group_ranks(group)
    if process_group is not None:
        given = dist.get_process_group_ranks(process_group)
        if given != mesh_ranks:
            raise ValueError(f"process_group spans ranks {given} but the weights' mesh spans {mesh_ranks}")
        group = process_group
    return group


def _shard_dim(name, w) -> int:
    """The mesh dimension a DTensor is split over (0 when it is replicated everywhere)."""
    from torch.distributed.tensor import Replicate

    split = [i for i, p in enumerate(w.placements) if not isinstance(p, Replicate)]
    if len(split) > 1:
        raise ValueError(f"{name}: select_skeletons supports a DTensor split over one mesh dimension, got "
                         f"placements {w.placements}")
    return split[0] if split else 0


def _layout(name, w) -> tuple[str, int]:
    """(placement, local length along the sharded dim): placement is 'shard0', 'shard1' or 'full'."""
    if not _is_dtensor(w):
        return "full", 0  # a plain tensor is taken as a full copy on every rank
    from torch.distributed.tensor import Replicate, Shard

    placement = w.placements[_shard_dim(name, w)]
    if isinstance(placement, Replicate):
        return "full", 0
    if isinstance(placement, Shard):
        dim = placement.dim % 2
        return f"shard{dim}", w.to_local().shape[dim]
    raise ValueError(f"{name}: select_skeletons supports Shard(0), Shard(1) and Replicate "
                     f"placements, got {placement}")


def _receive_round(batch, original, layouts, shard_lengths, me, group):
    """Collective: layer batch[j] goes to rank j. Returns this rank's full matrix (None if it owns
    none this round); a function of its own so no stray reference keeps a matrix alive."""
    full = None
    for owner, n in enumerate(batch):
        received = gather_to_owner(original(n), layouts[n][0], shard_lengths[n], owner, me, group)
        if owner == me:
            full = received
    return full


def gather_to_owner(w, placement: str, lengths: list[int], owner: int, me: int, group):
    """Collective over ``group``: return the full matrix on rank ``owner`` (None elsewhere)."""
    if placement == "full":
        if me != owner:
            return None
        return w.to_local() if _is_dtensor(w) else w
    local = w.to_local().detach()
    # Shard(1) travels as the transposed Shard(0) problem: rows of local.T are the columns of W.
    if placement == "shard1":
        local = local.T
    pad = max(lengths)
    # gather needs equal sizes: uneven shards (d_out % N != 0, even empty ones) are zero-padded.
    if local.shape[0] == pad and local.is_contiguous():
        send = local
    else:
        send = local.new_zeros((pad, local.shape[1]))
        send[:local.shape[0]] = local
    dst = dist.get_global_rank(group, owner)
    if me != owner:
        dist.gather(send, None, dst=dst, group=group)
        return None
    buf = send.new_empty((len(lengths), pad, send.shape[1]))
    dist.gather(send, list(buf.unbind(0)), dst=dst, group=group)
    full = torch.cat([buf[r, :n] for r, n in enumerate(lengths)])
    return full.T if placement == "shard1" else full


class _Progress:
    """Layers done / total and rate, to stderr, at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and total > 0
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < self.total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"skeleton selection: {done}/{self.total} layers, {rate:.2f} layers/s, "
              f"{now - self.start:.0f}s elapsed, eta {eta:.0f}s", file=sys.stderr, flush=True)

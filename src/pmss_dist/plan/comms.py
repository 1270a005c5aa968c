"""Collective bytes: every collective the real training code calls, on which process group, and how
many bytes it moves.

`CollectiveRecorder` is a dispatch mode: FSDP2's all-gathers and reduce-scatters, the adapters'
all-reduce (`parallel.grads.all_reduce_grads`), the step's small all-reduces and DTensor's
functional collectives all reach the dispatcher as ``c10d`` / ``_c10d_functional`` ops, whatever
backend runs them. Under the fake process group they move nothing; the record is what they would
move on real devices.

A collective's *payload* is the size of its whole tensor: an all-gather's output, a
reduce-scatter's input, an all-reduce's buffer. A group whose ranks sit on more than one node
crosses nodes (ranks are numbered node by node, as torchrun and srun number them).

What one GPU sends over each link follows from the payload ``P`` with the hierarchical (two-level)
algorithms NCCL runs on multi-node groups: for a group of ``m`` GPUs on each of ``k`` nodes, a GPU
sends ``f·(m-1)/m·P`` over the intra-node links and ``f·(k-1)/k·P/m`` over its own inter-node NIC
(each node's share of the traffic between nodes is spread over its ``m`` NICs), with ``f = 1`` for
an all-gather or a reduce-scatter and ``f = 2`` for an all-reduce (reduce-scatter + all-gather).
On one node this is the ring's ``f·(n-1)/n·P``; with one GPU per node, the ring between nodes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, BROADCAST, OTHER = "all_gather", "reduce_scatter", "all_reduce", "broadcast", "other"
KINDS = (ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, BROADCAST, OTHER)

_c10d = torch.ops.c10d
_funcol = torch.ops._c10d_functional
# c10d op -> (kind, which argument holds the payload tensor(s)).
_C10D_OPS = {
    _c10d._allgather_base_.default: (ALL_GATHER, 0),
    _c10d.allgather_into_tensor_coalesced_.default: (ALL_GATHER, 0),
    _c10d.allgather_.default: (ALL_GATHER, 0),
    _c10d._reduce_scatter_base_.default: (REDUCE_SCATTER, 1),
    _c10d.reduce_scatter_tensor_coalesced_.default: (REDUCE_SCATTER, 1),
    _c10d.reduce_scatter_.default: (REDUCE_SCATTER, 1),
    _c10d.allreduce_.default: (ALL_REDUCE, 0),
    _c10d.allreduce_coalesced_.default: (ALL_REDUCE, 0),
    _c10d.broadcast_.default: (BROADCAST, 0),
}
# Functional collectives (DTensor): (kind, payload multiplier is the group size for all-gathers).
_FUNCOL_OPS = {
    _funcol.all_reduce.default: ALL_REDUCE,
    _funcol.all_reduce_coalesced.default: ALL_REDUCE,
    _funcol.all_gather_into_tensor.default: ALL_GATHER,
    _funcol.all_gather_into_tensor_coalesced.default: ALL_GATHER,
    _funcol.reduce_scatter_tensor.default: REDUCE_SCATTER,
    _funcol.reduce_scatter_tensor_coalesced.default: REDUCE_SCATTER,
    _funcol.broadcast.default: BROADCAST,
}


@dataclass(frozen=True)
class Collective:
    kind: str
    payload: int  # bytes: an all-gather's output, a reduce-scatter's input, an all-reduce's buffer
    ranks: tuple[int, ...]  # the process group's global ranks

    @property
    def group_size(self) -> int:
        return len(self.ranks)

    def wire_bytes(self, gpus_per_node: int) -> tuple[float, float]:
        """``(intra-node, inter-node)`` bytes one GPU of the group sends (hierarchical algorithms)."""
        nodes = len({r // gpus_per_node for r in self.ranks})
        per_node = self.group_size / nodes
        factor = {ALL_GATHER: 1.0, REDUCE_SCATTER: 1.0, ALL_REDUCE: 2.0}.get(self.kind, 1.0)
        return (factor * (per_node - 1) / per_node * self.payload,
                factor * (nodes - 1) / nodes * self.payload / per_node)

    def crosses_nodes(self, gpus_per_node: int) -> bool:
        return len({r // gpus_per_node for r in self.ranks}) > 1


def _nbytes(value) -> int:
    tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


class CollectiveRecorder(TorchDispatchMode):
    """Records the collectives called under it, in order, as `Collective`s. ``groups``: the
    process groups functional collectives may name (they pass a group's name, not the group)."""

    def __init__(self, groups: list[dist.ProcessGroup] = ()):
        super().__init__()
        self.calls: list[Collective] = []
        self._by_name = {g.group_name: tuple(dist.get_process_group_ranks(g)) for g in groups}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _C10D_OPS:
            kind, arg = _C10D_OPS[func]
            group = next(a for a in args if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a))
            ranks = tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(group)))
            self.calls.append(Collective(kind, _nbytes(args[arg]), ranks))
        elif func in _FUNCOL_OPS:
            kind = _FUNCOL_OPS[func]
            name = args[-1]
            if name not in self._by_name:
                raise RuntimeError(f"a functional collective on group {name!r}, which the planner does not know")
            ranks = self._by_name[name]
            payload = _nbytes(args[0]) * (len(ranks) if kind == ALL_GATHER else 1)
            self.calls.append(Collective(kind, payload, ranks))
        return func(*args, **kwargs)

    def mark(self) -> int:
        """The number of calls so far: split a recording into phases."""
        return len(self.calls)


@dataclass
class CommVolume:
    """Bytes per rank per optimizer step, by collective kind and by link (intra- or inter-node)."""

    payload: dict[tuple[str, str], float]  # (kind, "intra"|"inter") -> payload of groups within / across nodes
    wire: dict[tuple[str, str], float]  # (kind, "intra"|"inter") -> bytes this GPU sends over that link
    exposed_wire: dict[str, float]  # "intra"|"inter" -> wire bytes that no compute overlaps

    def total(self, table: str, link: str | None = None, kind: str | None = None) -> float:
        values = getattr(self, table)
        return sum(v for (k, l), v in values.items() if (link is None or l == link) and (kind is None or k == kind))


def step_volume(micro: list[Collective], step: list[Collective], grad_accum: int, gpus_per_node: int) -> CommVolume:
    """A step's volume from the collectives of one micro-batch (forward + backward, repeated
    ``grad_accum`` times) and those of the step's tail (once). FSDP2 overlaps the micro-batch's
    collectives with compute (prefetched all-gathers, asynchronous reduce-scatters); the tail's
    (the adapters' gradient all-reduce, the loss, clipping) run after the last backward, exposed."""
    payload, wire, exposed = defaultdict(float), defaultdict(float), defaultdict(float)
    for calls, times, overlapped in ((micro, grad_accum, True), (step, 1, False)):
        for c in calls:
            payload[c.kind, "inter" if c.crosses_nodes(gpus_per_node) else "intra"] += times * c.payload
            for link, sent in zip(("intra", "inter"), c.wire_bytes(gpus_per_node)):
                wire[c.kind, link] += times * sent
                if not overlapped:
                    exposed[link] += sent
    return CommVolume(dict(payload), dict(wire), dict(exposed))

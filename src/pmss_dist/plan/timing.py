"""The time model: a step's time from its FLOPs, the devices' peak FLOP/s and the links' bandwidths.

    compute  = (tokens x PEFT FLOPs per token + AC recompute FLOPs) / (peak FLOP/s x mfu)
    overlap  = what FSDP2's prefetched all-gathers and asynchronous reduce-scatters send, over
               their links (intra-node, inter-node), every micro-batch
    exposed  = the step's tail (the adapters' gradient all-reduce, the loss) + max(0, overlap - compute)
    step     = compute + exposed

FLOPs per token are the trainer's own count (`train.metrics.flops_per_token`: 4N for frozen
GEMMs, 6N for trained ones, the adapters' work, attention), the figure its MFU is measured
against; activation checkpointing's recompute comes on top, counted on the fake step with torch's
per-op FLOP formulas (`probe.FlopCount`: full AC re-runs each adapted block's forward; selective AC
only elementwise ops, which count no FLOPs). Bytes per link are `comms.Collective.wire_bytes`
(NCCL's hierarchical algorithms); a GPU's intra- and inter-node phases run one after the other. ``mfu`` is the fraction of the peak the step's GEMMs reach on average.
Per-collective latency and kernel launch gaps are not modelled: the figure is for steps long
enough that bandwidth, not latency, bounds communication.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmss_dist.plan.comms import CommVolume

GIB = 2**30


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    peak_tflops: float  # dense bf16, per GPU
    intra_gbps: float  # per GPU, within a node, gigabits per second
    inter_gbps: float  # per GPU, between nodes, gigabits per second
    mfu: float = 0.45  # fraction of peak_tflops the step's GEMMs reach
    headroom: float = 0.10  # of GPU memory kept free: CUDA context, NCCL buffers, allocator rounding

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB * (1 - self.headroom))


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    overlapped_comm_s: float  # FSDP2's collectives, which run under compute
    exposed_comm_s: float  # what no compute hides
    step_s: float
    tokens_per_s: float  # the whole job's


def link_seconds(wire: dict, cluster: Cluster) -> float:
    """Seconds to send ``wire`` bytes ({"intra"|"inter": bytes}) at the links' bandwidths."""
    bandwidth = {"intra": cluster.intra_gbps * 1e9 / 8, "inter": cluster.inter_gbps * 1e9 / 8}
    return sum(b / bandwidth[link] for link, b in wire.items())


def step_time(cluster: Cluster, *, tokens_per_rank: int, peft_flops_per_token: float, recompute_flops: float,
              volume: CommVolume) -> StepTime:
    """``tokens_per_rank``: tokens one rank processes per optimizer step; ``recompute_flops``: the
    AC recompute of those tokens; ``volume``: the step's collectives (`comms.step_volume`)."""
    compute = (tokens_per_rank * peft_flops_per_token + recompute_flops) / (cluster.peak_tflops * 1e12 * cluster.mfu)
    overlapped_wire = {link: volume.total("wire", link) - volume.exposed_wire.get(link, 0.0)
                       for link in ("intra", "inter")}
    overlapped = link_seconds(overlapped_wire, cluster)
    exposed = link_seconds(volume.exposed_wire, cluster) + max(0.0, overlapped - compute)
    total = compute + exposed
    return StepTime(compute, overlapped, exposed, total, tokens_per_rank * cluster.world_size / total)

"""One training step on fake devices, measured: memory per rank, collectives and FLOPs.

The step is the trainer's (`train.trainer.train_step`), piece for piece and with the same
functions: a micro-batch made by `data.batches.collate`, `eval.loss.token_loss_sum` (the model's
forward, the fp32 cross-entropy), the backward, `parallel.grads.all_reduce_grads`, the loss's
all-reduce, `parallel.grads.clip_grad_norm`, AdamW. It runs in the steady state: the optimizer
state exists (as after step 1) and, with gradient accumulation, so do the gradients (as in every
micro-batch but the first), so the peak is that of any later step.

Memory on a sharded model is measured by torch's own `FSDPMemTracker` (`torch.distributed._tools`),
which follows every tensor the step creates and FSDP2's unsharded parameters as it gathers and
frees them. On a model FSDP does not manage (a replicated base) `WholeModelTracker` below does the
same with no FSDP to follow (torch's `MemTracker` refuses frozen parameters: it hooks a gradient
on every one). Either way the peak is the peak of live tensor bytes on the rank: what the CUDA
caching allocator must hold at least (its block rounding and fragmentation come on top; the
planner keeps a headroom for them). Collectives are recorded by
`comms.CollectiveRecorder`, FLOPs by `FlopCount` with torch's FLOP formulas per op
(`torch.utils.flop_counter.flop_registry`: matmuls and attention).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from pmss_dist.adapters.quantize import stored_tensors
from pmss_dist.data.batches import collate
from pmss_dist.eval.loss import token_loss_sum
from pmss_dist.parallel.grads import all_reduce_grads, clip_grad_norm, replicated_parameters, trainable_parameters
from pmss_dist.plan.comms import Collective, CollectiveRecorder
from pmss_dist.plan.fake import FAKE_DEVICE

# Tracker categories (FSDPMemTracker's and MemTracker's names) -> the planner's.
GATHERED = ("Unsharded Param", "All Gather")
ACTIVATION = ("Activation",)


def named(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot keyed by category names ("Activation", "Total", ...)."""
    return {getattr(k, "value", k): v for k, v in snapshot.items()}


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor's local shard), each storage once."""
    storages = {}  # id -> storage, held so that no id is reused while counting
    for t in tensors:
        if t is None:
            continue
        for stored in stored_tensors(t.to_local() if isinstance(t, DTensor) else t):  # NF4: codes and scales
            storage = stored.untyped_storage()
            storages.setdefault(id(storage), storage)
    return sum(s.nbytes() for s in storages.values())


@dataclass
class StepProfile:
    """Bytes per rank (``*_bytes``), FLOPs per micro-batch, and the step's collectives."""

    frozen_bytes: int  # frozen parameters: the base's shards (or the whole base, unsharded)
    trained_bytes: int  # trained parameters: replicated cores / LoRA factors, or full FT's fp32 shards
    grad_bytes: int  # their gradients after backward
    optimizer_bytes: int  # AdamW state
    buffer_bytes: int  # RoPE caches, skeleton indices
    activation_bytes: int  # tensors the forward leaves for backward, logits not included
    logits_bytes: int  # the most the loss head holds at once: logits and their fp32 copies
    gathered_at_peak: int  # unsharded parameters and all-gather buffers at the peak
    peak_bytes: int  # live tensor bytes at the step's peak
    peak_breakdown: dict[str, int]  # the tracker's categories at the peak
    flops: float  # executed FLOPs of one micro-batch (forward, backward, recompute)
    micro_collectives: list[Collective] = field(default_factory=list)  # one micro-batch's
    step_collectives: list[Collective] = field(default_factory=list)  # the step's tail, once


class PeakOnlyFSDPMemTracker(FSDPMemTracker):
    """torch's `FSDPMemTracker`, keeping the rank's peak but not each module's: its per-module
    peaks walk every tracked module at every op, a cost that grows with the square of the depth
    (minutes for a 126-layer model). Everything else — which tensors are live, in which category,
    and FSDP2's storage resizes — is torch's."""

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run under it, by torch's per-op formulas (the ones FlopCounterMode uses).
    Not FlopCounterMode itself: under activation checkpointing it keeps the recomputed tensors
    alive (its module tracking holds them), which the memory trackers then count."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class _VocabTensors(TorchDispatchMode):
    """The most bytes held at once by tensors whose last dimension is the vocabulary: the logits,
    their fp32 copy and the loss's log-softmax. Each storage counted once, until it is freed."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.live, self.peak = vocab_size, 0, 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab_size:
                storage = t.untyped_storage()
                if storage not in self._seen:
                    size = storage.nbytes()
                    self._seen[storage] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, size)
        return out


class WholeModelTracker(TorchDispatchMode):
    """Live tensor bytes on a model that FSDP does not manage, by category, and their peak, in the
    shape of torch's trackers' snapshots (``{device: {category: bytes, "Total": bytes}}``).
    Tensors that exist before the step are registered with `track`; every storage the step
    creates is counted under the current ``category`` until it is freed."""

    def __init__(self):
        super().__init__()
        self.category = "Activation"
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._seen = WeakIdKeyDictionary()

    def track(self, category: str, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), category)

    def _add(self, storage, category: str) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live[category] = self.live.get(category, 0) + size
        weakref.finalize(storage, self._free, category, size)
        if sum(self.live.values()) > sum(self.peak.values()):
            self.peak = dict(self.live)

    def _free(self, category: str, size: int) -> None:
        self.live[category] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), self.category)
        return out

    def get_tracker_snapshot(self, kind: str = "current") -> dict:
        values = dict(self.peak if kind == "peak" else self.live)
        return {FAKE_DEVICE: {**values, "Total": sum(values.values())}}


def synthetic_batch(micro_batch: int, seq_len: int, vocab_size: int, packed: bool) -> dict[str, torch.Tensor]:
    """A micro-batch as the trainer's collation makes it: full rows of ``seq_len`` tokens (collate
    pads every row to seq_len anyway), a packed batch with its document mask and positions."""
    tokens = [i % vocab_size for i in range(seq_len)]
    sample = {"tokens": tokens, "labels": tokens}
    if packed:
        sample["seq_lens"] = [seq_len]
    return collate([dict(sample) for _ in range(micro_batch)], seq_len, pad_id=0)


def profile_step(model: torch.nn.Module, *, fake_mode, optim_args: dict, micro_batch: int, seq_len: int,
                 vocab_size: int, packed: bool, grad_accum: int, grad_clip: float, groups: list) -> StepProfile:
    """Run one micro-batch and the step's tail on ``model`` (materialised under ``fake_mode``) and
    measure them; ``groups``: the process groups collectives may run on."""
    batch = synthetic_batch(micro_batch, seq_len, vocab_size, packed)  # real: collation is data-dependent
    with fake_mode:
        params = trainable_parameters(model)
        replicated = replicated_parameters(model)
        optimizer = torch.optim.AdamW(params, **optim_args)
        _steady_state(params, optimizer, grad_accum)
        batch = {k: fake_mode.from_tensor(v) for k, v in batch.items()}
        sharded = isinstance(model, FSDPModule)
        tracker = PeakOnlyFSDPMemTracker(model, optimizer) if sharded else WholeModelTracker()
        if not sharded:
            tracker.track("Parameter", model.parameters())
            tracker.track("Buffer", model.buffers())
            tracker.track("Gradient", (p.grad for p in params))
            tracker.track("Optstate", (t for state in optimizer.state.values() for t in state.values()))
            tracker.track("Inputs", batch.values())
        # FSDPMemTracker follows FSDP's parameters only: the replicated adapters are there all along.
        untracked = local_bytes(replicated) if sharded else 0
        at_forward_end = {}

        def forward_end(module, args, output):
            at_forward_end.update(named(tracker.get_tracker_snapshot()[FAKE_DEVICE]))
            at_forward_end["output"] = local_bytes([output])

        hook = model.register_forward_hook(forward_end)
        recorder, vocab = CollectiveRecorder(groups), _VocabTensors(vocab_size)
        flops = FlopCount()
        try:
            with tracker, recorder, vocab, flops:
                loss, _ = token_loss_sum(model, batch, FAKE_DEVICE)
                _set_category(tracker, "Temp")
                (loss / (micro_batch * seq_len * grad_accum)).backward()
                micro_end = recorder.mark()
                grad_bytes = local_bytes(p.grad for p in params)
                _set_category(tracker, "Gradient")
                _step_tail(params, replicated, optimizer, loss.detach(), grad_clip, tracker)
        finally:
            hook.remove()
        peak = named(tracker.get_tracker_snapshot("peak")[FAKE_DEVICE])
        breakdown = {k: v for k, v in peak.items() if k != "Total" and v}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        optimizer_bytes = local_bytes(t for state in optimizer.state.values() for t in state.values()
                                      if isinstance(t, torch.Tensor))
        return StepProfile(
            frozen_bytes=local_bytes(frozen), trained_bytes=local_bytes(params), grad_bytes=grad_bytes,
            optimizer_bytes=optimizer_bytes, buffer_bytes=local_bytes(model.buffers()),
            activation_bytes=sum(at_forward_end.get(k, 0) for k in ACTIVATION) - at_forward_end["output"],
            logits_bytes=vocab.peak, gathered_at_peak=sum(peak.get(k, 0) for k in GATHERED),
            peak_bytes=peak["Total"] + untracked, peak_breakdown=breakdown, flops=float(flops.flops),
            micro_collectives=recorder.calls[:micro_end], step_collectives=recorder.calls[micro_end:])


def _steady_state(params: list, optimizer: torch.optim.Optimizer, grad_accum: int) -> None:
    """The state a later step starts in: AdamW's moments exist; with accumulation, gradients too."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=grad_accum == 1)


def _set_category(tracker, category: str) -> None:
    """What the step creates from here on (`WholeModelTracker`; torch's trackers tell by themselves)."""
    if isinstance(tracker, WholeModelTracker):
        tracker.category = category


def _step_tail(params: list, replicated: list, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
               grad_clip: float, tracker) -> None:
    """What `train_step` does once per step after the micro-batches (its collectives included)."""
    counts = torch.zeros(2, dtype=torch.float64, device=FAKE_DEVICE)
    dist.all_reduce(counts)  # the trainer's global token counts (all-reduced before the micro-batches)
    all_reduce_grads(replicated)
    dist.all_reduce(loss)
    clip_grad_norm(params, grad_clip)
    _set_category(tracker, "Optstate")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


"""One training step on fake devices, measured: memory per rank, collectives and FLOPs.

The step is the trainer's (`train.trainer.train_step`), piece for piece and with the same
functions: a micro-batch made by `data.batches.collate_samples`, `train.step.micro_loss` (the
model's forward and the fp32 cross-entropy; for dpo the reference forward with the adapters off
first, then the policy's), the backward, `parallel.grads.all_reduce_grads`, the loss's
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

import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from pmss_dist.adapters.quantize import stored_tensors
from pmss_dist.data.batches import collate_samples
from pmss_dist.eval.preference import PreferenceLoss
from pmss_dist.parallel.grads import replicated_parameters, trainable_parameters
from pmss_dist.plan.comms import Collective, CollectiveRecorder
from pmss_dist.plan.fake import FAKE_DEVICE
from pmss_dist.train import step as step_lib

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
    window_peaks: dict[tuple, dict[str, int]]  # `Windows.peaks`: each window's peak, by category and "Total"
    flops: float  # executed FLOPs of one micro-batch (forward, backward, recompute)
    micro_collectives: list[Collective] = field(default_factory=list)  # one micro-batch's
    step_collectives: list[Collective] = field(default_factory=list)  # the step's tail, once

    @property
    def _at_peak(self) -> dict[str, int]:
        return max(self.window_peaks.values(), key=lambda snapshot: snapshot["Total"])

    @property
    def peak_bytes(self) -> int:  # live tensor bytes at the step's peak (the largest window's)
        return self._at_peak["Total"]

    @property
    def peak_breakdown(self) -> dict[str, int]:  # the tracker's categories at the peak
        return {k: v for k, v in self._at_peak.items() if k != "Total" and v}

    @property
    def gathered_at_peak(self) -> int:  # unsharded parameters and all-gather buffers at the peak
        return sum(self._at_peak.get(k, 0) for k in GATHERED)


class Windows:
    """The peak of live bytes in each window of a step, keyed so that a key means the same window
    at every depth: ``(phase, "block", j)`` for the ``j``-th block from the start and ``(phase,
    "block", -1 - j)`` for the ``j``-th from the end (``j < EDGE_BLOCKS``), ``(phase, "middle")``
    for the blocks between, ``(phase, "before")`` / ``(phase, "after")`` outside the blocks, and
    ``("tail",)`` for the step's tail; ``phase`` is "forward" or "backward" (`ModTracker`'s).

    Why windows (`at_depth`): the step's peak is the largest of its windows' peaks, each an affine
    function of the depth with a slope of its own, so the peak of a shallow step can sit in another
    window than the deep one's. Extrapolated window by window, the maximum is taken at the depth
    asked for. A middle window's peak is affine in its position among alike blocks, so at any
    depth the largest is at an end of the middle run, no more than the edge windows beside it."""

    EDGE_BLOCKS = 2
    # A block's own name: its children's may not say which block runs (torchtune's RoPE module is
    # one module shared by every layer, named after the last).
    _BLOCK = re.compile(r"\.layers\.(\d+)$")

    def __init__(self, mod_tracker: ModTracker, depth: int):
        self.mod_tracker, self.depth = mod_tracker, depth
        self.tail = False
        self.entered: set[str] = set()  # the phases whose blocks have started
        self.peaks: dict[tuple, dict[str, int]] = {}

    def key(self) -> tuple:
        if self.tail:
            return ("tail",)
        phase = "backward" if self.mod_tracker.is_bw else "forward"
        blocks = {int(m.group(1)) for m in map(self._BLOCK.search, self.mod_tracker.parents) if m}
        if not blocks:
            return (phase, "after" if phase in self.entered else "before")
        self.entered.add(phase)
        # The block running is the one entered last: in the backward (which runs the blocks last to
        # first) ModTracker can leave a finished block among the parents, where a child of it had
        # no gradient to mark its end.
        block = min(blocks) if phase == "backward" else max(blocks)
        if block < self.EDGE_BLOCKS:
            return (phase, "block", block)
        if block >= self.depth - self.EDGE_BLOCKS:
            return (phase, "block", block - self.depth)
        return (phase, "middle")

    def update(self, snapshot: dict[str, int]) -> None:
        """``snapshot``: the live bytes now, by category and "Total"."""
        key = self.key()
        if snapshot["Total"] > self.peaks.get(key, {"Total": -1})["Total"]:
            self.peaks[key] = dict(snapshot)


def at_depth(shallow: StepProfile, deep: StepProfile, depths: tuple[int, int], depth: int) -> StepProfile | None:
    """The step of the same model ``depth`` blocks deep, from its steps at ``depths`` (shallow,
    deep): every measure extrapolated as an affine function of the depth, which it is when every
    block adds the same tensors, FLOPs and collectives. Collectives are extrapolated per kind and
    group, in number and in total payload (what `comms.step_volume` sums); ``None`` where a
    number of calls does not come out whole, i.e. the blocks are not alike."""
    d1, d2 = depths
    t = Fraction(depth - d1, d2 - d1)

    def at(a, b):
        return a + (b - a) * t

    def calls(a: list[Collective], b: list[Collective]) -> list[Collective] | None:
        counts = [defaultdict(int), defaultdict(int)]
        payloads = [defaultdict(int), defaultdict(int)]
        for i, recorded in enumerate((a, b)):
            for c in recorded:
                counts[i][c.kind, c.ranks] += 1
                payloads[i][c.kind, c.ranks] += c.payload
        out = []
        for key in counts[0].keys() | counts[1].keys():
            n, payload = at(counts[0][key], counts[1][key]), round(at(payloads[0][key], payloads[1][key]))
            if n.denominator != 1 or n < 0 or payload < 0:
                return None
            n = int(n)
            out += [Collective(key[0], payload // n + (i < payload % n), key[1]) for i in range(n)]
        return out

    micro = calls(shallow.micro_collectives, deep.micro_collectives)
    step = calls(shallow.step_collectives, deep.step_collectives)
    if micro is None or step is None:
        return None
    windows = {}
    for key in shallow.window_peaks.keys() | deep.window_peaks.keys():
        if key[-1] == "middle":
            continue  # no larger than the edge blocks' (`Windows`)
        if key not in shallow.window_peaks or key not in deep.window_peaks:
            return None
        a, b = shallow.window_peaks[key], deep.window_peaks[key]
        windows[key] = {k: round(at(a.get(k, 0), b.get(k, 0))) for k in a.keys() | b.keys()}
    scalars = {f.name: at(getattr(shallow, f.name), getattr(deep, f.name)) for f in fields(StepProfile)
               if isinstance(getattr(shallow, f.name), (int, float))}
    scalars = {k: round(v) if isinstance(getattr(shallow, k), int) else float(v) for k, v in scalars.items()}
    return replace(deep, **scalars, window_peaks=windows, micro_collectives=micro, step_collectives=step)


class WindowedFSDPMemTracker(FSDPMemTracker):
    """torch's `FSDPMemTracker`, keeping the peak of each of the step's `Windows` instead of each
    module's: its per-module peaks walk every tracked module at every op, a cost that grows with
    the square of the depth (minutes for a 126-layer model). Everything else — which tensors are
    live, in which category, and FSDP2's storage resizes — is torch's."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, depth: int):
        super().__init__(model, optimizer)
        self.windows = Windows(self._mod_tracker, depth)

    def _update_peak_stats(self, peak_state) -> None:
        self.windows.update(named(self._curr_mem_snap[FAKE_DEVICE]))


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

    def __init__(self, depth: int):
        super().__init__()
        self.category = "Activation"
        self.live: dict[str, int] = {}
        self._seen = WeakIdKeyDictionary()
        self._mod_tracker = ModTracker()
        self.windows = Windows(self._mod_tracker, depth)

    def __enter__(self):
        self._mod_tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._mod_tracker.__exit__(*exc)

    def track(self, category: str, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                # an NF4 weight (or a view of one) by the codes and scales it holds: its own
                # storage is a wrapper's, sized as if it were dense
                for stored in stored_tensors(t):
                    self._add(stored.untyped_storage(), category)

    def _add(self, storage, category: str) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live[category] = self.live.get(category, 0) + size
        weakref.finalize(storage, self._free, category, size)
        self.windows.update({**self.live, "Total": sum(self.live.values())})

    def _free(self, category: str, size: int) -> None:
        self.live[category] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        self.track(self.category, tree_flatten(out)[0])
        return out

    def get_tracker_snapshot(self) -> dict:
        return {FAKE_DEVICE: {**self.live, "Total": sum(self.live.values())}}


def synthetic_batch(micro_batch: int, seq_len: int, vocab_size: int, packed: bool,
                    pairs: bool = False, precomputed_reference: bool = False) -> dict[str, torch.Tensor]:
    """A micro-batch as the trainer's collation makes it: full rows of ``seq_len`` tokens (collate
    pads every row to seq_len anyway), a packed batch with its document mask and positions;
    ``pairs``: ``micro_batch`` preference pairs, two rows each, with their reference scores when
    ``precomputed_reference`` (the step then runs no reference forward)."""
    tokens = [i % vocab_size for i in range(seq_len)]
    sample = {"tokens": tokens, "labels": tokens}
    if packed:
        sample["seq_lens"] = [seq_len]
    if pairs:
        sample = {"chosen": sample, "rejected": sample}
    batch = collate_samples([dict(sample) for _ in range(micro_batch)], seq_len, pad_id=0)
    if precomputed_reference:
        batch["reference"] = torch.zeros(2 * micro_batch)
    return batch


def profile_step(model: torch.nn.Module, *, fake_mode, optim_args: dict, micro_batch: int, seq_len: int,
                 vocab_size: int, packed: bool, grad_accum: int, grad_clip: float, groups: list,
                 preference: PreferenceLoss | None = None, reference_forward: bool = True) -> StepProfile:
    """Run one micro-batch and the step's tail on ``model`` (materialised under ``fake_mode``) and
    measure them; ``groups``: the process groups collectives may run on; ``preference``: a dpo
    step (pairs, and the reference forward if ``reference_forward``)."""
    # real: collation is data-dependent
    batch = synthetic_batch(micro_batch, seq_len, vocab_size, packed, pairs=preference is not None,
                            precomputed_reference=preference is not None and not reference_forward)
    trained = step_lib.loss_units([batch], preference)
    with fake_mode:
        params = trainable_parameters(model)
        replicated = replicated_parameters(model)
        optimizer = torch.optim.AdamW(params, **optim_args)
        _steady_state(params, optimizer, grad_accum)
        batch = {k: fake_mode.from_tensor(v) for k, v in batch.items()}
        sharded = isinstance(model, FSDPModule)
        depth = len(model.layers)
        tracker = WindowedFSDPMemTracker(model, optimizer, depth) if sharded else WholeModelTracker(depth)
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
                loss, stats = step_lib.micro_loss(model, batch, FAKE_DEVICE, preference)
                _set_category(tracker, "Temp")
                (loss / (micro_batch * seq_len * grad_accum)).backward()
                micro_end = recorder.mark()
                grad_bytes = local_bytes(p.grad for p in params)
                _set_category(tracker, "Gradient")
                tracker.windows.tail = True
                sums = torch.cat([loss.detach().reshape(1), stats]).to(torch.float64)
                _step_tail(params, replicated, optimizer, sums, trained, grad_clip, tracker)
        finally:
            hook.remove()
        windows = tracker.windows.peaks
        if untracked:
            windows = {key: {**w, "Replicated Param": untracked, "Total": w["Total"] + untracked}
                       for key, w in windows.items()}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        optimizer_bytes = local_bytes(t for state in optimizer.state.values() for t in state.values()
                                      if isinstance(t, torch.Tensor))
        return StepProfile(
            frozen_bytes=local_bytes(frozen), trained_bytes=local_bytes(params), grad_bytes=grad_bytes,
            optimizer_bytes=optimizer_bytes, buffer_bytes=local_bytes(model.buffers()),
            activation_bytes=sum(at_forward_end.get(k, 0) for k in ACTIVATION) - at_forward_end["output"],
            logits_bytes=vocab.peak, window_peaks=windows, flops=float(flops.flops),
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


def _step_tail(params: list, replicated: list, optimizer: torch.optim.Optimizer, sums: torch.Tensor,
               trained: int, grad_clip: float, tracker) -> None:
    """The trainer's own step after the micro-batches (`train.step`), its collectives included. The
    count all-reduce, which the trainer makes before the micro-batches, is made here."""
    targets = step_lib.global_targets(trained, FAKE_DEVICE)
    norm = step_lib.reduce_and_clip(params, replicated, grad_clip)
    _set_category(tracker, "Optstate")
    step_lib.update(optimizer)
    step_lib.agree(0, sums, 0, targets, norm).work.wait()
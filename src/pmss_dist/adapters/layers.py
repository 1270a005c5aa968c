"""PMSS and LoRA layers, and the functions that put them into a torchtune model.

Both adapters wrap a frozen ``nn.Linear`` the same way: the base ``weight`` (and ``bias``)
stay where ``nn.Linear`` keeps them, so state-dict keys, FSDP2 sharding and HF conversion
treat an adapted layer like a plain one; the trainable tensors are small and replicated.

PMSS forward. With ``C = W[:, J]`` and ``R = W[I, :]``::

    x·(W + s·C·U·R)ᵀ = y + s·((y[..., I])·Uᵀ)·Cᵀ,   y = x·Wᵀ

The row skeleton costs nothing: ``x·Rᵀ`` is the base output at rows ``I``. The column
skeleton is read from the (FSDP-gathered) weight in forward instead of stored, so PMSS adds
no frozen memory at all. ``bench/bench_layer.py`` measures this against stored copies;
``docs/DESIGN.md`` records the result.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from pmss_dist.errors import ConfigError
from pmss_dist.adapters.quantize import (QUANTIZE_FORMATS, check_quantizable, dequantize, empty_nf4, frozen_linear,
                                         quantize_rows)

# HF projection names (what users write in configs) -> torchtune module names.
TARGET_ALIASES = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "o_proj": "output_proj",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
}
# "full" is no adapter: every base weight trains, as the ceiling the adapters are measured against.
FULL = "full"
ADAPTER_KINDS = ("pmss", "lora", FULL)


def merge_dtype(weight: torch.Tensor | None) -> torch.dtype:
    """The dtype updates are computed and merged in: fp32, or the weight's dtype if wider
    (fp32 when there is no weight)."""
    return torch.float32 if weight is None else torch.promote_types(weight.dtype, torch.float32)


def update_scale(alpha: float, size: int) -> float:
    """The update's scale ``s = alpha / size`` (size: PMSS's k, LoRA's r)."""
    return alpha / size


def pmss_factors(weight: torch.Tensor, core: torch.Tensor, row_idx: torch.Tensor,
                 col_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C·U, R)`` with ``C = W[:, J]``, ``R = W[I, :]`` (J = ``col_idx``, I = ``row_idx``), so the
    PMSS update is ``s·(C·U)·R``; in `merge_dtype` of the weight."""
    w = weight.to(merge_dtype(weight))
    return w[:, col_idx] @ core.to(w.dtype), w[row_idx, :]


def lora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)``, so the LoRA update is ``s·B·A``; in ``dtype`` (`merge_dtype` of the weight)."""
    return lora_b.to(dtype), lora_a.to(dtype)


def merge_update(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``W + update`` in the weight's dtype, added in the update's dtype (`merge_dtype`)."""
    return (weight.to(update.dtype) + update).to(weight.dtype)


class AdapterLinear(nn.Module):
    """The frozen part both adapters share: ``weight`` (and ``bias``) where ``nn.Linear`` keeps
    them, and the update's ``scale``. Subclasses add the trainable tensors (``tensor_names``, what
    an adapter file or checkpoint holds of the layer) and the update's `factors`."""

    tensor_names: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, size: int, alpha: float,
                 bias: bool, device, dtype, quantize: str = "none", constants_device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scale = update_scale(alpha, size)
        # Off: the layer is its frozen base alone (`adapters_off`), as DPO's reference model.
        self.adapter_on = True
        self.quantize = quantize
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.dtype = dtype  # of compute, and of the weight this layer stands for when it is quantized
        shape = (out_features, in_features)
        if quantize == "nf4":
            weight = empty_nf4(shape, dtype, device, constants_device or device)
        elif quantize == "int8":
            weight = torch.empty(shape, device=device, dtype=torch.int8)
            self.weight_scale = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        elif quantize == "none":
            weight = torch.empty(shape, device=device, dtype=dtype)
        else:
            raise ValueError(f"model.quantize: unknown format {quantize!r}; choose from {list(QUANTIZE_FORMATS)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def stored_weight(self) -> tuple[torch.Tensor, ...]:
        """The tensors the frozen weight is stored in (quantized: its codes, and int8's scales)."""
        return (self.weight, self.weight_scale) if self.quantize == "int8" else (self.weight,)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The (gathered) frozen weight in ``dtype``, dequantized if it is stored quantized."""
        return dequantize(self.quantize, self.stored_weight(), dtype)

    def base_linear(self, x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``x·Wᵀ`` with ``dense`` = `dense_weight`; a quantized weight is what backward keeps."""
        return frozen_linear(x, dense, self.quantize, self.stored_weight())

    @torch.no_grad()
    def load_weight(self, rows: torch.Tensor, group=None) -> None:
        """Set this rank's rows of the frozen weight (all of it when unsharded) from the original
        ``rows``, converted to the layer's dtype and stored as `quantize` says. ``group``: the
        ranks holding the other rows of a sharded weight (NF4 quantizes against the whole
        tensor's scale mean)."""
        local = [t.to_local() if isinstance(t, DTensor) else t for t in self.stored_weight()]
        rows = rows.to(device=local[0].device, dtype=self.dtype)
        stored = quantize_rows(self.quantize, rows, (self.out_features, self.in_features), group)
        if self.quantize == "nf4":
            # Tensor by tensor: an FSDP2 shard keeps the whole tensor's block count, which
            # NF4Tensor.copy_ would take for a different format.
            for name in stored[0].__tensor_flatten__()[0]:
                getattr(local[0], name).copy_(getattr(stored[0], name))
        else:
            for target, value in zip(local, stored):
                target.copy_(value)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with update ``scale · left @ right``, in `merge_dtype` of the weight."""
        raise NotImplementedError

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s·left·right`` in `merge_dtype`, the update `merge_adapters` folds in."""
        left, right = self.factors()
        return self.scale * (left @ right)

    def reset_adapter(self, seed: int, name: str) -> None:
        raise NotImplementedError

    def flops_per_token(self) -> int:
        raise NotImplementedError


class PMSSLinear(AdapterLinear):
    """A frozen linear layer plus the PMSS update ``s·C·U·R`` with a trainable ``k × k`` core."""

    tensor_names = ("core", "row_idx", "col_idx")

    def __init__(self, in_features: int, out_features: int, k: int, alpha: float,
                 bias: bool = False, device=None, dtype=None, **storage):
        super().__init__(in_features, out_features, k, alpha, bias, device, dtype, **storage)
        self.k = k
        # Skeleton indices are set by `assign_skeletons` once the base weights are loaded.
        self.register_buffer("row_idx", torch.empty(k, dtype=torch.long, device=device))
        self.register_buffer("col_idx", torch.empty(k, dtype=torch.long, device=device))
        # fp32 whatever the base dtype: the optimizer state and the update stay exact.
        self.core = nn.Parameter(torch.zeros(k, k, device=device, dtype=torch.float32))

    def reset_adapter(self, seed: int, name: str) -> None:
        del seed, name  # a zero core needs no randomness: the run starts at the base model
        with torch.no_grad():
            self.core.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core = self.core.to(x.dtype)
        weight = self.dense_weight(x.dtype)  # a quantized base: C and R are slices of W as dequantized
        if not self.adapter_on:
            out = self.base_linear(x, weight)
            return out if self.bias is None else out + self.bias
        if self.out_features > self.in_features:
            # Wide output (gate/up): fold the update into the input, x' = x + s·(x·Rᵀ·Uᵀ) at
            # columns J, so the base GEMM applies C for free; the extra GEMM is k·d_in, not k·d_out.
            row_proj = F.linear(x, weight.index_select(0, self.row_idx))  # x·Rᵀ
            x = x.index_add(-1, self.col_idx, F.linear(row_proj, core), alpha=self.scale)
            out = self.base_linear(x, weight)
            return out if self.bias is None else out + self.bias
        base = self.base_linear(x, weight)
        row_proj = base.index_select(-1, self.row_idx)  # x·Rᵀ, read off the base output
        col_skeleton = weight.index_select(1, self.col_idx)  # C = W[:, J]
        out = base + self.scale * F.linear(F.linear(row_proj, core), col_skeleton)
        return out if self.bias is None else out + self.bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.dense_weight(merge_dtype(self.weight))
        return pmss_factors(weight, self.core, self.row_idx, self.col_idx)

    def flops_per_token(self) -> int:
        """Multiply-adds per token of the update: the core, and one skeleton GEMM on the narrower side."""
        return self.k * self.k + self.k * min(self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, scale={self.scale:g}"


class LoRALinear(AdapterLinear):
    """A frozen linear layer plus ``s·B·A`` (Hu et al. 2021), the baseline PMSS is compared with."""

    tensor_names = ("lora_a", "lora_b")

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 bias: bool = False, device=None, dtype=None, **storage):
        super().__init__(in_features, out_features, r, alpha, bias, device, dtype, **storage)
        self.r = r
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))

    def reset_adapter(self, seed: int, name: str) -> None:
        # Replicated on every rank, so the random A is drawn from a generator that depends
        # only on the run's seed and the layer's name, never on the rank.
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        a = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # nn.Linear's and peft's init
        with torch.no_grad():
            self.lora_a.copy_(a)
            self.lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_linear(x, self.dense_weight(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        if not self.adapter_on:
            return out
        return out + self.scale * F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return lora_factors(self.lora_a, self.lora_b, merge_dtype(self.weight))

    def flops_per_token(self) -> int:
        """Multiply-adds per token of the update: ``x·Aᵀ`` and then ``·Bᵀ``."""
        return self.r * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


ADAPTER_CLASSES = {"pmss": PMSSLinear, "lora": LoRALinear}
ADAPTER_TENSORS = {kind: cls.tensor_names for kind, cls in ADAPTER_CLASSES.items()}


@dataclass(frozen=True)
class AdapterSpec:
    kind: str = "pmss"
    targets: tuple[str, ...] = tuple(TARGET_ALIASES)
    size: int = 16  # k for PMSS, r for LoRA; the config key adapter.rank
    alpha: float = 16.0
    quantize: str = "none"  # how the adapted layers' frozen weights are stored: QUANTIZE_FORMATS


def _torchtune_names(targets) -> set[str]:
    unknown = [t for t in targets if t not in TARGET_ALIASES]
    if unknown:
        raise ValueError(f"adapter.targets: unknown projection(s) {unknown}; "
                         f"choose from {list(TARGET_ALIASES)}")
    return {TARGET_ALIASES[t] for t in targets}


def apply_adapters(model: nn.Module, spec: AdapterSpec, *, shards: int = 1,
                   constants_device: torch.device | None = None) -> dict[str, int]:
    """Swap the targeted ``nn.Linear`` layers of a torchtune decoder for adapter layers, freeze
    everything else, and return ``{"trainable": .., "total": ..}`` parameter counts. Kind ``full``
    swaps nothing and makes every parameter trainable (targets, size and alpha do not apply).

    Works on the meta device (the distributed path) and on real weights (copied over, quantized
    if ``spec.quantize`` says so). ``shards``: the row blocks FSDP2 will split each weight into
    (a quantized format may not allow every split); ``constants_device``: where a quantized weight
    made on the meta device keeps its few constants (`quantize.empty_nf4`). PMSS layers still need
    `assign_skeletons` before training.
    """
    if spec.quantize not in QUANTIZE_FORMATS:
        raise ValueError(f"model.quantize: unknown format {spec.quantize!r}; choose from {list(QUANTIZE_FORMATS)}")
    if spec.kind == FULL:
        if spec.quantize != "none":
            raise ValueError(f"model.quantize={spec.quantize} needs a frozen base: adapter.kind=full trains every "
                             "weight; use adapter.kind pmss or lora, or model.quantize=none")
        for p in model.parameters():
            p.requires_grad_(True)
        return count_parameters(model)
    if spec.kind not in ADAPTER_CLASSES:
        raise ValueError(f"adapter.kind: unknown adapter {spec.kind!r}; choose from {list(ADAPTER_KINDS)}")
    if spec.size <= 0:
        raise ValueError(f"adapter.rank must be positive, got {spec.size}")
    wanted = _torchtune_names(spec.targets)
    cls = ADAPTER_CLASSES[spec.kind]
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in wanted or type(child) is not nn.Linear:
                continue
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            limit = min(child.in_features, child.out_features) if spec.kind == "pmss" else None
            if limit is not None and spec.size > limit:

                raise ConfigError(f"adapter.rank={spec.size} is larger than layer {full_name} allows "
                                 f"({child.out_features}x{child.in_features}: k <= {limit}); lower adapter.rank")
            check_quantizable(full_name, (child.out_features, child.in_features), spec.quantize, shards)
            layer = cls(child.in_features, child.out_features, spec.size, spec.alpha,
                        bias=child.bias is not None, device=child.weight.device, dtype=child.weight.dtype,
                        quantize=spec.quantize, constants_device=constants_device)
            if child.weight.device.type != "meta":
                layer.load_weight(child.weight)
                if child.bias is not None:
                    with torch.no_grad():
                        layer.bias.copy_(child.bias)
            setattr(parent, child_name, layer)
            swapped += 1
    if swapped == 0:
        raise ValueError(f"adapter.targets {list(spec.targets)} matched no nn.Linear in the model")
    return count_parameters(model)


def plain_name(name: str) -> str:
    """A module/parameter name without the prefixes that compile and AC wrappers insert."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def apply_pmss(model: nn.Module, targets=tuple(TARGET_ALIASES), k: int = 16, alpha: float | None = None,
               method: str = "deim", *, seed: int = 0, svd: str = "auto") -> dict[str, int]:
    """PMSS on a model with real weights, in one call: swap the targets for PMSS layers (core
    ``k × k``, ``s = alpha / k``, alpha defaulting to ``k``), select every skeleton and
    return the parameter counts. The distributed trainer runs the same two steps around sharding."""
    counts = apply_adapters(model, AdapterSpec("pmss", tuple(targets), k, float(k if alpha is None else alpha)))
    assign_skeletons(model, method, seed=seed, svd=svd)
    return counts


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Adapter layers by fully qualified name, in module order (the same on every rank)."""
    return {plain_name(name): m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within: every adapter layer computes its frozen base alone, so ``model`` is the base model
    (bit for bit: an untrained update adds exact zeros). Nothing is copied or moved."""
    layers = list(adapter_layers(model).values())
    for layer in layers:
        layer.adapter_on = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_on = True


def count_parameters(model: nn.Module) -> dict[str, int]:
    # numel of a DTensor is its global size, so counts are the same sharded or not.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def reset_adapters(model: nn.Module, seed: int) -> None:
    """Initialise every adapter's trainable tensors (after ``to_empty`` on the meta path)."""
    for name, layer in adapter_layers(model).items():
        layer.reset_adapter(seed, name)


def assign_skeletons(model: nn.Module, method: str = "deim", *, seed: int = 0, svd: str = "auto",
                     selections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                     progress: bool = False, original=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Choose (or take from ``selections``) the skeleton of every PMSS layer and write the indices
    into its buffers. Weights may be plain tensors or FSDP2 shards; the indices do not depend on
    the world size. A quantized base is selected on its unquantized weights: ``original`` (layer
    name -> this rank's part of the original weight, `hf.load.original_weights`). Returns
    ``{layer_name: (rows, cols)}``."""
    from pmss_dist.adapters.distributed_selection import select_skeletons

    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, PMSSLinear)}
    if selections is None:
        selections = select_skeletons({n: m.weight for n, m in layers.items()},
                                      {n: m.k for n, m in layers.items()},
                                      method, seed=seed, svd=svd, progress=progress, original=original)
    missing = sorted(set(layers) - set(selections))
    if missing:
        raise ValueError(f"skeleton selection has no indices for layer(s) {missing[:3]}...")
    with torch.no_grad():
        for name, layer in layers.items():
            rows, cols = selections[name]
            if rows.numel() != layer.k or cols.numel() != layer.k:
                raise ValueError(f"selection for {name} has {rows.numel()}/{cols.numel()} indices, "
                                 f"layer k is {layer.k}")
            layer.row_idx.copy_(rows)
            layer.col_idx.copy_(cols)
    return selections


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter's update into its base weight and put plain ``nn.Linear`` layers back.
    The model must hold full (unsharded) weights; distributed export merges per layer instead."""
    for name, layer in adapter_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.dtype)
        linear.weight.copy_(merge_update(layer.dense_weight(layer.dtype), layer.delta_weight()))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, linear)
    return model

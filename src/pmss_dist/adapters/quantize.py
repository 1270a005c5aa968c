"""The storage formats of a quantized frozen base: NF4 (torchao's ``NF4Tensor``, as torchtune's
QLoRA keeps it) and int8 weight-only per output channel.

Only the adapted projections' weights are quantized; they stay FSDP2 parameters, so sharding,
all-gather and resharding work as for a plain weight:

- **nf4**: one ``NF4Tensor`` parameter (4-bit codes, blocks of `NF4_BLOCK` weights with an int8
  scale each, the scales double-quantized in blocks of `NF4_SCALER_BLOCK` around one mean per
  tensor). FSDP2 all-gathers its codes and scales through the tensor's own all-gather extension.
  A rank quantizes only its own rows (`nf4_rows`), against the mean of the whole tensor's block
  scales (`nf4_scale_mean`, one all-reduce), so its shard is exactly the matching rows of the
  whole tensor quantized at once.
- **int8**: an int8 ``weight`` and a ``weight_scale`` per output row (absmax / 127); FSDP2 shards
  both by rows and never casts the integer weight.

Compute stays in ``model.dtype``: a forward dequantizes the gathered weight once, and the base
GEMM saves the quantized weight, not the dequantized one, for its backward (`frozen_linear`).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pmss_dist.errors import ConfigError

QUANTIZE_FORMATS = ("none", "nf4", "int8")
NF4_BLOCK = 64  # weights per scale
NF4_SCALER_BLOCK = 256  # scales per double-quantization factor: torchao's and QLoRA's, where it divides
INT8_MAX = 127


def nf4_scaler_block(shape: tuple[int, int]) -> int:
    """Scales per double-quantization factor for a weight of ``shape``: `NF4_SCALER_BLOCK` when it
    divides the number of scales, as for every power-of-two width, else the largest number below
    it that does (SmolLM2's 576-wide layers: 216). A function of the whole shape only, so every
    world size quantizes a weight the same way."""
    n_blocks = shape[0] * shape[1] // NF4_BLOCK
    return max(d for d in range(1, NF4_SCALER_BLOCK + 1) if n_blocks % d == 0)


def check_quantizable(name: str, shape: tuple[int, int], fmt: str, shards: int) -> None:
    """Refuse a layer that ``fmt`` cannot store when split into ``shards`` row blocks: NF4 needs
    whole blocks of `NF4_BLOCK` weights, and FSDP2 shards of equal size that hold whole scaler
    blocks (as torchao's NF4 all-gather requires)."""
    if fmt != "nf4":
        return

    d_out, d_in = shape
    if d_out * d_in % NF4_BLOCK:
        raise ConfigError(f"model.quantize=nf4: layer {name} ({d_out}x{d_in}) does not split into blocks of "
                          f"{NF4_BLOCK} weights; use model.quantize=int8 or none")
    per_scaler_block = NF4_BLOCK * nf4_scaler_block(shape)
    if d_out % shards or (d_out // shards) * d_in % per_scaler_block:
        raise ConfigError(f"model.quantize=nf4: layer {name} ({d_out}x{d_in}) cannot be split over dp_shard={shards}"
                          f": NF4 shards must be {shards} equal row blocks of a multiple of {per_scaler_block} weights "
                          "(whole double-quantization blocks); use another parallel.dp_shard (1: a replicated "
                          "base), or model.quantize=int8")


def empty_nf4(shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
              constants_device: torch.device) -> torch.Tensor:
    """An uninitialised NF4 weight of ``shape`` on ``device`` (usually meta). Its two small
    constants (the NF4 code table and the scale mean) live on ``constants_device`` from the start:
    ``to_empty`` only allocates the sharded tensors, and every shard and view FSDP2 makes shares
    these two, so loading fills them in place."""
    from torchao.dtypes.nf4tensor import NF4Tensor, SubclassTensorArgs, to_nf4

    scaler_block = nf4_scaler_block(shape)
    template = to_nf4(torch.empty(shape, dtype=dtype, device="meta"), NF4_BLOCK, scaler_block)
    meta = SubclassTensorArgs(template.shape, template.stride(), 0, dtype, torch.device(device), False)

    def empty(name):
        return torch.empty_like(getattr(template, name), device=device)

    return NF4Tensor(meta, NF4_BLOCK, template.n_blocks, scaler_block, empty("quantized_scalers"),
                     empty("quantization_factor"), torch.zeros((), dtype=dtype, device=constants_device),
                     empty("quantized_data"), nf4_codes(dtype, constants_device))


def nf4_scale_mean(rows: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of the block absmax scales of the whole tensor whose ``rows`` this rank holds
    (``group``: the ranks holding the other rows; None: ``rows`` is the whole tensor), in fp64."""
    scales = rows.reshape(-1, NF4_BLOCK).abs().amax(dim=1)
    parts = torch.stack([scales.sum(dtype=torch.float64), torch.tensor(scales.numel(), dtype=torch.float64,
                                                                       device=rows.device)])
    if group is not None:
        dist.all_reduce(parts, group=group)
    return parts[0] / parts[1]


def nf4_rows(rows: torch.Tensor, scale_mean: torch.Tensor, scaler_block: int) -> torch.Tensor:
    """``rows`` (a block of whole rows) as an NF4Tensor, its block scales double-quantized in
    blocks of ``scaler_block`` (`nf4_scaler_block` of the whole shape) around the whole tensor's
    ``scale_mean`` (`nf4_scale_mean`): torchao's ``to_nf4`` of the whole tensor, restricted to
    these rows."""
    from torchao.dtypes.nf4tensor import NF4Tensor, SubclassTensorArgs, get_block_absmax

    rows = rows.contiguous()
    flat = rows.flatten()
    mean = scale_mean.to(rows.dtype)
    scalers = get_block_absmax(flat, NF4_BLOCK) - mean
    blocks = scalers.view(-1, scaler_block)
    factor = 256 / (2 * get_block_absmax(scalers, scaler_block))
    quantized_scalers = (blocks * factor[:, None]).round().clamp(-128, 127).flatten().to(torch.int8)
    n_blocks = flat.numel() // NF4_BLOCK
    codes = nf4_codes(rows.dtype, rows.device)
    data = NF4Tensor.convert_to_norm_float_weight(rows, n_blocks, NF4_BLOCK, codes)
    meta = SubclassTensorArgs(rows.shape, rows.stride(), 0, rows.dtype, rows.device, False)
    return NF4Tensor(meta, NF4_BLOCK, n_blocks, scaler_block, quantized_scalers, factor.contiguous(),
                     mean.clone(), data, codes)


@functools.lru_cache(maxsize=None)
def _nf4_code_book(dtype: torch.dtype) -> torch.Tensor:
    from torchao.dtypes.nf4tensor import to_nf4

    return to_nf4(torch.ones(NF4_BLOCK, dtype=dtype), NF4_BLOCK, 1).nf4


def nf4_codes(dtype: torch.dtype, device) -> torch.Tensor:
    """torchao's 16 NF4 levels (QLoRA's normal-float code book), as ``to_nf4`` makes them."""
    return _nf4_code_book(dtype).to(device=device, copy=True)


def int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)``: int8 codes and one scale per row (absmax / 127, in fp32), so that
    ``codes * scale`` is ``rows`` within half a scale."""
    scale = rows.float().abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    codes = (rows.float() / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def stored_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (local, not DTensor) tensor is stored in: an NF4Tensor's codes, scales
    and constants; any other tensor itself."""
    if isinstance(tensor, _nf4_class()):
        return [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
    return [tensor]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (local, not DTensor) tensor takes: an NF4Tensor's codes, scales and constants,
    not the dense size its dtype suggests."""
    return sum(t.numel() * t.element_size() for t in stored_tensors(tensor))


def _nf4_class():
    from torchao.dtypes.nf4tensor import NF4Tensor

    return NF4Tensor


def nf4_dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's ``NF4Tensor.to(dtype)``, bit for bit, at about half its cost on CPU: each byte
    of codes picks its two levels from one 256-row table in a single gather, where torchao splits
    the byte and gathers twice through two int64 index tensors. The products are the same
    (level × block scale, in the tensor's dtype), so the result is identical."""
    levels = weight.nf4
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # byte b: levels b>>4, b&15
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                       weight.scaler_block_size)
    values = pairs[weight.quantized_data.int()].view(-1, weight.block_size) * scales[:, None]
    return values.view(weight.shape).to(dtype)


def quantize_rows(fmt: str, rows: torch.Tensor, shape: tuple[int, int], group=None) -> tuple[torch.Tensor, ...]:
    """``rows`` (a rank's whole rows of a weight of ``shape``, in the layer's dtype) as ``fmt``
    stores them: nf4 ``(NF4Tensor,)``, int8 ``(codes, scale)``, none ``(rows,)``. ``group``: the
    ranks holding the other rows (NF4 quantizes against the whole tensor's scale mean)."""
    if fmt == "nf4":
        return (nf4_rows(rows, nf4_scale_mean(rows, group), nf4_scaler_block(shape)),)
    if fmt == "int8":
        return int8_rows(rows)
    return (rows,)


def as_stored(fmt: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole ``weight`` as a layer of ``dtype`` stores it as ``fmt`` and computes with it."""
    return dequantize(fmt, quantize_rows(fmt, weight.to(dtype), tuple(weight.shape)), dtype)


def dequantize(fmt: str, stored: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in ``dtype`` from the tensors `fmt` stores it in (none: the weight itself)."""
    if fmt == "int8":
        codes, scale = stored
        return codes.to(dtype) * scale.to(dtype)[:, None]
    if fmt == "nf4":
        return nf4_dense(stored[0], dtype)
    return stored[0].to(dtype)


class _QuantizedBaseLinear(torch.autograd.Function):
    """``x·Wᵀ`` for a frozen W that is stored quantized: backward dequantizes W again from the
    stored tensors instead of keeping the dense W of every layer alive until then."""

    @staticmethod
    def forward(ctx, x, dense, fmt, *stored):
        ctx.fmt = fmt
        ctx.save_for_backward(*stored)
        return F.linear(x, dense)

    @staticmethod
    def backward(ctx, grad_out):
        stored = ctx.saved_tensors  # once: activation checkpointing unpacks each saved tensor once
        return (grad_out @ dequantize(ctx.fmt, stored, grad_out.dtype), None, None) + (None,) * len(stored)


def frozen_linear(x: torch.Tensor, dense: torch.Tensor, fmt: str, stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``F.linear(x, dense)``, ``dense`` being the frozen weight `dequantize` made from ``stored``."""
    if fmt == "none":
        return F.linear(x, dense)
    return _QuantizedBaseLinear.apply(x, dense, fmt, *stored)

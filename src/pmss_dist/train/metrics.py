"""Rank-0 metrics: TensorBoard scalars and a progress line, plus the FLOP count behind MFU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pmss_dist.adapters.layers import adapter_layers
from pmss_dist.models.spec import ModelSpec
from pmss_dist.parallel.grads import replicated_parameters

# Dense bf16 peak FLOP/s per device, for MFU. Devices not listed (CPUs included) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peft_flops_per_token(frozen_matmul_params: int, adapter_flops_per_token: int, num_layers: int,
                         dim: int, seq_len: int, reference_forward: bool = False) -> float:
    """Training FLOPs per token when the base is frozen: forward (2N) and the input-gradient GEMMs
    of backward (2N), but no weight-gradient GEMMs (torchtitan's 6N counts those). Adapter work
    is counted forward + both backward GEMMs (3x); attention scores and values 3 x 4·L·T·d.
    ``reference_forward`` (dpo): plus the base's forward with the adapters off (2N + 4·L·T·d)."""
    attention = 4 * num_layers * seq_len * dim
    flops = 4 * frozen_matmul_params + 3 * adapter_flops_per_token + 3 * attention
    return flops + (2 * frozen_matmul_params + attention if reference_forward else 0)


def flops_per_token(model, model_spec: ModelSpec, seq_len: int, reference_forward: bool = False) -> float:
    """`peft_flops_per_token` of ``model`` as built (adapters swapped in, sharded or not): frozen
    matmul weights at 4N, trained ones (full fine-tuning) and adapter work at 6N."""
    frozen = adapter = 0
    adapter_tensors = set(replicated_parameters(model))
    for name, p in model.named_parameters():
        if p.dim() != 2 or "tok_embeddings" in name or p in adapter_tensors:
            continue
        if p.requires_grad:  # full fine-tuning: a trained GEMM costs 6N like an adapter's
            adapter += 2 * p.numel()
        else:
            frozen += p.numel()
    for layer in adapter_layers(model).values():
        adapter += 2 * layer.flops_per_token()
    return peft_flops_per_token(frozen, adapter, model_spec.num_layers, model_spec.dim, seq_len, reference_forward)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


class MetricsLogger:
    def __init__(self, tensorboard_dir: Path | None, enabled: bool):
        """Logs on the rank where ``enabled``; TensorBoard scalars too unless ``tensorboard_dir`` is None."""
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self._start = time.time()

    def log(self, step: int, max_steps: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        elapsed = time.time() - self._start
        shown = " ".join(f"{k.removeprefix('train/').removeprefix('perf/')}={v:.4g}" for k, v in scalars.items())
        print(f"[step {step}/{max_steps} {elapsed:6.1f}s] {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

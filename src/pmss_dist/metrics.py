"""Rank-0 metrics: TensorBoard scalars and a progress line, plus the FLOP count behind MFU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per device, for MFU. Devices not listed (CPUs included) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peft_flops_per_token(frozen_matmul_params: int, adapter_flops_per_token: int, num_layers: int,
                         dim: int, seq_len: int) -> float:
    """Training FLOPs per token when the base is frozen: forward (2N) and the input-gradient GEMMs
    of backward (2N), but no weight-gradient GEMMs (torchtitan's 6N counts those). Adapter work
    is counted forward + both backward GEMMs (3x); attention scores and values 3 x 4·L·T·d."""
    return 4 * frozen_matmul_params + 3 * adapter_flops_per_token + 12 * num_layers * seq_len * dim


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
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

"""Process-group set-up from torchrun's environment, or from SLURM's when started by ``srun``."""

from __future__ import annotations

import ctypes
import gc
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pmss_dist.parallel.mesh import release_mesh_groups


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; ``srun`` with one task per GPU sets SLURM_PROCID/
    SLURM_NTASKS/SLURM_LOCALID (MASTER_ADDR/MASTER_PORT then come from the sbatch script). A
    plain ``python launch/train.py`` is a world of one, so every run takes the same FSDP2 path."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if torch.cuda.is_available():
        # Under srun --gpus-per-task each task sees only its own GPU(s).
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        keep_freed_host_memory()
    watch_launcher()
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device if backend == "nccl" else None)
    return DistEnv(rank, world_size, local_rank, device)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 2**31 - 1  # mallopt takes an int


def keep_freed_host_memory() -> None:
    """On CPU, have glibc's malloc keep the memory a step frees for the next step. By default it
    returns large blocks to the kernel (those above a 128 KiB-32 MiB threshold are mmap'd and
    unmapped when freed, and a free heap top above twice that is trimmed), so each step
    page-faults its logits, their gradients and the gathered weights in again, zeroed by the
    kernel; how often depends on the heap's layout and changes from run to run. torch's own CPU
    launcher sets jemalloc up to keep freed memory for the same reason. Without glibc, nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)


# Set by torchrun in every worker it starts.
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"
_WATCH_INTERVAL_S = 0.5
_watching = False


def watch_launcher() -> None:
    """Under torchrun, end this process as soon as torchrun is gone. torchrun starts each worker in
    a session of its own, so a ``kill -9`` of torchrun (or of its process group) leaves the
    workers running, writing checkpoints beside whatever starts next. A daemon thread watches the
    parent pid; when the worker has been re-parented, it exits at once (like a SIGKILL: a
    checkpoint being written stays ``.partial``). Not started outside torchrun: a plain ``python``
    run may outlive its shell (nohup) on purpose."""
    global _watching
    if _watching or TORCHRUN_ENV not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and parent != 1:
            time.sleep(_WATCH_INTERVAL_S)
        print(f"rank {os.environ.get('RANK', '?')}: torchrun (pid {parent}) is gone: exiting", file=sys.stderr,
              flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="pmss-watch-launcher", daemon=True).start()
    _watching = True


def shutdown(*, meet_peers: bool = True) -> None:
    """Leave the process group and free it before the interpreter exits. ``meet_peers``: wait at
    a barrier first (a run that ended normally); a rank leaving on an error does not, since a peer
    may be elsewhere. The caller holds no model: its FSDP state holds the groups too."""
    if dist.is_initialized():
        if meet_peers:
            # Without this barrier gloo sometimes aborts at exit while a peer is still tearing down.
            dist.barrier()
        dist.destroy_process_group()
    release_mesh_groups()
    gc.collect()  # the model's reference cycles, and with them its groups: their threads are joined here

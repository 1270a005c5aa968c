"""CPU time per aten op, for profiling on a machine shared with other jobs.

torch.profiler times ops by wall clock; with other jobs taking the cores those durations were
inflated several-fold at random. ``OpCpuTimer`` charges each op this thread's CPU time instead
(``time.thread_time``), forward and backward alike (CPU autograd runs backward on the calling
thread; with one intra-op thread every op runs on it)."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode


class OpCpuTimer(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.thread_time() - start
        return out

    def table(self, steps: int = 1, top: int = 12, total_cpu_s: float | None = None) -> str:
        ops = sum(self.seconds.values())
        lines = [f"CPU time per step in aten ops: {1e3 * ops / steps:.1f} ms"
                 + (f" of {1e3 * total_cpu_s / steps:.1f} ms process CPU time" if total_cpu_s else "")]
        for op, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {op:40s} {1e3 * sec / steps:9.2f} ms  {100 * sec / ops:5.1f}%")
        return "\n".join(lines)


class StepProfiler:
    """``BENCH_PROFILE=first:count`` for a worker: optimizer steps first..first+count-1 (counted
    from 1) on rank 0 into ``$BENCH_RECORD_DIR/profile_rank0.txt``, torch.profiler's table for the
    first of them and, for the rest, `OpCpuTimer`'s CPU time per op and the process's minor page
    faults (memory the kernel maps in and zeroes). Each trainer wraps its step in `step`, so ours
    and the peers are profiled alike; without ``BENCH_PROFILE`` it does nothing."""

    def __init__(self, spec: str | None, record_dir: str):
        self.first, self.count = (int(v) for v in spec.split(":")) if spec else (0, 0)
        self.out_file = Path(record_dir) / "profile_rank0.txt"
        self.timer, self.calls, self.cpu, self.faults = OpCpuTimer(), 0, 0.0, 0

    @classmethod
    def from_env(cls) -> "StepProfiler":
        return cls(os.environ.get("BENCH_PROFILE"), os.environ["BENCH_RECORD_DIR"])

    @property
    def enabled(self) -> bool:
        return self.count > 0

    @contextlib.contextmanager
    def step(self, rank: int):
        self.calls += 1
        if rank != 0 or not self.first <= self.calls < self.first + self.count:
            yield
            return
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        if self.calls == self.first:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                yield
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
            self.out_file.write_text(f"torch.profiler, step {self.first} (wall-clock durations):\n{table}\n")
        else:
            start, faults = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with self.timer:
                yield
            self.cpu += time.process_time() - start
            self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        if self.calls == self.first + self.count - 1:
            with open(self.out_file, "a") as f:
                f.write(f"\nsteps {self.first + 1}-{self.first + self.count - 1}:\n"
                        f"{self.timer.table(steps=self.count - 1, top=25, total_cpu_s=self.cpu)}\n"
                        f"minor page faults per step: {self.faults / (self.count - 1):.0f}\n")

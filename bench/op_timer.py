"""CPU time per aten op, for profiling on a machine shared with other jobs.

torch.profiler times ops by wall clock; with other jobs taking the cores those durations were
inflated several-fold at random. ``OpCpuTimer`` charges each op this thread's CPU time instead
(``time.thread_time``), forward and backward alike (CPU autograd runs backward on the calling
thread; with one intra-op thread every op runs on it)."""

from __future__ import annotations

import time

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

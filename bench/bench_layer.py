"""Layer microbenchmark (issue 2): forward+backward time and memory of one adapted linear layer.

Compares, on Llama-7B-shaped matrices, the frozen base linear alone, LoRA (r=8, 16) and PMSS
(k at LoRA-r8's trainable-parameter budget, k = sqrt(8·(d_in+d_out)), and k=256), plus other
ways of computing the same PMSS update, all measured in one process with the repetitions
interleaved (A B C A B C ...) so that a machine shared with other jobs slows every variant alike.
Times are reported as the median over repetitions of (variant time / base time in the same
repetition).

The input requires grad, as inside a network: backward computes the input gradient (the frozen
base's only backward GEMM) plus the adapter's gradients.

    python bench/bench_layer.py --shapes 11008x4096 --reps 5   # one Llama-7B shape, 512 tokens (~10 min)
    python bench/bench_layer.py               # 4096x4096, 11008x4096, 4096x11008 (q/k/v/o, gate/up, down)
    python bench/bench_layer.py --quick       # 1024x1024, 2752x1024, 1024x2752, 256 tokens (~1 min)
    python bench/bench_layer.py --quick --profile base,lora,pmss   # plus where the time goes

PMSS formulations measured (all compute y = x·Wᵀ + s·x·Rᵀ·Uᵀ·Cᵀ, C = W[:, J], R = W[I, :]; all are
checked to give PMSSLinear's output, input gradient and core gradient before timing):
  pmss        pmss_dist.adapters.PMSSLinear: x·Rᵀ read off the base output (index_select), C = W[:, J]
              gathered from the weight in every forward. Extra GEMM work ∝ k·d_out per token.
  stored      C and R kept as frozen tensors: y = x·Wᵀ + s·((x·Rᵀ)·Uᵀ)·Cᵀ. Extra ∝ k·(d_in + d_out).
  storedC     C kept as a frozen tensor, x·Rᵀ read off the base output (no gather of C).
  input       the update folded into the input: y = (x + P_J·(s·(x·Rᵀ)·Uᵀ))·Wᵀ, R = W[I, :] (k contiguous
              rows), P_J scattering k values into columns J. W·P_J = C, so the base GEMM applies C for
              free; the extra GEMM work is ∝ k·d_in per token instead of k·d_out.
  fusedout    the output-side formulation as one autograd.Function (update accumulated into the base
              output in place, scale folded into the k×k core, C re-gathered in backward, nothing but
              x·Rᵀ saved).
  fusedauto   the same Function on the cheaper side for the shape: input side when d_out > d_in.
  compiled    torch.compile (inductor) of PMSSLinear.

Time is process CPU time with one intra-op thread by default (--clock wall / --threads to change):
on a machine shared with other jobs, wall time of a step varied several-fold at random, CPU time by
a few percent.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from op_timer import OpCpuTimer
from pmss_dist.adapters.layers import LoRALinear, PMSSLinear


class FrozenLinear(nn.Module):
    """The baseline: the frozen base weight alone (its backward is the input gradient only)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight)


class StoredSkeletonPMSS(nn.Module):
    """The alternative formulation: C and R stored as frozen tensors next to W."""

    def __init__(self, layer: PMSSLinear):
        super().__init__()
        w = layer.weight.detach()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.col_skeleton = nn.Parameter(w[:, layer.col_idx].clone(), requires_grad=False)  # C
        self.row_skeleton = nn.Parameter(w[layer.row_idx, :].clone(), requires_grad=False)  # R
        self.core, self.scale = layer.core, layer.scale

    def forward(self, x):
        update = F.linear(F.linear(F.linear(x, self.row_skeleton), self.core), self.col_skeleton)
        return F.linear(x, self.weight) + self.scale * update


class StoredColumnPMSS(nn.Module):
    """C stored (no per-forward gather); x·Rᵀ read off the base output as in PMSSLinear."""

    def __init__(self, layer: PMSSLinear):
        super().__init__()
        w = layer.weight.detach()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.col_skeleton = nn.Parameter(w[:, layer.col_idx].clone(), requires_grad=False)
        self.register_buffer("row_idx", layer.row_idx.clone())
        self.core, self.scale = layer.core, layer.scale

    def forward(self, x):
        base = F.linear(x, self.weight)
        update = F.linear(F.linear(base.index_select(-1, self.row_idx), self.core * self.scale),
                          self.col_skeleton)
        return base + update


class InputSidePMSS(nn.Module):
    """W·(x + s·P_J·U·R·x): C = W·P_J is applied by the base GEMM itself, R = W[I, :] is a
    gather of k contiguous rows. Costs one extra GEMM of k·d_in per token (vs k·d_out)."""

    def __init__(self, layer: PMSSLinear):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
        self.register_buffer("row_idx", layer.row_idx.clone())
        self.register_buffer("col_idx", layer.col_idx.clone())
        self.core, self.scale = layer.core, layer.scale

    def forward(self, x):
        row_proj = F.linear(x, self.weight.index_select(0, self.row_idx))  # x·Rᵀ
        x_adapted = x.index_add(-1, self.col_idx, F.linear(row_proj, self.core * self.scale))
        return F.linear(x_adapted, self.weight)


class _FusedPMSS(torch.autograd.Function):
    """PMSS forward and backward written out by hand, so that no T×d_out elementwise pass is
    spent on the update. ``input_side`` picks which skeleton the base GEMM applies for free:

    output side: y = x·Wᵀ, then y += (s·y[:, I]·Uᵀ)·Cᵀ in place (one GEMM of k·d_out per token);
                 backward: gx = (g with s·(g·C)·U added at columns I)·W.
    input side:  y = (x + P_J·(s·(x·Rᵀ)·Uᵀ))·Wᵀ (one GEMM of k·d_in per token);
                 backward: gx = g·W + (s·(g·W)[:, J]·U)·R.
    """

    @staticmethod
    def forward(ctx, x, weight, row_idx, col_idx, core, scale, input_side):
        x2 = x.reshape(-1, x.shape[-1])
        scaled_core = (core * scale).to(x.dtype)
        if input_side:
            row_proj = x2 @ weight.index_select(0, row_idx).t()  # x·Rᵀ, k contiguous rows of W
            out = x2.index_add(1, col_idx, row_proj @ scaled_core.t()) @ weight.t()
        else:
            out = x2 @ weight.t()
            row_proj = out.index_select(1, row_idx)  # x·Rᵀ read off the base output
            out.addmm_(row_proj @ scaled_core.t(), weight.index_select(1, col_idx).t())
        ctx.save_for_backward(weight, row_idx, col_idx, core, row_proj)
        ctx.scale, ctx.input_side = scale, input_side
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        weight, row_idx, col_idx, core, row_proj = ctx.saved_tensors
        g = grad_out.reshape(-1, weight.shape[0])
        scaled_core = (core * ctx.scale).to(g.dtype)
        grad_x = None
        if ctx.input_side:
            grad_adapted = g @ weight  # the base input-gradient GEMM, needed for the core anyway
            grad_z = grad_adapted.index_select(1, col_idx)
            if ctx.needs_input_grad[0]:
                grad_x = grad_adapted.addmm_(grad_z @ scaled_core, weight.index_select(0, row_idx))
        else:
            grad_z = g @ weight.index_select(1, col_idx)  # g·C
            if ctx.needs_input_grad[0]:
                grad_x = g.index_add(1, row_idx, grad_z @ scaled_core) @ weight
        grad_core = (grad_z.t() @ row_proj).to(core.dtype) * ctx.scale
        if grad_x is not None:
            grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1])
        return grad_x, None, None, None, grad_core, None, None


class FusedPMSS(nn.Module):
    """`_FusedPMSS` on one side (``input_side``), or on the cheaper one for the shape (None)."""

    def __init__(self, layer: PMSSLinear, input_side: bool | None = None):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
        self.register_buffer("row_idx", layer.row_idx.clone())
        self.register_buffer("col_idx", layer.col_idx.clone())
        self.core, self.scale = layer.core, layer.scale
        # The extra GEMM is k·d_in per token on the input side, k·d_out on the output side.
        self.input_side = layer.out_features > layer.in_features if input_side is None else input_side

    def forward(self, x):
        return _FusedPMSS.apply(x, self.weight, self.row_idx, self.col_idx, self.core, self.scale,
                                self.input_side)


def make_pmss(weight: torch.Tensor, k: int, gen: torch.Generator) -> PMSSLinear:
    d_out, d_in = weight.shape
    layer = PMSSLinear(d_in, d_out, k, alpha=float(k))
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.row_idx.copy_(torch.randperm(d_out, generator=gen)[:k])
        layer.col_idx.copy_(torch.randperm(d_in, generator=gen)[:k])
        layer.core.copy_(torch.randn(k, k, generator=gen) * 0.01)  # nonzero: a mid-training core
    return layer


def make_lora(weight: torch.Tensor, r: int, gen: torch.Generator) -> LoRALinear:
    d_out, d_in = weight.shape
    layer = LoRALinear(d_in, d_out, r, alpha=float(r))
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.lora_a.copy_(torch.randn(r, d_in, generator=gen) * 0.01)
        layer.lora_b.copy_(torch.randn(d_out, r, generator=gen) * 0.01)
    return layer


ALL_KINDS = ("base", "lora", "pmss", "stored", "storedC", "input", "fusedout", "fusedauto", "compiled")


def build_variants(d_out: int, d_in: int, kinds=ALL_KINDS, seed: int = 0) -> dict[str, nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) * 0.02
    k_eq = round(math.sqrt(8 * (d_in + d_out)))  # k² = 8·(d_in + d_out): LoRA-r8's parameter count
    variants: dict[str, nn.Module] = {"base": FrozenLinear(weight)}
    for r in (8, 16):
        variants[f"lora_r{r}"] = make_lora(weight, r, gen)
    for k in dict.fromkeys((k_eq, 256)):  # the two coincide on a 4096x4096 matrix
        pmss = make_pmss(weight, k, gen)
        variants[f"pmss_k{k}"] = pmss
        variants[f"stored_k{k}"] = StoredSkeletonPMSS(pmss)
        variants[f"storedC_k{k}"] = StoredColumnPMSS(pmss)
        variants[f"input_k{k}"] = InputSidePMSS(pmss)
        variants[f"fusedout_k{k}"] = FusedPMSS(pmss, input_side=False)
        variants[f"fusedauto_k{k}"] = FusedPMSS(pmss)
        variants[f"compiled_k{k}"] = torch.compile(pmss)
    # pmss is always built: it is the reference the other formulations are checked against.
    return {n: m for n, m in variants.items() if n.split("_")[0] in (*kinds, "base", "pmss")}


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None
    module(x).backward(grad_out)


def time_steps(module, x, grad_out, iters: int, clock) -> float:
    start = clock()
    for _ in range(iters):
        step(module, x, grad_out)
    return (clock() - start) / iters


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps between forward and backward, counting each storage once and leaving
    out the layer's own parameters and buffers (resident anyway) and the input x (the caller's)."""
    resident = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers(), x]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(seen.values())


def peak_step_bytes(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> int:
    """Peak of (allocated - freed) during one forward+backward, from torch.profiler's CPU
    ``[memory]`` events summed in time order: the step's own high-water mark above what was
    allocated before it (output, saved tensors, temporaries, input and adapter gradients)."""
    step(module, x, grad_out)  # warm: lazily created state is not part of the step
    x.grad = None  # freed before the window: the profiler sees only the step's own traffic
    for p in module.parameters():
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x).backward(grad_out)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def check_same_function(variants: dict[str, nn.Module], x, grad_out) -> None:
    """Every PMSS formulation of one k gives PMSSLinear's output, input gradient and core gradient."""
    def run(m):
        step(m, x, grad_out)
        return m(x).detach(), x.grad.clone(), next(p for p in m.parameters() if p.requires_grad).grad.clone()

    for name, m in variants.items():
        kind, _, k = name.partition("_")
        if kind not in ("base", "lora", "pmss", "compiled"):
            for got, want, what in zip(run(m), run(variants[f"pmss_{k}"]), ("output", "input grad", "core grad")):
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=lambda e: f"{name} {what}: {e}")


def profile_variants(variants: dict[str, nn.Module], names: list[str], x, grad_out, iters: int) -> None:
    """Where the time goes: torch.profiler's op table, then CPU time per aten op (OpCpuTimer)."""
    for name in names:
        m = variants[name]
        for _ in range(2):
            step(m, x, grad_out)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                step(m, x, grad_out)
        print(f"\n### profile: {name} ({iters} steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        timer = OpCpuTimer()
        with timer:
            for _ in range(iters):
                step(m, x, grad_out)
        print(timer.table(steps=iters, top=8))


def run_shape(d_out: int, d_in: int, tokens: int, reps: int, iters: int, kinds, clock,
              profile_names: list[str] = ()) -> list[dict]:
    variants = build_variants(d_out, d_in, kinds)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_in, generator=gen).requires_grad_(True)
    grad_out = torch.randn(tokens, d_out, generator=gen)
    check_same_function(variants, x, grad_out)
    if profile_names:
        profile_variants(variants, [n for n in variants if n.split("_")[0] in profile_names], x, grad_out, 3)
    for m in variants.values():  # warm-up (and compile)
        for _ in range(2):
            step(m, x, grad_out)
    names = list(variants)
    times = {n: [] for n in names}
    ratios = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no fixed position
        this = {n: time_steps(variants[n], x, grad_out, iters, clock) for n in order}
        for n in names:
            times[n].append(this[n])
            ratios[n].append(this[n] / this["base"])
    rows = []
    for n in names:
        m = variants[n]
        mod = getattr(m, "_orig_mod", m)
        rows.append({"shape": f"{d_out}x{d_in}", "variant": n, "trainable": trainable_count(mod),
                     "ms": 1e3 * statistics.median(times[n]), "ratio": statistics.median(ratios[n]),
                     "ratio_lo": min(ratios[n]), "ratio_hi": max(ratios[n]),
                     "saved_mib": saved_activation_bytes(m, x) / 2**20,
                     "peak_mib": peak_step_bytes(m, x, grad_out) / 2**20})
    return rows


def print_table(rows: list[dict], tokens: int) -> None:
    print("\n| shape (d_out x d_in) | variant | trainable | fwd+bwd ms (median) | x base (median) | "
          "x base (min..max) | saved activations MiB | peak step MiB |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['trainable']:,} | {r['ms']:.1f} | {r['ratio']:.3f} | "
              f"{r['ratio_lo']:.3f}..{r['ratio_hi']:.3f} | {r['saved_mib']:.1f} | {r['peak_mib']:.1f} |")
    print(f"\ntokens per step: {tokens}; input {tokens}x d_in fp32 requires grad (not counted in memory).")


def print_targets(rows: list[dict]) -> None:
    """Issue 2's target: PMSS at LoRA-r8's parameter budget costs <= 1.10x the frozen base's step
    time, and no more than LoRA r=8."""
    print("\n| shape | formulation | PMSS k (LoRA-r8 budget) x base | LoRA r8 x base | <= 1.10x base | <= LoRA r8 |")
    print("|---|---|---:|---:|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by_name = {r["variant"]: r for r in rows if r["shape"] == shape}
        d_out, d_in = (int(v) for v in shape.split("x"))
        k_eq = round(math.sqrt(8 * (d_in + d_out)))
        lora = by_name["lora_r8"]["ratio"] if "lora_r8" in by_name else float("nan")
        for name, r in by_name.items():
            if name.endswith(f"_k{k_eq}"):
                print(f"| {shape} | {name} | {r['ratio']:.3f} | {lora:.3f} | {'met' if r['ratio'] <= 1.10 else 'MISSED'} | "
                      f"{'met' if r['ratio'] <= lora else 'MISSED'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024-dim matrices, 256 tokens, fewer repetitions")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default 512, quick 256)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 15, quick 9)")
    parser.add_argument("--iters", type=int, default=1, help="fwd+bwd steps per timed measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine one thread's CPU time "
                             "is the stable measure)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (not inflated when other jobs take the cores); wall")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated d_outxd_in (default 4096x4096,11008x4096,4096x11008)")
    parser.add_argument("--variants", default=",".join(ALL_KINDS),
                        help=f"comma-separated kinds to measure (default all: {','.join(ALL_KINDS)})")
    parser.add_argument("--profile", default="",
                        help="comma-separated variant kinds (e.g. base,lora,pmss) to profile with torch.profiler")
    args = parser.parse_args()
    tokens = args.tokens or (256 if args.quick else 512)
    reps = args.reps or (9 if args.quick else 15)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    shapes = args.shapes or ("1024x1024,2752x1024,1024x2752" if args.quick else "4096x4096,11008x4096,4096x11008")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"tokens={tokens} reps={reps} iters={args.iters} clock={args.clock} fp32")
    rows = []
    for shape in shapes.split(","):
        d_out, d_in = (int(v) for v in shape.lower().split("x"))
        rows += run_shape(d_out, d_in, tokens, reps, args.iters, args.variants.split(","), clock,
                          [n for n in args.profile.split(",") if n])
        print_table([r for r in rows if r["shape"] == shape], tokens)
    print("\n## all shapes")
    print_table(rows, tokens)
    print_targets(rows)


if __name__ == "__main__":
    main()

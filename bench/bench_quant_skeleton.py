"""Issue 20, point 3: where a quantized base's PMSS skeletons C = W[:, J] and R = W[I, :] come from.

  sliced   (a) slices of the dequantized weight, read in every forward as the unquantized path
           reads them (pmss_dist.adapters.PMSSLinear with model.quantize): no extra memory.
  stored   (b) C and R copied from the original weight before quantization and kept as frozen
           tensors in the compute dtype (k·(d_in + d_out) more frozen values per layer); x·Rᵀ is then
           an extra GEMM, since the base output comes from the quantized W.

For each Llama-shaped layer, one process, 1 intra-op thread, process CPU time of forward+backward
(input and core gradients) on --tokens tokens, repetitions interleaved (dense, sliced, stored, ...)
and reported as the median over repetitions of (variant time / unquantized PMSS time in the same
repetition). Error: the adapted layer's output against the unquantized layer's
x·(W + s·C·U·R)ᵀ with a trained-like core (an update of 10% of W's norm), relative Frobenius norm;
"base only" is the same with U = 0, the error quantizing the base costs before any skeleton.

    python bench/bench_quant_skeleton.py                    # 2048-wide layers (Llama-7B's halved), 256 tokens
    python bench/bench_quant_skeleton.py --shapes 4096x4096,11008x4096 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pmss_dist.adapters.layers import PMSSLinear
from pmss_dist.adapters.quantize import tensor_bytes


def layer(w: torch.Tensor, k: int, fmt: str, rows: torch.Tensor, cols: torch.Tensor, core: torch.Tensor):
    m = PMSSLinear(w.shape[1], w.shape[0], k, float(k), dtype=w.dtype, quantize=fmt)
    m.load_weight(w)
    with torch.no_grad():
        m.row_idx.copy_(rows)
        m.col_idx.copy_(cols)
        m.core.copy_(core)
    return m


def stored_forward(m: PMSSLinear, c: torch.Tensor, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(b): the base from the quantized W, the update from the stored original C and R."""
    dense = m.dense_weight(x.dtype)
    base = m.base_linear(x, dense)
    return base + m.scale * F.linear(F.linear(F.linear(x, r), m.core.to(x.dtype)), c)


def step_time(fn, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    start = time.process_time()
    fn(x).sum().backward()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x2048,5504x2048,2048x5504", help="d_outxd_in, comma-separated")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print("| shape | k | variant | time / unquantized | frozen bytes / unquantized | output error | base only |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        d_out, d_in = map(int, shape.split("x"))
        k = int((8 * (d_in + d_out)) ** 0.5)  # LoRA-r8's trainable budget
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(d_out, d_in, generator=gen) * 0.02).to(dtype)
        rows, cols = torch.randperm(d_out, generator=gen)[:k], torch.randperm(d_in, generator=gen)[:k]
        c, r = w[:, cols].clone(), w[rows, :].clone()
        # a core whose update s·C·U·R is 10% of W's norm, as after some training
        core = torch.randn(k, k, generator=gen)
        update = (c.float() @ core @ r.float())
        core *= 0.1 * w.float().norm() / update.norm()
        x = torch.randn(args.tokens, d_in, generator=gen).to(dtype)
        reference = x.float() @ (w.float() + (c.float() @ core @ r.float())).T
        variants = {"unquantized": (layer(w, k, "none", rows, cols, core), None)}
        for fmt in ("nf4", "int8"):
            m = layer(w, k, fmt, rows, cols, core)
            variants[f"{fmt} sliced (a)"] = (m, None)
            variants[f"{fmt} stored (b)"] = (m, (c, r))

        def run(name):
            m, stored = variants[name]
            return m if stored is None else (lambda x: stored_forward(m, *stored, x))

        times = {name: [] for name in variants}
        for _ in range(args.reps):
            for name in variants:  # interleaved
                times[name].append(step_time(run(name), x))
        dense_bytes = tensor_bytes(variants["unquantized"][0].weight)
        for name, (m, stored) in variants.items():
            ratio = statistics.median(t / d for t, d in zip(times[name], times["unquantized"]))
            frozen = sum(tensor_bytes(t) for t in m.stored_weight()) + (sum(tensor_bytes(t) for t in stored)
                                                                         if stored else 0)
            with torch.no_grad():
                out = run(name)(x).float()
                base_only = (m.dense_weight(torch.float32) - w.float()).norm() / w.float().norm()
            error = float((out - reference).norm() / reference.norm())
            print(f"| {d_out}x{d_in} | {k} | {name} | {ratio:.2f} | {frozen / dense_bytes:.3f} | {error:.4f} | "
                  f"{float(base_only):.4f} |", flush=True)


if __name__ == "__main__":
    main()

"""Skeleton-selection cost: per matrix and method, and distributed over N gloo processes.

  python bench/bench_selection.py                       # 4096x4096 and 11008x4096, k=256
  python bench/bench_selection.py --quick               # scaled-down shapes, seconds
  python bench/bench_selection.py --world-size 2        # select_skeletons on 2 LLaMA-7B layers, N=1 vs N=2

Single-matrix mode times the SVD once per (shape, svd mode) and then each index picker on its
singular vectors, which is exactly the work select_skeleton does (total = prep + svd + pick), so the
three SVD-based methods do not each pay for their own SVD in the benchmark. The LLaMA-7B estimate is
32 layers x (4 x first shape + 3 x second shape): q,k,v,o, then gate, up and down (down is the
transpose of gate/up, and an SVD costs the same on a matrix and its transpose).

Distributed mode gives every rank --threads-per-rank threads (default 1), for N=1 and N=2 alike: on
a GPU node every rank brings its own device and cores, so that is the scaling a cluster sees. Pass
--threads-per-rank 0 to split --threads between the ranks instead (a fixed machine shared by more
processes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import sys
import tempfile
import time
import zlib
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pmss_dist.adapters.selection import METHODS, PICKERS, select_skeleton, single_threaded, top_singular_vectors  # noqa: E402

LLAMA7B_LAYERS = 32


def parse_shape(s: str) -> tuple[int, int]:
    a, b = s.lower().split("x")
    return int(a), int(b)


def bench_single(shapes: list[tuple[int, int]], k: int, svd_modes: list[str], methods: list[str]) -> None:
    print(f"# single matrix, k={k}, torch threads={torch.get_num_threads()}, times in seconds")
    select_skeleton(torch.randn(64, 48), 8, "deim", svd="exact")  # MKL/OpenMP start-up off the clock
    print(f"{'shape':>12} {'svd':>10} {'method':>9} {'prep':>7} {'svd':>8} {'pick':>7} {'total':>8}")
    totals: dict[tuple[tuple[int, int], str, str], float] = {}
    for shape in shapes:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).mul_(0.02)
        t0 = time.perf_counter()
        w64 = w.to(torch.float64)
        assert bool(torch.isfinite(w64).all())
        prep = time.perf_counter() - t0
        for method in (m for m in methods if m not in PICKERS):  # SVD-free methods
            t0 = time.perf_counter()
            select_skeleton(w, k, method, name="bench")
            totals[(shape, "-", method)] = t = time.perf_counter() - t0
            print(f"{_fmt(shape):>12} {'-':>10} {method:>9} {'':>7} {'':>8} {'':>7} {t:8.2f}", flush=True)
        for mode in svd_modes:
            if not any(m in PICKERS for m in methods):
                break
            t0 = time.perf_counter()
            u, v = (m[0].contiguous() for m in top_singular_vectors(w64[None], k, svd=mode, names=["bench"]))
            t_svd = time.perf_counter() - t0
            for method in (m for m in methods if m in PICKERS):
                t0 = time.perf_counter()
                with single_threaded():
                    PICKERS[method](u), PICKERS[method](v)
                pick = time.perf_counter() - t0
                totals[(shape, mode, method)] = t = prep + t_svd + pick
                print(f"{_fmt(shape):>12} {mode:>10} {method:>9} {prep:7.2f} {t_svd:8.2f} {pick:7.2f} {t:8.2f}",
                      flush=True)
            del u, v
        del w, w64

    if len(shapes) >= 2:
        attn, mlp = shapes[0], shapes[1]
        print(f"\n# estimate for {LLAMA7B_LAYERS} layers x (4 x {_fmt(attn)} + 3 x {_fmt(mlp)}), "
              "one process; divide by N for N ranks (each rank owns 1/N of the matrices)")
        for (shape, mode, method), t in totals.items():
            if shape != attn or (mlp, mode, method) not in totals:
                continue
            est = LLAMA7B_LAYERS * (4 * t + 3 * totals[(mlp, mode, method)])
            print(f"{method:>9} svd={mode:<10} {est:9.0f} s  ({est / 3600:.2f} h)")


# ---------------------------------------------------------------------------------------------
# Distributed mode


def llama_layer_shapes(layers: int, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        for p in ("q", "k", "v", "o"):
            shapes[f"layers.{i}.self_attn.{p}_proj"] = (hidden, hidden)
        shapes[f"layers.{i}.mlp.gate_proj"] = (inter, hidden)
        shapes[f"layers.{i}.mlp.up_proj"] = (inter, hidden)
        shapes[f"layers.{i}.mlp.down_proj"] = (hidden, inter)
    return shapes


def rows_of(name: str, shape: tuple[int, int], start: int, stop: int, block: int = 256) -> torch.Tensor:
    """Rows [start, stop) of a seeded random weight, built without materialising the whole matrix
    (so a rank's memory shows only its shard plus what selection itself needs)."""
    parts = []
    for b in range(start // block, math.ceil(stop / block)):
        lo = b * block
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{b}".encode()))
        blk = torch.randn(min(block, shape[0] - lo), shape[1], generator=g).mul_(0.02)
        parts.append(blk[max(start - lo, 0):stop - lo].to(torch.bfloat16))
    return torch.cat(parts) if parts else torch.empty(0, shape[1], dtype=torch.bfloat16)


def _dist_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import torch.distributed as dist
    from pmss_dist.adapters.distributed_selection import select_skeletons

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads_per_rank or max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=2))
    mesh = init_device_mesh("cpu", (world,))
    shapes = llama_layer_shapes(args.layers, args.hidden, args.intermediate)
    weights = {}
    for name, shape in shapes.items():
        chunk = math.ceil(shape[0] / world)  # torch.chunk / FSDP2 layout
        lo, hi = min(rank * chunk, shape[0]), min((rank + 1) * chunk, shape[0])
        weights[name] = DTensor.from_local(rows_of(name, shape, lo, hi), mesh, [Shard(0)], run_check=False,
                                           shape=torch.Size(shape), stride=(shape[1], 1))
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist.barrier()
    t0 = time.perf_counter()
    sel = select_skeletons(weights, {n: args.k for n in shapes}, args.method, svd=args.svd, progress=rank == 0)
    dist.barrier()
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {"rank": rank, "wall_s": wall, "base_mib": base_kib / 1024, "peak_mib": peak_kib / 1024,
              "indices_crc": zlib.crc32(json.dumps({n: [r.tolist(), c.tolist()] for n, (r, c) in sel.items()},
                                                   sort_keys=True).encode())}
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "report.json")
        mp.spawn(_dist_worker, args=(world, port, args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def bench_distributed(args: argparse.Namespace) -> None:
    shapes = llama_layer_shapes(args.layers, args.hidden, args.intermediate)
    mib = sum(a * b for a, b in shapes.values()) * 2 / 2**20
    print(f"# select_skeletons: {args.layers} layer(s) of hidden={args.hidden}, intermediate={args.intermediate} "
          f"({len(shapes)} matrices, {mib:.0f} MiB bf16), k={args.k}, method={args.method}, svd={args.svd}, "
          "gloo on CPU, " + (f"{args.threads_per_rank} thread(s) per rank" if args.threads_per_rank
                                 else f"{args.threads} threads split between the ranks"))
    print(f"{'N':>3} {'wall_s':>8} {'speedup':>8} {'rss before MiB':>15} {'peak rss MiB (max rank)':>24} "
          f"{'same indices':>13}")
    first = None
    for world in sorted({1, args.world_size}):
        reports = run_world(world, args)
        wall = max(r["wall_s"] for r in reports)
        crcs = {r["indices_crc"] for r in reports}
        first = first or (wall, crcs)
        same = len(crcs) == 1 and crcs == first[1]
        print(f"{world:>3} {wall:8.1f} {first[0] / wall:8.2f} {max(r['base_mib'] for r in reports):15.0f} "
              f"{max(r['peak_mib'] for r in reports):24.0f} {str(same):>13}", flush=True)


def _fmt(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated d_outxd_in")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--svd-modes", default="exact,randomized", help="single-matrix mode")
    ap.add_argument("--quick", action="store_true", help="shapes and k divided by 8, for a smoke test")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total CPU threads")
    ap.add_argument("--world-size", type=int, default=0, help="run select_skeletons with N=1 and N gloo ranks")
    ap.add_argument("--threads-per-rank", type=int, default=1,
                    help="distributed mode: threads of each rank (0: split --threads between the ranks)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--method", default="deim", help="distributed mode")
    ap.add_argument("--svd", default="auto", help="distributed mode")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.k = "512x512,1376x512", max(1, args.k // 8)
        args.hidden, args.intermediate = args.hidden // 8, args.intermediate // 8

    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPU cores, load average {load}, {time.strftime('%Y-%m-%d')}")
    if args.world_size:
        bench_distributed(args)
    else:
        bench_single([parse_shape(s) for s in args.shapes.split(",")], args.k, args.svd_modes.split(","),
                     args.methods.split(","))


if __name__ == "__main__":
    main()

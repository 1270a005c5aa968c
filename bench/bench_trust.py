"""What trust costs (issue 21): content hashes of a checkpoint's files, and the content fingerprint
of a base checkpoint.

1. Publication. A checkpoint of N MiB saved with DCP's own ``FileSystemWriter`` (fsync on, as in
   training) against ``checkpoints.storage.HashingWriter`` (SHA-256 of every file computed from the bytes
   as they are written), and against hashing afterwards by reading the files back; plus the cost
   of verifying them on resume (``checkpoints.record.verify``).
2. Loading the base. ``build_model`` with the base's weights read (what a run's start-up pays),
   against the content fingerprint computed cold (every weight file hashed), from the cache, and
   the header-only fingerprint of earlier versions.

    python bench/bench_trust.py                       # 64 and 512 MiB checkpoints, a ~0.6 GB base
    python bench/bench_trust.py --sizes-mib 16 --base-layers 2

Prints seconds and ratios (median of ``--repeats``). Files go to a temporary directory (or
``--dir``); the page cache is warm for every variant alike (the files were just written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from pmss_dist.build import build_model
from pmss_dist.checkpoints.fingerprint import base_fingerprint, cached_fingerprint, header_fingerprint
from pmss_dist.files import file_sha256
from pmss_dist.hf.load import read_model_spec
from pmss_dist.models.builtin import write_tiny_checkpoint
from pmss_dist.checkpoints.record import verify
from pmss_dist.checkpoints.storage import HashingWriter

warnings.filterwarnings("ignore", message=".*assuming the intent is to")


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, run in turn within every repeat so that drift in the
    machine's load (shared cores, the disk's write-back) falls on all of them alike."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_publication(root: Path, mib: int, repeats: int) -> None:
    # fp32 tensors of a few sizes, like an adapter's cores and Adam moments, plus small items
    n = mib * 2**20 // 4
    state = {"model": {f"t{i}": torch.randn(n // 8) for i in range(8)},
             "optim": {"lr": 1e-3, "betas": (0.9, 0.999)}}
    target = root / f"ck{mib}"

    def save(writer_cls):
        shutil.rmtree(target, ignore_errors=True)
        writer = writer_cls(target)
        dcp.save(state, storage_writer=writer, no_dist=True)
        return writer

    def save_then_read_back():
        save(FileSystemWriter)
        for path in sorted(target.iterdir()):
            file_sha256(path)

    def save_and_publish():
        # what publication does with the writer's digests: one manifest with every file's hash
        writer = save(HashingWriter)
        digests = writer.digests
        files = {p.name: p.stat().st_size for p in sorted(target.iterdir())}
        sha = {name: digests.get(name) or file_sha256(target / name) for name in files}
        (target / "manifest.json").write_text(json.dumps({"files": files, "sha256": sha, "extra": {}}))

    t = interleaved({"plain": lambda: save(FileSystemWriter), "read_back": save_then_read_back,
                     "hashing": save_and_publish}, repeats)
    check = timed(lambda: verify(target), repeats)  # the checkpoint save_and_publish left last
    size = sum(p.stat().st_size for p in target.iterdir())
    plain, hashing, read_back = t["plain"], t["hashing"], t["read_back"]
    print(f"| {size / 2**20:.0f} MiB | {plain:.3f} | {hashing:.3f} ({hashing / plain:.2f}x) | "
          f"{read_back:.3f} ({read_back / plain:.2f}x) | {check:.3f} ({check / plain:.2f}x, "
          f"{size / check / 2**30:.2f} GiB/s) |", flush=True)
    shutil.rmtree(target, ignore_errors=True)


def bench_fingerprint(root: Path, layers: int, repeats: int) -> None:
    base = write_tiny_checkpoint(root / "base", seed=0, hidden_size=1024, intermediate_size=2816,
                                 num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                 vocab_size=32000)
    spec = read_model_spec(base)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))

    def load():
        build_model(spec, adapter=None, mesh=None, device=torch.device("cpu"), dtype=torch.float32,
                    weights=base)

    def cold():
        shutil.rmtree(root / "cache", ignore_errors=True)
        base_fingerprint(base)

    os.environ["PMSS_CACHE_DIR"] = str(root / "cache")
    load_s = timed(load, repeats)
    cold_s = timed(cold, repeats)
    base_fingerprint(base)
    cached_s = timed(lambda: cached_fingerprint(base), repeats)
    header_s = timed(lambda: header_fingerprint(base), repeats)
    print(f"| {size / 2**30:.2f} GiB | {load_s:.2f} | {cold_s:.2f} ({cold_s / load_s:.2f}x) | "
          f"{cached_s * 1e3:.2f} ms ({cached_s / load_s:.4f}x) | {header_s * 1e3:.2f} ms ({header_s / load_s:.4f}x) |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--base-layers", type=int, default=8, help="layers of the synthetic base (dim 1024)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench-trust-", dir=args.dir))
    try:
        print("## publication: DCP save (fsync) without hashes, hashing while writing, hashing by reading back; "
              "verify on resume\n")
        print("| checkpoint | save s | hash while writing s | read back + hash s | verify s |")
        print("|---|---|---|---|---|")
        for mib in args.sizes_mib:
            bench_publication(root, mib, args.repeats)
        print("\n## base fingerprint against loading the base (build_model with its weights)\n")
        print("| base | load s | content fingerprint, cold s | cached | header-only (before) |")
        print("|---|---|---|---|---|")
        bench_fingerprint(root, args.base_layers, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

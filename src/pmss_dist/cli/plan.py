"""Will a run fit, and how fast will it go? ``pmss-plan`` answers for a config on a cluster that
is not here, in one CPU process, before the job is queued.

    pmss-plan --config configs/llama3_3_70b.yaml --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80
    pmss-plan --config configs/llama3_1_405b.yaml --nodes 64 adapter.kind=lora adapter.rank=8 --json plan.json

It runs the trainer's own build (meta device, adapters, activation checkpointing, FSDP2 on the
2-D mesh) and one training step on fake devices: torch's fake process group for the world size,
fake tensors for the weights. It prints, per rank, the bytes of the frozen shards, the gathered
blocks, the cores with their gradients and AdamW state, the activations (per AC mode) and the
logits, and the peak; per step, the bytes all-gathered, reduce-scattered and all-reduced within
and between nodes; a predicted step time and tokens/s; and the cheapest settings that fit
(docs/SCALE.md). ``key=value`` overrides work as for training. The model's shape comes from
``model.path/config.json``, ``--hf-config``, or the published shapes in `pmss_dist.plan.shapes`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pmss_dist.errors import ConfigError
from pmss_dist.config import load_config

# An H100-80GB node: ~790 TFLOP/s measured dense bf16 per GPU; NVLink 4 (450 GB/s per direction,
# ~80% reached by NCCL's ring collectives: 360 GB/s = 2880 Gb/s); one 400 Gb/s InfiniBand NDR NIC per
# GPU (~80% reached: 320 Gb/s).
DEFAULTS = dict(nodes=1, gpus_per_node=8, gpu_memory_gib=80.0, peak_tflops=790.0, intra_gbps=2880.0,
                inter_gbps=320.0, mfu=0.45, headroom=0.10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for pmss-train")
    parser.add_argument("--nodes", type=int, default=DEFAULTS["nodes"])
    parser.add_argument("--gpus-per-node", type=int, default=DEFAULTS["gpus_per_node"])
    parser.add_argument("--gpu-memory-gib", type=float, default=DEFAULTS["gpu_memory_gib"])
    parser.add_argument("--peak-tflops", type=float, default=DEFAULTS["peak_tflops"],
                        help="dense bf16 TFLOP/s per GPU (default: ~790, measured on H100)")
    parser.add_argument("--intra-gbps", type=float, default=DEFAULTS["intra_gbps"],
                        help="per-GPU bandwidth within a node, Gb/s (default 2880: NVLink 4 at ~80%%)")
    parser.add_argument("--inter-gbps", type=float, default=DEFAULTS["inter_gbps"],
                        help="per-GPU bandwidth between nodes, Gb/s (default 320: 400G InfiniBand at ~80%%)")
    parser.add_argument("--mfu", type=float, default=DEFAULTS["mfu"],
                        help="fraction of the peak the step's GEMMs reach (default 0.45)")
    parser.add_argument("--headroom", type=float, default=DEFAULTS["headroom"],
                        help="fraction of GPU memory kept free for CUDA, NCCL and the allocator (default 0.10)")
    parser.add_argument("--hf-config", default=None, help="the model's config.json, when model.path has none")
    parser.add_argument("--json", default=None, help="also write the whole plan as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--full-depth", action="store_true",
                        help="run the fake steps at the model's own depth, not at two small depths extrapolated")
    args = parser.parse_args(argv)

    from pmss_dist.plan.planner import plan
    from pmss_dist.plan.report import render, to_json
    from pmss_dist.plan.shapes import resolve_model_spec
    from pmss_dist.plan.timing import Cluster

    try:
        cfg = load_config(args.config, args.overrides)
        model_spec, source = resolve_model_spec(cfg.model.path, args.hf_config)
        cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                          peak_tflops=args.peak_tflops, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                          mfu=args.mfu, headroom=args.headroom)
        progress = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
        result = plan(cfg, model_spec, cluster, model_name=Path(cfg.model.path).name, model_source=source,
                      progress=progress, full_depth=args.full_depth)
    except ConfigError as err:
        print(f"config error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

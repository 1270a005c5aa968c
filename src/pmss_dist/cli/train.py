"""Fine-tune with PMSS, LoRA or full fine-tuning on 1..N processes (``pmss-train``; torchrun runs it
through ``launch/train.py``).

    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.yaml max_steps=5 output_dir=/tmp/x
"""

import argparse
import os
import sys

from pmss_dist.config import ConfigError, load_config
from pmss_dist.train.trainer import EXIT_REQUEUE, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=5 adapter.rank=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        # Every rank parses the same config and stops here, before any collective: no hang.
        print(f"config error: {err}", file=sys.stderr)
        return 2
    summary = train(cfg)
    if not summary["completed"]:
        return EXIT_REQUEUE  # stopped by SIGTERM/SIGUSR1 after saving: resume=auto continues
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # the process group is gone
        print(f"done: {summary['steps']} steps, loss {summary['initial_loss']:.4f} -> "
              f"{summary['final_loss']:.4f}; results in {cfg.output_dir}/summary.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

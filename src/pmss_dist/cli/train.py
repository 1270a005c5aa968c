"""Fine-tune with PMSS, LoRA or full fine-tuning on 1..N processes (``pmss-train``; torchrun runs it
through ``launch/train.py``).

    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.yaml max_steps=5 output_dir=/tmp/x
"""

import argparse
import sys
from pathlib import Path

from pmss_dist.config import load_config
from pmss_dist.console import launcher_rank
from pmss_dist.errors import USER_ERRORS, ConfigError
from pmss_dist.train.trainer import EXIT_REQUEUE, train

# Errors a user causes (`errors.USER_ERRORS`: config, data, checkpoints, the output directory, a
# diverging lr): raised on every rank alike, printed in one line by rank 0, exit code 2, no
# traceback. Anything else is a bug and keeps its traceback, on the rank it happened on.
EXIT_USER_ERROR = 2


def report(err: Exception) -> int:
    if launcher_rank() == 0:
        label = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{label}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=5 adapter.rank=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        # Every rank parses the same config and stops here, before any collective: no hang.
        return report(err)
    try:
        summary = train(cfg)
    except USER_ERRORS as err:
        # Raised on every rank alike (the same config, files and all-reduced losses; rank 0's
        # findings are broadcast first), so no rank is left waiting in a collective.
        _leave_process_group()
        return report(err)
    if not summary["completed"]:
        return EXIT_REQUEUE  # stopped by SIGTERM/SIGUSR1 after saving: resume=auto continues
    if launcher_rank() == 0:
        made = [name for name in ("summary.json", "merged/", "adapter/", "tensorboard/")
                if (Path(cfg.output_dir) / name).exists()]
        print(f"done: {summary['steps']} steps, loss {summary['initial_loss']:.4f} -> "
              f"{summary['final_loss']:.4f}; results in {cfg.output_dir}: {', '.join(made)}", file=sys.stderr)
    return 0


def _leave_process_group() -> None:
    from pmss_dist.parallel.env import shutdown

    try:
        shutdown(meet_peers=False)
    except Exception:  # leaving anyway
        pass


if __name__ == "__main__":
    sys.exit(main())

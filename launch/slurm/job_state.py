"""Helpers for the sbatch scripts: what a job's output directory is and whether to requeue it.

    python launch/slurm/job_state.py output-dir --config configs/tiny.yaml output_dir=runs/x
    python launch/slurm/job_state.py should-requeue runs/x --since 1700000000 [--stop-requested] [--preempted]

``output-dir`` resolves the config exactly as launch/train.py does (so a bad key fails here,
before the nodes start) and prints the absolute output directory.

``should-requeue`` reads ``<output_dir>/summary.json`` (only if this attempt wrote it: newer
than ``--since``) and exits 0 when training did not complete and a requeue is wanted: the
processes stopped on SIGUSR1 after saving (``scancel --signal=USR1``), or the batch shell got the
save-and-requeue warning (``--stop-requested``: sbatch ``--signal=B:USR1@...`` before the time
limit, ``scancel --batch --signal=USR1``), or SLURM is preempting the job (``--preempted``).
The last two requeue even without a new summary: the processes may have died of the signal
while still starting up, and the next attempt resumes from the last checkpoint anyway.
torchrun's exit status cannot say any of this: its agent exits 1 whatever its workers returned.
Any other stop is not requeued: SIGTERM from scancel or from the time limit itself (a cancel
must stay cancelled), or a crash (it would only repeat). A preempted job must requeue itself:
SLURM's own PreemptMode=REQUEUE only applies when SLURM kills the job at the end of GraceTime,
not when it has saved and exited in time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REQUEUE_SIGNAL = "SIGUSR1"


def output_dir(config: str, overrides: list[str]) -> int:
    from pmss_dist.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(Path(cfg.output_dir).resolve())
    return 0


def should_requeue(output_dir: Path, since: float, stop_requested: bool, preempted: bool) -> int:
    from pmss_dist.train.run_dir import RunDir

    run_dir = RunDir(output_dir)
    summary_path = run_dir.summary
    fresh = summary_path.is_file() and summary_path.stat().st_mtime >= since
    summary = run_dir.read_summary() if fresh else None
    if summary is not None and summary.get("completed"):
        print(f"training completed: {summary['steps']} steps, final loss {summary['final_loss']:.4f}",
              file=sys.stderr)
        return 1
    saved = f"after saving step {summary['steps']}" if summary else "without saving (still starting up?)"
    if stop_requested or preempted:
        reason = "preempted" if preempted else "save-and-requeue requested"
        print(f"requeueing: {reason}, stopped {saved}", file=sys.stderr)
        return 0
    if summary is None:
        print(f"not requeueing: this attempt wrote no {summary_path} (training failed or was killed "
              "before saving; see the errors above)", file=sys.stderr)
        return 1
    signal_name = summary.get("stopped_by_signal")
    if signal_name != REQUEUE_SIGNAL:
        print(f"not requeueing: stopped by {signal_name} {saved} (scancel or the time limit); "
              "submit the same command again to resume", file=sys.stderr)
        return 1
    print(f"requeueing: stopped by {signal_name} {saved}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("output-dir", help="print the resolved output_dir of a training command line")
    out.add_argument("--config", default="configs/tiny.yaml")
    out.add_argument("overrides", nargs="*")
    requeue = commands.add_parser("should-requeue", help="exit 0 if the job should be requeued")
    requeue.add_argument("output_dir", type=Path)
    requeue.add_argument("--since", type=float, required=True,
                         help="start of this attempt (seconds since the epoch): older summaries are stale")
    requeue.add_argument("--stop-requested", action="store_true",
                         help="the batch shell received the save-and-requeue signal (SIGUSR1)")
    requeue.add_argument("--preempted", action="store_true", help="SLURM is preempting this job")
    args = parser.parse_args(argv)
    if args.command == "output-dir":
        return output_dir(args.config, args.overrides)
    return should_requeue(args.output_dir, args.since, args.stop_requested, args.preempted)


if __name__ == "__main__":
    sys.exit(main())

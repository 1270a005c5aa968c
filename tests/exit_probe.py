"""Run a pmss_dist entry point's ``main`` (``pmss_dist.cli.<name>``: train, select, evaluate) in
this process, then report on stderr how many gloo worker threads are still alive: ``gloo threads
left: N``. Once an entry point has returned they must be 0, or a worker still releasing a
collective's tensors when Python finalises aborts the process (tests/parallel/test_exit.py)."""

import importlib
import os
import sys


def gloo_threads() -> int:
    # torch names its gloo worker and transport threads (Linux).
    names = (open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task"))
    return sum(name.startswith(("pt_gloo", "gloo")) for name in names)


def main() -> int:
    entry, argv = sys.argv[1], sys.argv[2:]
    code = importlib.import_module(f"pmss_dist.cli.{entry}").main(argv)
    print(f"rank {os.environ.get('RANK', '0')}: gloo threads left: {gloo_threads()}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

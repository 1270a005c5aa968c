"""Runs ``python launch/train.py ARGS`` many times, paying its start-up once (tests/conftest.py's
``run_direct``).

Importing the trainer (torch, torchtune, torchao, datasets) is most of what a short or refused run
costs. This server makes those imports once; for each request it forks, and the child becomes the
process ``python SCRIPT ARGS`` would be once past the same imports: its own arguments, environment,
working directory, stdin, stdout and stderr, the script run as ``__main__``, and its exit (code,
traceback, exit handlers) that of the interpreter.

Requests and answers are JSON lines. A request, on stdin:
``{"script": ..., "args": [...], "env": {...}, "cwd": ..., "stdout": file, "stderr": file}``;
the answers, on stdout: ``{"pid": N}`` at once, then ``{"returncode": N}`` when the child ends
(negative: killed by that signal, as in ``subprocess``).
"""

import json
import os
import runpy
import sys

import pmss_dist.cli.train  # noqa: F401  (the start-up every child inherits)


def become(request: dict) -> None:
    """In the child: run the script as its own process would, then exit as that process does."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], written),
                           (2, request["stderr"], written)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(request["script"])  # as `python SCRIPT` sets it
    runpy.run_path(request["script"], run_name="__main__")
    sys.exit(0)  # the script returned: exit 0, through the interpreter's own shutdown


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            become(request)  # does not come back: its SystemExit or exception ends the child here
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()

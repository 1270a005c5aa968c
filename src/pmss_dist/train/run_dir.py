"""A run's output directory (``output_dir``): the one place that knows its layout.

    <output_dir>/
      config.json       the resolved config of the run (written at the end)
      summary.json      losses and counts; written last, so its presence means the run finished
      summary.previous.json   the summary of an earlier completion, while the run runs again
      selection.json    PMSS skeleton indices (reusable through adapter.selection_file)
      adapter/          cores or LoRA factors and skeleton indices (``adapters.io``)
      merged/           the base with the update folded in, in the base's HF layout
      checkpoints/      step checkpoints (``train.checkpoint``)
      tensorboard/      scalars
      base_model/       only for ``model.path: builtin:tiny``: the tiny checkpoint the run wrote
      run.lock          held by the run using the directory (pid, host); a second run is refused

A run writes nothing outside its directory (and ``adapter.selection_file`` when asked to) and
nothing inside its base checkpoint: `RunDir.check_outside` refuses an ``output_dir`` that is or lies
inside ``model.path``, or a base that lies where the run writes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pmss_dist.errors import RunDirError
from pmss_dist.config import BUILTIN_TINY
from pmss_dist.files import OutputPathError, atomic_write, check_output_file, clean_stale


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.summary = self.root / "summary.json"
        self.previous_summary = self.root / "summary.previous.json"
        self.selection = self.root / "selection.json"
        self.adapter = self.root / "adapter"
        self.merged = self.root / "merged"
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tensorboard"
        self.base_model = self.root / "base_model"
        self.lock = self.root / "run.lock"

    def written(self, model_path: str) -> list[Path]:
        """Everything a run with this ``model.path`` writes in its directory."""
        paths = [self.config, self.summary, self.previous_summary, self.selection, self.adapter, self.merged,
                 self.checkpoints, self.tensorboard, self.lock]
        return paths + [self.base_model] if model_path == BUILTIN_TINY else paths

    def check_outside(self, model_path: str, selection_file: str | None = None) -> None:
        """Refuse a run that would write into its base checkpoint ``model_path``: an output_dir
        that is or lies inside it, a base inside something the run writes, or a selection file to
        be written inside the base."""
        if selection_file and not Path(selection_file).is_file():
            try:  # it will be written: never a device or FIFO
                check_output_file(selection_file)
            except OutputPathError as err:
                raise RunDirError(f"adapter.selection_file: {err}") from None
        if model_path == BUILTIN_TINY:
            return
        base, root = Path(model_path).resolve(), self.root.resolve()
        if root == base or base in root.parents:
            raise RunDirError(f"output_dir={self.root} {'is' if root == base else 'lies inside'} model.path="
                              f"{model_path}: the run would write into its base checkpoint; choose an output_dir "
                              "outside it")
        for path in self.written(model_path):
            path = path.resolve()
            if base == path or path in base.parents:
                raise RunDirError(f"model.path={model_path} lies inside {path}, which this run (output_dir="
                                  f"{self.root}) writes; copy the base elsewhere or choose another output_dir")
        if selection_file and not Path(selection_file).is_file():
            target = Path(selection_file).resolve()
            if base in target.parents:
                raise RunDirError(f"adapter.selection_file={selection_file} would be written inside model.path="
                                  f"{model_path}; point it outside the base checkpoint")

    def reopen(self) -> list[str]:
        """A run starting (again) in this directory, under its lock: it is not finished until it
        writes its summary anew, so an earlier completion's summary moves to ``summary.previous.json``
        (an export of the run then takes its newest checkpoint, not the old adapter), and what
        killed writes left (`files.clean_stale`) goes. Returns the names removed."""
        if self.summary.is_file():
            os.replace(self.summary, self.previous_summary)
        return [f"{where.name}/{name}" if where != self.root else name
                for where in (self.root, self.adapter) for name in clean_stale(where)]

    def base_dir(self, model_path: str) -> Path:
        """The base checkpoint of a run whose ``model.path`` is ``model_path``."""
        return self.base_model if model_path == BUILTIN_TINY else Path(model_path)

    def finished(self) -> bool:
        return self.summary.is_file() and self.config.is_file()

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def read_config(self) -> dict:
        """The run's resolved config, with the two keys every reader needs checked."""
        try:
            config = json.loads(self.config.read_text())
            config["model"]["path"], config["adapter"]["kind"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.config} has no model.path or adapter.kind: not a pmss_dist run config "
                             f"({err})") from err
        return config

    @staticmethod
    def write_json(path: Path, doc) -> None:
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(doc, indent=2)))


class RunLock:
    """An exclusive lock on a run directory: the file ``path`` holds the owner's pid, host and
    process start time (and SLURM job and attempt). A lock whose process is gone (on this host: no
    such pid, or the pid now belongs to a later process; anywhere: an earlier attempt of the same
    requeued SLURM job) is stale and taken over; a live one, or one held from another host, is
    refused with the holder named."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": process_start(os.getpid()),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                   "slurm_attempt": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises RunDirError."""
        note = None
        for _ in range(3):
            if self._create():
                return note
            holder = self._holder()
            if holder == {}:
                continue  # released while we looked: try again
            if holder is not None and not self._stale(holder):
                where = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since', '?')}"
                raise RunDirError(f"{self.path.parent} is in use by another run ({where}): wait for it to end or "
                                  f"choose another output_dir; if that process is gone, delete {self.path}")
            what = "an unreadable lock" if holder is None else \
                f"the stale lock of pid {holder.get('pid')} on {holder.get('host')} (no longer running)"
            note = f"note: took over {what} in {self.path.parent}"
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise RunDirError(f"cannot take the lock {self.path}: another run keeps taking it; is one starting?")

    def _create(self) -> bool:
        """Create the lock file with our record in one step (a hard link of a written temp file)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except FileNotFoundError:
            return {}  # released meanwhile: not stale, try again
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if self.me["slurm_job"] and holder.get("slurm_job") == self.me["slurm_job"] \
                and isinstance(holder.get("slurm_attempt"), int) and holder["slurm_attempt"] < self.me["slurm_attempt"]:
            return True  # an earlier attempt of this requeued SLURM job: SLURM runs one attempt at a time
        if holder.get("host") != self.me["host"]:
            return False  # cannot look at another host's processes
        pid = holder["pid"]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
        started = process_start(pid)
        if started is None:
            return False
        return started == "zombie" or (holder.get("started") not in (None, started))

    def release(self) -> None:
        """Remove the lock if this process holds it (whichever `RunLock` object took it)."""
        try:
            holder = json.loads(self.path.read_text())
            if isinstance(holder, dict) and all(holder.get(k) == self.me[k] for k in ("pid", "host", "started")):
                self.path.unlink()
        except (OSError, ValueError):
            pass


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), ``"zombie"`` for a
    process that has exited but not been reaped, or None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return "zombie" if fields[0] in ("Z", "X") else fields[19]

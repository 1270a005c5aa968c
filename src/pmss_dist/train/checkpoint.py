"""Step checkpoints with torch.distributed.checkpoint, published atomically, and the save policy.

`CheckpointManager` owns everything a checkpoint holds and decides when to write one. The DCP
files hold what training changes in tensors: adapter tensors and skeleton indices (or, for full
fine-tuning, the sharded weights), optimizer state and RNG states, each through a ``Stateful``.
The manifest holds a `CheckpointRecord` in JSON: the step, the losses so far, scheduler and
sampler state, and what the run is (its resolved config, skeleton selection and base
fingerprint), so a checkpoint can be resumed, inspected or exported on its own. Frozen base
weights are not copied (``ignore_frozen_params``): they come from the base checkpoint, checked
by fingerprint on resume.

Layout under ``<output_dir>/checkpoints``::

    step_000040/            a published checkpoint: DCP files + manifest.json
    step_000050.partial/    being written, or waiting for the next step; never read, removed at start
    latest                  name of the newest published checkpoint (written by rename)
    index.json              the checkpoints this code published: the only ones it ever prunes

Publication: every rank writes into ``.partial``, hashing each file as it writes it
(``storage.HashingWriter``). The checkpoint of step N is published only once the loss of its
weights on the next batch is known to be sane (the loss of step N+1, or at the last step and on a
stop signal a forward-only probe of the next batch): then, after a barrier, rank 0 records every
file's size and SHA-256 in ``manifest.json``, renames the directory and repoints ``latest``. A
kill at any moment leaves either the old or the new checkpoint as ``latest``, never a half-written
one; a divergent step leaves the checkpoint before it as the newest.

Reading: a checkpoint is used only if its manifest is a well-formed object, every file it lists
is there with its size and SHA-256, and its ``.metadata`` unpickles through the restricted
loader (``storage``); a resume must also be the same run (`CheckpointRecord.identity`).
Checkpoints written before hashes or identities existed still load; the checks they cannot get
are reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from pmss_dist.adapters.layers import ADAPTER_TENSORS
from pmss_dist.config import IDENTITY_DEFAULTS, RUN_IDENTITY_KEYS, CheckpointConfig, flat_config, run_identity
from pmss_dist.files import atomic_write, remove_path
from pmss_dist.hf.load import comparable_fingerprint, file_sha256
from pmss_dist.parallel.env import print_main
from pmss_dist.train import storage

MANIFEST = "manifest.json"
LATEST = "latest"
INDEX = "index.json"
PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"step_(\d+)")
# Identity entries that are not config keys: the base's fingerprint is CheckpointRecord's own
# field; the number of training samples is recorded beside the config's keys.
BASE_KEY = "model weights (fingerprint of model.path)"
EXAMPLES_KEY = "data.examples"
# Identity keys of what the run reads, by content (`data.fingerprint`): the tokenized training
# samples, and the base's tokenizer files (the weights and config.json are the base fingerprint).
DATA_KEY = "data.contents"
TOKENIZER_KEY = "model.tokenizer_files"
# Keys that differ between two runs of the same job without changing it.
_NOT_SETTINGS = {"output_dir", "checkpoint.resume"}
_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
# Loading the trainable subset into the full model: frozen keys are absent on purpose. A key
# missing from the checkpoint still fails, in dcp.load, which asks for every key it is given.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, or cannot be used by this run; the message says why and
    what to do. A user's error: the command line reports it in one line."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory name made by `step_name` (``step_<digits>`` exactly)."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass
class CheckpointRecord:
    """The manifest's ``extra``: what a checkpoint records besides its tensors."""

    step: int
    losses: list[float]
    scheduler: dict
    sampler: dict
    base_fingerprint: str
    config: dict | None = None  # None in checkpoints written before configs were recorded
    selection: dict | None = None  # the PMSS skeleton selection file's contents
    # What the run is (config.run_identity plus data.examples); None before identities existed.
    identity: dict | None = None

    @classmethod
    def from_json(cls, extra, where: Path) -> CheckpointRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        types = {"step": int, "losses": list, "scheduler": dict, "sampler": dict, "base_fingerprint": (str, type(None)),
                 "config": (dict, type(None)), "selection": (dict, type(None)), "identity": (dict, type(None))}
        required = {"step", "losses", "scheduler", "sampler", "base_fingerprint"}
        if not isinstance(extra, dict) or not required <= set(extra):
            raise CheckpointError(f"{where / MANIFEST} holds no checkpoint record (step, losses, scheduler, sampler, "
                                  "base_fingerprint): not a pmss_dist checkpoint")
        wrong = [k for k, t in types.items() if k in extra and not isinstance(extra[k], t)]
        if wrong or isinstance(extra["step"], bool):
            raise CheckpointError(f"{where / MANIFEST}: the checkpoint record's {', '.join(wrong) or 'step'} "
                                  "has the wrong type")
        return cls(**{k: v for k, v in extra.items() if k in names})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _ModelState(Stateful):
    """The model's trainable tensors (and skeleton indices), as DCP saves and loads them."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=_OPTIONS)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.model, state_dict, options=_LOAD_OPTIONS)


class _OptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS)

    def load_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=_LOAD_OPTIONS)


class _RngState(Stateful):
    """CPU (and CUDA, where both sides have it) RNG states: a checkpoint written on a GPU resumes
    on a CPU and the other way."""

    def __init__(self, with_cuda: bool):
        self.with_cuda = with_cuda and torch.cuda.is_available()

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.with_cuda:
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if self.with_cuda:
            torch.cuda.set_rng_state(state_dict["cuda"])


@dataclass
class _Pending:
    """A checkpoint written (or being written, ``future``) into ``partial`` and not yet published."""

    partial: Path
    final: Path
    record: CheckpointRecord
    writer: storage.HashingWriter
    future: object = None  # async save: its Future
    vouched: bool = False  # a sane step has followed it


class CheckpointManager:
    """Saves and restores a run's training state under ``root``, and decides when to save."""

    def __init__(self, root: str | Path, settings: CheckpointConfig, rank: int, *, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, sampler, config: dict, base_dir: Path,
                 base_fingerprint: str, selection_file: Path, identity: dict | None = None):
        self.root, self.settings, self.rank = Path(root), settings, rank
        self.world_size = dist.get_world_size()
        self.model, self.optimizer, self.scheduler, self.sampler = model, optimizer, scheduler, sampler
        self.config, self.selection_file = config, selection_file
        self.base_dir, self.base_fingerprint = base_dir, base_fingerprint
        # What this run is: its config's identity keys and data.examples (the trainer adds the latter).
        self.identity = identity if identity is not None else run_identity(config)
        self.last_good: Path | None = None  # the newest checkpoint this run may fall back to
        self._pending: _Pending | None = None
        # An async save runs its collectives from a background thread while training runs its own:
        # on one shared process group they interleave and deadlock, so it gets a group of its own.
        self._async_group = dist.new_group(backend="gloo") if settings.async_save else None

    def _states(self, with_cuda_rng: bool) -> dict[str, Stateful]:
        return {"model": _ModelState(self.model), "optim": _OptimizerState(self.model, self.optimizer),
                "rng": _RngState(with_cuda_rng)}

    # -- saving ---------------------------------------------------------------------------
    def due(self, step: int, max_steps: int, stopping: bool) -> bool:
        """The save policy: every ``every_steps`` steps, at the last step, and when asked to stop."""
        every = self.settings.every_steps
        return stopping or step == max_steps or bool(every and step % every == 0)

    def save(self, step: int, losses: list[float]) -> None:
        """Write a checkpoint of ``step`` into its ``.partial`` directory (collective: every rank
        calls it). It is published by `confirm` once a sane step has followed."""
        selection = json.loads(self.selection_file.read_text()) if self.selection_file.is_file() else None
        record = CheckpointRecord(step, list(losses), self.scheduler.state_dict(), self.sampler.state_dict(),
                                  self.base_fingerprint, self.config, selection, self.identity)
        self.finish_pending()
        final = self.root / step_name(step)
        partial = Path(str(final) + PARTIAL_SUFFIX)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_path(partial)  # a stale one, or a link someone put there: never written through
        dist.barrier()
        states = self._states(with_cuda_rng=True)
        writer = storage.HashingWriter(partial)
        if self.settings.async_save:
            future = dcp.async_save(states, storage_writer=writer, process_group=self._async_group)
            self._pending = _Pending(partial, final, record, writer, future)
        else:
            dcp.save(states, storage_writer=writer)
            self._pending = _Pending(partial, final, record, writer)

    @property
    def pending(self) -> bool:
        """A checkpoint is written (or being written) and waits for a sane step to be published."""
        return self._pending is not None

    def confirm(self) -> None:
        """A sane step followed the pending checkpoint: publish it (an async one when it is
        written, at the next save or at the end, so that writing still overlaps training)."""
        if self._pending is None:
            return
        self._pending.vouched = True
        if self._pending.future is None:
            self.finish_pending()

    def finish_pending(self) -> None:
        """Wait for a pending write and publish it if a sane step vouched for it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
        if pending.vouched:
            self.publish(pending.partial, pending.final, pending.record, pending.writer.digests)
        else:
            self._drop(pending)

    def discard_pending(self) -> Path | None:
        """The run diverged: the pending checkpoint is never published. Returns where it would
        have been published, if there was one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.future is not None:
            pending.future.result()
        self._drop(pending)
        return pending.final

    def _drop(self, pending: _Pending) -> None:
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(pending.partial, ignore_errors=True)
        dist.barrier()

    def publish(self, partial: Path, final: Path, record: CheckpointRecord, digests: dict | None = None) -> None:
        """Make a written checkpoint visible: manifest (sizes and SHA-256 of every file), rename,
        index, ``latest``, pruning (collective). ``digests``: this rank's file hashes from writing."""
        dist.barrier()  # every rank's files are on disk
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, digests or {})
        if self.rank == 0:
            hashes = {name: digest for ranks in gathered for name, digest in ranks.items() if digest}
            files, sha256 = {}, {}
            for path in sorted(partial.iterdir()):
                files[path.name] = path.stat().st_size
                # a file written other than front to back (or by an unknown writer) is hashed here
                sha256[path.name] = hashes.get(path.name) or file_sha256(path)
            manifest = {"step": record.step, "world_size": self.world_size, "files": files, "sha256": sha256,
                        "extra": record.to_json()}
            atomic_write(partial / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
            remove_path(final)  # a checkpoint of this step the index no longer lists, or a link
            os.replace(partial, final)
            write_index(self.root, [*read_index(self.root), final.name])
            atomic_write(self.root / LATEST, lambda p: Path(p).write_text(final.name))
            self._prune()
        self.last_good = final
        dist.barrier()

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` (by step number) of the checkpoints in our own
        index; nothing else under ``root`` is ever deleted."""
        ours = [n for n in read_index(self.root) if (self.root / n).is_dir()]
        doomed = prunable(ours, self.settings.keep_last)
        write_index(self.root, [n for n in ours if n not in doomed])
        for name in doomed:
            shutil.rmtree(self.root / name, ignore_errors=True)

    def newest_good(self) -> Path | None:
        """The checkpoint a rerun would continue from: the one this run resumed from or last
        published, else the newest under ``root``."""
        if self.last_good is not None:
            return self.last_good
        published = published_checkpoints(self.root)
        return published[-1] if published else None

    # -- loading --------------------------------------------------------------------------
    def clean_partials(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(f"step_*{PARTIAL_SUFFIX}"):
                if step_of(path.name.removesuffix(PARTIAL_SUFFIX)) is not None:
                    remove_path(path)
        dist.barrier()

    def _verify_agreed(self, path: Path) -> None:
        """`verify` with the hashing shared among the ranks, and one verdict for all of them."""
        try:
            verify(path, share=(self.rank, self.world_size))
            error = None
        except CheckpointError as err:
            error = str(err)
        errors = [None] * self.world_size
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise CheckpointError(first)

    def resume(self) -> CheckpointRecord | None:
        """Restore the checkpoint that ``checkpoint.resume`` names (``auto``: the newest valid one,
        if any; ``none``: none) and return its record, or ``None`` for a fresh start. In ``auto``
        a broken checkpoint is reported and the one before it used; one of another run is refused."""
        setting = self.settings.resume
        if setting == "none":
            return None
        auto = setting == "auto"
        if auto:
            candidates = valid_checkpoints(self.root, check=self._verify_agreed)
        else:
            path = Path(setting)
            self._verify_agreed(path)  # an explicitly named checkpoint must be whole: no silent fallback
            candidates = iter([path])
        for path in candidates:
            try:
                record = self.load(path)
            except _Unreadable as err:
                if not auto:
                    raise
                print_main(f"warning: skipping checkpoint: {err}")
                continue
            print_main(f"resumed from {path} at step {record.step}")
            self.last_good = path
            return record
        return None

    def load(self, path: str | Path) -> CheckpointRecord:
        """Restore model, optimizer, RNG, scheduler and sampler from a verified checkpoint written
        at any world size; refuses one of another run (`check_same_run`)."""
        path = Path(path)
        manifest = read_manifest(path)
        record = CheckpointRecord.from_json(manifest.get("extra"), path)
        self.check_same_run(path, record)
        for note in unverified(path, manifest):
            print_main(f"note: {note}")
        self.report_changes(path, record, manifest.get("world_size"))
        try:
            metadata = storage.load_metadata(path).state_dict_metadata
        except storage.StorageError as err:
            raise CheckpointError(str(err)) from None
        states = self._states(with_cuda_rng="rng.cuda" in metadata)
        try:
            storage.load(states, path)
        except (Exception, CheckpointException) as err:  # DCP's exception derives from BaseException
            message = f"cannot load {path}: {_first_line(err)}"
            if "sha256" not in manifest:  # no content check before: most likely damaged files
                raise _Unreadable(message + " (its files are damaged?)") from None
            raise CheckpointError(message + " (was it written by another version of pmss_dist?)") from None
        self.scheduler.load_state_dict(record.scheduler)
        try:
            self.sampler.load_state_dict(record.sampler)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        return record

    def check_same_run(self, path: Path, record: CheckpointRecord) -> None:
        """Refuse a checkpoint whose run differs from this one in what defines a run (the base's
        weights, `RUN_IDENTITY_KEYS`, the number of training samples), naming every difference.
        A record from before identities is compared on what its config holds, and what could not
        be compared is reported."""
        recorded = recorded_identity(record)
        missing = sorted({key for key in self.identity if key not in recorded})
        changed = {key: (recorded[key], self.identity[key]) for key in recorded
                   if key in self.identity and recorded[key] != self.identity[key]}
        if record.base_fingerprint:
            current = comparable_fingerprint(record.base_fingerprint, self.base_dir, self.base_fingerprint)
            if current != record.base_fingerprint:
                changed[BASE_KEY] = (record.base_fingerprint, current)
            elif current != self.base_fingerprint:
                missing.append("the base's weights (its fingerprint predates content hashing: headers and sizes "
                               "checked)")
        else:
            missing.append("the base (no fingerprint recorded)")
        if changed:
            what = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise CheckpointError(f"{path} is a checkpoint of another run ({what}): resume with the settings it was "
                                  "written with, or start a new run with checkpoint.resume=none or another output_dir")
        if missing:
            print_main(f"note: {path} was written by an older version: not checked on resume: {', '.join(missing)}")

    def report_changes(self, path: Path, record: CheckpointRecord, world_size) -> None:
        """Log the settings that differ from the checkpoint's run and take effect from here on."""
        if record.config is None:
            return
        old, new = flat_config(record.config), flat_config(self.config)
        # keys only one side has are the other version's (added or renamed since): not a user's change
        changes = [f"{key} {old[key]!r} -> {new[key]!r}" for key in sorted(set(old) & set(new))
                   if key not in RUN_IDENTITY_KEYS and key not in _NOT_SETTINGS and old[key] != new[key]]
        if isinstance(world_size, int) and world_size != self.world_size:
            changes.append(f"world size {world_size} -> {self.world_size}")
        if changes:
            print_main(f"resume: changed since {path.name}, in effect from step {record.step + 1}: "
                       f"{'; '.join(changes)}")


class _Unreadable(CheckpointError):
    """DCP could not read a checkpoint that had no content hashes to catch its damage earlier."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def recorded_identity(record: CheckpointRecord) -> dict:
    """The run identity a record holds; for records from before identities, what its config and
    sampler state say of it (config.run_identity, data.examples). Keys added since it was written
    take the value they stand for in older runs (`IDENTITY_DEFAULTS`)."""
    if record.identity is not None:
        return {**IDENTITY_DEFAULTS, **record.identity}
    identity = {**IDENTITY_DEFAULTS, **(run_identity(record.config) if record.config is not None else {})}
    if isinstance(record.sampler.get("num_samples"), int):
        identity[EXAMPLES_KEY] = record.sampler["num_samples"]
    return identity


# -- reading checkpoints ----------------------------------------------------------------------

def read_index(root: str | Path) -> list[str]:
    """The checkpoint names this code published under ``root`` (``index.json``); an unreadable
    index is treated as empty (nothing is pruned), with a warning."""
    path = Path(root) / INDEX
    if not path.is_file():
        return []
    try:
        names = json.loads(path.read_text())["published"]
        if isinstance(names, list) and all(isinstance(n, str) and step_of(n) is not None for n in names):
            return list(dict.fromkeys(names))
    except (ValueError, KeyError, TypeError):
        pass
    print_main(f"warning: {path} is not a checkpoint index: no checkpoint will be pruned until it is rewritten")
    return []


def prunable(names: list[str], keep_last: int) -> list[str]:
    """Which of the checkpoint ``names`` (all from our index) pruning deletes: all but the newest
    ``keep_last`` by step number (``step_1000000`` is newer than ``step_999999``)."""
    ordered = sorted(set(names), key=step_of)
    return ordered[:-keep_last] if keep_last > 0 else ordered


def write_index(root: str | Path, names: list[str]) -> None:
    names = sorted(dict.fromkeys(names), key=step_of)
    atomic_write(Path(root) / INDEX, lambda p: Path(p).write_text(json.dumps({"published": names}, indent=2)))


def published_checkpoints(root: str | Path) -> list[Path]:
    """The checkpoint directories under ``root`` (exact ``step_<digits>`` names), oldest first by
    step number."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p.name) is not None and p.is_dir()),
                  key=lambda p: step_of(p.name))


def valid_checkpoints(root: str | Path, check: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """The checkpoints under ``root`` that pass ``check`` (default `verify`), newest first; broken
    ones are reported and skipped, so a damaged newest falls back to the one before it."""
    for path in reversed(published_checkpoints(root)):
        try:
            (check or verify)(path)
        except CheckpointError as err:
            print_main(f"warning: skipping checkpoint: {err}")
            continue
        yield path


def newest_valid(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes `verify`, or None."""
    return next(valid_checkpoints(root), None)


def read_manifest(path: str | Path) -> dict:
    """A checkpoint's manifest, checked for shape (an object with a ``files`` table of plain file
    names and sizes, and a ``sha256`` table for the same files when present), and every file it
    lists present at its size. Anything else is a `CheckpointError`: such a checkpoint is treated
    like one without a manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: it was never completely written")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{manifest_path} is corrupted: {err}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(n, str) and Path(n).name == n and n not in (".", "..", MANIFEST)
            and isinstance(s, int) and not isinstance(s, bool) and s >= 0 for n, s in files.items()):
        raise CheckpointError(f"{manifest_path} is not a checkpoint manifest (an object with a table of files and "
                              "sizes): treated as missing")
    sha256 = manifest.get("sha256")
    if sha256 is not None and (not isinstance(sha256, dict) or set(sha256) != set(files)
                               or not all(isinstance(h, str) and len(h) == 64 for h in sha256.values())):
        raise CheckpointError(f"{manifest_path} has a malformed sha256 table (it must hash every file it lists)")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path} is corrupted: {name} has {file.stat().st_size} bytes, manifest says {size}")
    return manifest


def verify(path: str | Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Check that a checkpoint is whole and is what it was when written: `read_manifest`, every
    file's SHA-256 (with ``share = (rank, world_size)`` this rank hashes every world_size-th file)
    and its ``.metadata`` readable by the restricted loader. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    hashes = manifest.get("sha256") or {}
    rank, world_size = share
    for i, name in enumerate(sorted(hashes)):
        if i % world_size != rank:
            continue
        try:
            digest = file_sha256(path / name)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read {name}: {err}") from None
        if digest != hashes[name]:
            raise CheckpointError(f"{path} is corrupted: the contents of {name} do not match the SHA-256 its "
                                  "manifest records")
    if rank == 0:
        try:
            metadata = storage.load_metadata(path)
        except storage.StorageError as err:
            raise CheckpointError(str(err)) from None
        stray = {info.relative_path for info in metadata.storage_data.values()} - set(manifest["files"])
        if stray:
            raise CheckpointError(f"{path}/{storage.METADATA_FILE} refers to files its manifest does not list: "
                                  f"{sorted(stray)}")
    return manifest


def unverified(path: Path, manifest: dict) -> list[str]:
    """The checks a checkpoint written by an older version could not get, for the user."""
    if "sha256" not in manifest:
        return [f"{path} was written before content hashes: its files are checked by size only"]
    return []


def read_record(path: str | Path) -> CheckpointRecord:
    """The `CheckpointRecord` of a checkpoint (its manifest's shape and file sizes checked;
    `verify` checks contents)."""
    path = Path(path)
    return CheckpointRecord.from_json(read_manifest(path).get("extra"), path)


def extract_adapter(path: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter of a step checkpoint as an adapter directory (`adapters.io` format), in one
    process and without building the model: the DCP keys of adapter tensors are the adapter file's
    keys under ``model.``, and the record holds the run's config and base fingerprint."""
    from pmss_dist.adapters.io import adapter_meta, write_adapter

    path = Path(path)
    record = read_record(path)
    if record.config is None:
        raise CheckpointError(f"{path} predates configs in checkpoints: export the finished run instead")
    try:
        metadata = storage.load_metadata(path).state_dict_metadata
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from None
    adapter_names = {name for names in ADAPTER_TENSORS.values() for name in names}
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in metadata.items()
             if key.startswith("model.") and key.rsplit(".", 1)[-1] in adapter_names}
    if not state:
        raise CheckpointError(f"{path} holds no adapter tensors")
    try:
        storage.load(state, path, no_dist=True)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"cannot read the adapter of {path}: {_first_line(err)}") from None
    meta = {**adapter_meta(record.config["adapter"], record.config["model"]["path"], record.base_fingerprint),
            "step": record.step}
    return write_adapter({key.removeprefix("model."): value for key, value in state.items()}, out_dir, meta)

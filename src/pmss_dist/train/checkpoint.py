"""Step checkpoints with torch.distributed.checkpoint, published atomically, and the save policy.

`CheckpointManager` owns everything a checkpoint holds and decides when to write one. The DCP
files hold what training changes in tensors: adapter tensors and skeleton indices (or, for full
fine-tuning, the sharded weights), optimizer state and RNG states, each through a ``Stateful``.
The manifest holds a `CheckpointRecord` (``checkpoints.record``) in JSON: the step, the losses so
far, scheduler and sampler state, and what the run is (its resolved config, skeleton selection and
base fingerprint), so a checkpoint can be resumed, inspected or exported on its own. Frozen base
weights are not copied (``ignore_frozen_params``): they come from the base checkpoint, checked
by fingerprint on resume.

Publication: every rank writes into ``.partial``, hashing each file as it writes it
(``storage.HashingWriter``). The checkpoint of step N is published only once the loss of its
weights on the next batch is known to be sane (the loss of step N+1, or at the last step and on a
stop signal a forward-only probe of the next batch): then, after a barrier, rank 0 records every
file's size and SHA-256 in ``manifest.json``, renames the directory and repoints ``latest``. A
kill at any moment leaves either the old or the new checkpoint as ``latest``, never a half-written
one; a divergent step leaves the checkpoint before it as the newest. A resume must also be the
same run (`CheckpointRecord.identity`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from pmss_dist.checkpoints import storage
from pmss_dist.checkpoints.fingerprint import comparable_fingerprint
from pmss_dist.checkpoints.record import (LATEST, MANIFEST, PARTIAL_SUFFIX, CheckpointError, CheckpointRecord, first_line,
                                          prunable, published_checkpoints, read_index, read_manifest, step_name, step_of,
                                          unverified, valid_checkpoints, verify, write_index)
from pmss_dist.config import IDENTITY_DEFAULTS, RUN_IDENTITY_KEYS, CheckpointConfig, flat_config, run_identity
from pmss_dist.files import atomic_write, file_sha256, remove_path
from pmss_dist.console import print_main

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
            message = f"cannot load {path}: {first_line(err)}"
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

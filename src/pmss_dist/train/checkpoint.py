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
    step_000050.partial/    being written; never read, removed at the next start
    latest                  name of the newest published checkpoint (written by rename)

Publication: every rank writes into ``.partial``; after a barrier rank 0 records every file's
size in ``manifest.json``, renames the directory and then repoints ``latest``. A kill at any
moment leaves either the old or the new checkpoint as ``latest``, never a half-written one.
"""

from __future__ import annotations

import dataclasses
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

from pmss_dist.adapters.layers import ADAPTER_TENSORS
from pmss_dist.config import CheckpointConfig
from pmss_dist.files import atomic_write
from pmss_dist.hf.load import check_base_fingerprint
from pmss_dist.parallel.env import print_main

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
# Loading the trainable subset into the full model: frozen keys are absent on purpose. A key
# missing from the checkpoint still fails, in dcp.load, which asks for every key it is given.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step_{step:06d}"


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

    @classmethod
    def from_json(cls, extra, where: Path) -> CheckpointRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(extra, dict) or not {"step", "losses", "scheduler", "sampler", "base_fingerprint"} <= set(extra):
            raise CheckpointError(f"{where / MANIFEST} holds no checkpoint record (step, losses, scheduler, sampler, "
                                  "base_fingerprint): not a pmss_dist checkpoint")
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


class CheckpointManager:
    """Saves and restores a run's training state under ``root``, and decides when to save."""

    def __init__(self, root: str | Path, settings: CheckpointConfig, rank: int, *, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, sampler, config: dict, base_dir: Path,
                 base_fingerprint: str, selection_file: Path):
        self.root, self.settings, self.rank = Path(root), settings, rank
        self.model, self.optimizer, self.scheduler, self.sampler = model, optimizer, scheduler, sampler
        self.config, self.selection_file = config, selection_file
        self.base_dir, self.base_fingerprint = base_dir, base_fingerprint
        self._pending = None  # (future, partial_dir, final_dir, record) of an async save
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
        """Write a checkpoint of ``step`` (collective: every rank calls it)."""
        selection = json.loads(self.selection_file.read_text()) if self.selection_file.is_file() else None
        record = CheckpointRecord(step, list(losses), self.scheduler.state_dict(), self.sampler.state_dict(),
                                  self.base_fingerprint, self.config, selection)
        self.finish_pending()
        final = self.root / step_name(step)
        partial = Path(str(final) + PARTIAL_SUFFIX)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        states = self._states(with_cuda_rng=True)
        if self.settings.async_save:
            future = dcp.async_save(states, checkpoint_id=partial, process_group=self._async_group)
            self._pending = (future, partial, final, record)
        else:
            dcp.save(states, checkpoint_id=partial)
            self.publish(partial, final, record)

    def finish_pending(self) -> None:
        if self._pending is not None:
            future, partial, final, record = self._pending
            self._pending = None
            future.result()
            self.publish(partial, final, record)

    def publish(self, partial: Path, final: Path, record: CheckpointRecord) -> None:
        """Make a written checkpoint visible: manifest, rename, ``latest``, pruning (collective)."""
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
            manifest = {"step": record.step, "world_size": dist.get_world_size(), "files": files,
                        "extra": record.to_json()}
            atomic_write(partial / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            atomic_write(self.root / LATEST, lambda p: Path(p).write_text(final.name))
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        published = sorted(p for p in self.root.glob("step_*") if not p.name.endswith(PARTIAL_SUFFIX))
        for old in published[:-self.settings.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading --------------------------------------------------------------------------
    def clean_partials(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(f"step_*{PARTIAL_SUFFIX}"):
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def resume(self) -> CheckpointRecord | None:
        """Restore the checkpoint that ``checkpoint.resume`` names (``auto``: the newest valid one,
        if any; ``none``: none) and return its record, or ``None`` for a fresh start."""
        setting = self.settings.resume
        if setting == "none":
            return None
        if setting == "auto":
            path = newest_valid(self.root)
            if path is None:
                return None
        else:
            path = Path(setting)
            verify(path)  # an explicitly named checkpoint must be whole: no silent fallback
        record = self.load(path)
        print_main(f"resumed from {path} at step {record.step}")
        return record

    def load(self, path: str | Path) -> CheckpointRecord:
        """Restore model, optimizer, RNG, scheduler and sampler from a verified checkpoint written
        at any world size; refuses one trained on another base."""
        path = Path(path)
        record = read_record(path)
        check_base_fingerprint(path, record.base_fingerprint, self.base_dir,
                               "point model.path at the original base or set checkpoint.resume=none", CheckpointError)
        metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        states = self._states(with_cuda_rng="rng.cuda" in metadata)
        try:
            dcp.load(states, checkpoint_id=path)
        except (Exception, CheckpointException) as err:  # DCP's exception derives from BaseException
            raise CheckpointError(f"cannot load {path}: {err} (was it written by a different config?)") from err
        self.scheduler.load_state_dict(record.scheduler)
        self.sampler.load_state_dict(record.sampler)
        return record


def newest_valid(root: str | Path) -> Path | None:
    """The newest published checkpoint under ``root`` that passes `verify`; broken ones are
    reported and skipped, so a corrupted latest falls back to the one before it."""
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step_*"), reverse=True):
        if path.name.endswith(PARTIAL_SUFFIX):
            continue
        try:
            verify(path)
            return path
        except CheckpointError as err:
            print_main(f"warning: skipping checkpoint: {err}")
    return None


def verify(path: str | Path) -> dict:
    """Check that a checkpoint is complete: a manifest, and every file it lists at its size."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: it was never completely written")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is corrupted: {err}") from err
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path} is corrupted: {name} has {file.stat().st_size} bytes, "
                                  f"manifest says {size}")
    return manifest


def read_record(path: str | Path) -> CheckpointRecord:
    """The `CheckpointRecord` of a verified checkpoint."""
    path = Path(path)
    return CheckpointRecord.from_json(verify(path).get("extra"), path)


def extract_adapter(path: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter of a step checkpoint as an adapter directory (`adapters.io` format), in one
    process and without building the model: the DCP keys of adapter tensors are the adapter file's
    keys under ``model.``, and the record holds the run's config and base fingerprint."""
    from pmss_dist.adapters.io import adapter_meta, write_adapter

    path = Path(path)
    record = read_record(path)
    if record.config is None:
        raise CheckpointError(f"{path} predates configs in checkpoints: export the finished run instead")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    adapter_names = {name for names in ADAPTER_TENSORS.values() for name in names}
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in metadata.items()
             if key.startswith("model.") and key.rsplit(".", 1)[-1] in adapter_names}
    if not state:
        raise CheckpointError(f"{path} holds no adapter tensors")
    dcp.load(state, checkpoint_id=path, no_dist=True)
    meta = {**adapter_meta(record.config["adapter"], record.config["model"]["path"], record.base_fingerprint),
            "step": record.step}
    return write_adapter({key.removeprefix("model."): value for key, value in state.items()}, out_dir, meta)

"""Step checkpoints with torch.distributed.checkpoint, published atomically.

A checkpoint holds what training changes: adapter tensors and skeleton indices, optimizer and
scheduler state, the sampler position, RNG states, and the base model's fingerprint. Frozen base
weights are not copied (``ignore_frozen_params``): they come from the base checkpoint, checked by
fingerprint on resume.

Layout under ``<output_dir>/checkpoints``::

    step_000040/            a published checkpoint: DCP files + manifest.json
    step_000050.partial/    being written; never read, removed at the next start
    latest                  name of the newest published checkpoint (written by rename)

Publication: every rank writes into ``.partial``; after a barrier rank 0 records every file's
size in ``manifest.json``, renames the directory and then repoints ``latest``. A kill at any
moment leaves either the old or the new checkpoint as ``latest``, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pmss_dist.adapters import ADAPTER_TENSORS
from pmss_dist.files import atomic_write

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
# Loading the trainable subset into the full model: frozen keys are absent on purpose. A key
# missing from the checkpoint still fails, in dcp.load, which asks for every key it is given.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)


class CheckpointError(RuntimeError):
    pass


def base_fingerprint(ckpt_dir: str | Path) -> str:
    """A cheap, content-derived identity of a base checkpoint: config.json plus every safetensors
    file's header (names, dtypes, shapes, offsets) and size. It changes when the weights are
    swapped for another model or re-saved differently, without hashing gigabytes."""
    ckpt_dir = Path(ckpt_dir)
    digest = hashlib.sha256((ckpt_dir / "config.json").read_bytes())
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(path.name.encode() + f.read(min(header_len, 100_000_000)))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def step_name(step: int) -> str:
    return f"step_{step:06d}"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int, async_save: bool = False):
        self.root, self.keep_last, self.rank, self.async_save = Path(root), keep_last, rank, async_save
        self._pending = None  # (future, partial_dir, final_dir, extra) of an async save
        # An async save runs its collectives from a background thread while training runs its own:
        # on one shared process group they interleave and deadlock, so it gets a group of its own.
        self._async_group = dist.new_group(backend="gloo") if async_save else None

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer, extra: dict) -> None:
        """Write a checkpoint of ``step``; ``extra`` holds small JSON-able state (sampler, ...)."""
        self.finish_pending()
        final = self.root / step_name(step)
        partial = Path(str(final) + PARTIAL_SUFFIX)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=partial, process_group=self._async_group)
            self._pending = (future, partial, final, extra)
        else:
            dcp.save(state, checkpoint_id=partial)
            self._publish(partial, final, extra)

    def finish_pending(self) -> None:
        if self._pending is not None:
            future, partial, final, extra = self._pending
            self._pending = None
            future.result()
            self._publish(partial, final, extra)

    def _publish(self, partial: Path, final: Path, extra: dict) -> None:
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
            manifest = {"step": int(final.name.split("_")[1]), "world_size": dist.get_world_size(),
                        "files": files, "extra": extra}
            atomic_write(partial / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            atomic_write(self.root / LATEST, lambda p: Path(p).write_text(final.name))
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        published = sorted(p for p in self.root.glob("step_*") if not p.name.endswith(PARTIAL_SUFFIX))
        for old in published[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading --------------------------------------------------------------------------
    def newest_valid(self) -> Path | None:
        """The newest published checkpoint that passes `verify`; broken ones are reported and
        skipped, so a corrupted latest falls back to the one before it."""
        if not self.root.is_dir():
            return None
        for path in sorted(self.root.glob("step_*"), reverse=True):
            if path.name.endswith(PARTIAL_SUFFIX):
                continue
            try:
                verify(path)
                return path
            except CheckpointError as err:
                if self.rank == 0:
                    print(f"warning: skipping checkpoint: {err}", file=sys.stderr, flush=True)
        return None

    def clean_partials(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(f"step_*{PARTIAL_SUFFIX}"):
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()


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


def load(path: str | Path, model: nn.Module, optimizer) -> dict:
    """Load a verified checkpoint into ``model``/``optimizer`` (any world size); returns the
    manifest's ``extra`` state."""
    manifest = verify(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
    try:
        dcp.load(state, checkpoint_id=Path(path))
    except Exception as err:
        raise CheckpointError(f"cannot load {path}: {err} (was it written by a different config?)") from err
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_LOAD_OPTIONS)
    _set_rng_state(state["rng"])
    return manifest["extra"]


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def extract_adapter(path: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter of a step checkpoint as an adapter directory (`adapter_io` format), in one
    process and without building the model: the DCP keys of adapter tensors are the adapter file's
    keys under ``model.``, and the manifest holds the run's config and base fingerprint."""
    from pmss_dist.adapter_io import write_adapter

    path = Path(path)
    manifest = verify(path)
    extra = manifest["extra"]
    if "config" not in extra:
        raise CheckpointError(f"{path} predates configs in checkpoints: export the finished run instead")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    adapter_names = {name for names in ADAPTER_TENSORS.values() for name in names}
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in metadata.items()
             if key.startswith("model.") and key.rsplit(".", 1)[-1] in adapter_names}
    if not state:
        raise CheckpointError(f"{path} holds no adapter tensors")
    dcp.load(state, checkpoint_id=path, no_dist=True)
    cfg = extra["config"]
    meta = {"kind": cfg["adapter"]["kind"], "rank": cfg["adapter"]["rank"], "alpha": cfg["adapter"]["alpha"],
            "targets": cfg["adapter"]["targets"], "method": cfg["adapter"]["method"],
            "base_model": cfg["model"]["path"], "base_fingerprint": extra["base_fingerprint"],
            "step": extra["step"]}
    return write_adapter({key.removeprefix("model."): value for key, value in state.items()}, out_dir, meta)

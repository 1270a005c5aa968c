"""A checkpoint's files: the layout of a checkpoints directory, the manifest and its record, and
the checks every reader makes before it trusts one (export, adapter extraction and the trainer's
resume alike).

Layout under ``<output_dir>/checkpoints``::

    step_000040/            a published checkpoint: DCP files + manifest.json
    step_000050.partial/    being written, or waiting for the next step; never read, removed at start
    latest                  name of the newest published checkpoint (written by rename)
    index.json              the checkpoints this code published: the only ones it ever prunes

A checkpoint is used only if its manifest is a well-formed object, every file it lists is there
with its size and SHA-256, and its ``.metadata`` unpickles through the restricted loader
(`storage`). Checkpoints written before hashes existed still load; the checks they cannot get are
reported. The manager that writes checkpoints and decides when is ``train.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.distributed.checkpoint.api import CheckpointException

from pmss_dist.errors import CheckpointError
from pmss_dist.adapters.layers import ADAPTER_TENSORS
from pmss_dist.checkpoints import storage
from pmss_dist.files import atomic_write, file_sha256
from pmss_dist.console import print_main

MANIFEST = "manifest.json"
LATEST = "latest"
INDEX = "index.json"
PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"step_(\d+)")


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


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


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
        raise CheckpointError(f"cannot read the adapter of {path}: {first_line(err)}") from None
    meta = {**adapter_meta(record.config["adapter"], record.config["model"]["path"], record.base_fingerprint),
            "step": record.step}
    return write_adapter({key.removeprefix("model."): value for key, value in state.items()}, out_dir, meta)

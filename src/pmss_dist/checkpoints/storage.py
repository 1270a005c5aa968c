"""DCP files on disk: written with their SHA-256 computed on the way, read without running code.

A checkpoint directory comes from elsewhere as often as from this run (copied between clusters,
shared), so nothing in it may execute code when it is read:

- ``.metadata`` is a pickle (DCP writes it with ``pickle.dump``). `SafeReader` reads it with an
  unpickler that admits only the classes DCP's metadata is made of (`ALLOWED_GLOBALS`: DCP's
  metadata dataclasses, ``torch.Size``, dtypes, the layout lookup, ``PosixPath``), the way
  ``torch.load(weights_only=True)`` admits only tensor types; anything else is refused with the
  name of what it asked for. It also refuses item locations outside the checkpoint directory.
- ``.distcp`` files hold ``torch.save`` archives: DCP already reads tensors with
  ``weights_only=True``; `SafeLoadPlanner` does the same for the non-tensor items (optimizer
  hyper-parameters), which DCP's default planner unpickles without restriction.

`HashingWriter` is DCP's ``FileSystemWriter`` with every file's SHA-256 computed from the bytes as
they are written (no second read), per rank; the checkpoint manager gathers them into the
manifest, so a checkpoint is verified by content, not only by size.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_FILE = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Everything a DCP ``.metadata`` pickle (torch 2.13, any world size, adapters or full weights)
# refers to, found by reading real files with pickletools. Each is a data class, an enum, a
# dtype, or a pure lookup (``_get_layout``): none runs code of the file's choosing.
ALLOWED_GLOBALS = frozenset({
    *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "ChunkStorageMetadata",
                                         "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                                         "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})


class StorageError(ValueError):
    """A DCP file that is unreadable or asks for more than plain data; the message names it."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in ALLOWED_GLOBALS or dtype:
            return super().find_class(module, name)
        raise StorageError(f"{self.where} asks to load {module}.{name}, which is not part of DCP's metadata: "
                           "refused (a crafted or foreign file; nothing in it was run)")

    def persistent_load(self, pid):
        raise StorageError(f"{self.where} holds a persistent reference, which DCP's metadata never has: refused")


def load_metadata(path: str | Path) -> Metadata:
    """The DCP ``Metadata`` of checkpoint directory ``path``, unpickled with `ALLOWED_GLOBALS` only,
    and with every item stored in a file directly inside ``path``."""
    where = Path(path) / METADATA_FILE
    try:
        with open(where, "rb") as f:
            metadata = _MetadataUnpickler(f, where).load()
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{where} is missing") from None
    except Exception as err:  # a damaged pickle raises anything from UnpicklingError to MemoryError
        raise StorageError(f"{where} is not readable DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise StorageError(f"{where} is not DCP metadata (it holds a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise StorageError(f"{where} places data at {name!r}, outside the checkpoint directory: refused")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` that reads ``.metadata`` through `load_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise StorageError(f"{self.path}: per-rank metadata files are not used by pmss_dist checkpoints")
        metadata = load_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor items unpickled as ``weights_only=True`` (its
    ``load_bytes``, which calls ``torch.load(weights_only=False)``, with that one flag changed)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:  # an UnpicklingError naming the refused global, or a damaged archive
            lines = str(err).splitlines() or [""]
            why = next((line for line in lines if "WeightsUnpickler error" in line), lines[0]).strip()
            raise StorageError(f"item {read_item.dest_index.fqn} is not plain data ({type(err).__name__}: {why}): "
                               "refused, nothing in it was run") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict, path: str | Path, **kwargs) -> None:
    """``dcp.load`` of ``state`` from checkpoint directory ``path`` through `SafeReader` and
    `SafeLoadPlanner` (collective unless ``no_dist=True``)."""
    try:
        dcp.load(state, checkpoint_id=path, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as err:  # DCP wraps every rank's failure; ours say what was refused
        for exc, _trace in err.failures.values():
            if isinstance(exc, StorageError):
                raise StorageError(str(exc)) from None
        raise


# -- writing ----------------------------------------------------------------------------------

class _HashingStream:
    """A file being written, with its SHA-256 updated by every ``write``. DCP writes its files
    front to back; any other use (a seek) marks the digest unknown, and the file is then hashed
    by reading it back at publication."""

    def __init__(self, raw, on_close):
        self.raw, self._on_close = raw, on_close
        self.digest, self.valid = hashlib.sha256(), True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.close()
            self._on_close(self)

    def __getattr__(self, name):  # anything else (seek, truncate, ...): correct file, unknown digest
        self.valid = False
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    def __init__(self):
        super().__init__()
        self.digests: dict[str, str | None] = {}  # file name -> sha256 hex (None: unknown)
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        if "r" in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = Path(path).name

        def record(stream: _HashingStream) -> None:
            with self._lock:
                self.digests[name] = stream.digest.hexdigest() if stream.valid else None

        with open(path, mode) as raw:
            stream = _HashingStream(raw, record)
            try:
                yield stream
            finally:
                stream.close()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if Path(path).name in self.digests:
                self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)

    def rm_file(self, path) -> None:
        super().rm_file(path)
        with self._lock:
            self.digests.pop(Path(path).name, None)


class HashingWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` that records the SHA-256 of each file it writes (`digests`)."""

    def __init__(self, path: str | Path, **kwargs):
        super().__init__(str(path), **kwargs)
        self.fs = _HashingFileSystem()

    @property
    def digests(self) -> dict[str, str | None]:
        return dict(self.fs.digests)

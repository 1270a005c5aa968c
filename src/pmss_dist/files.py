"""Writing files and directories so that a crash never leaves a half-written one under the final
name, and nothing is written through a link or into a device we were not asked to create.

Temporary names start with ``.pmss-``: `clean_stale` finds what a killed writer left and removes
it, and nothing else ever carries those names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

from pmss_dist.errors import OutputPathError

_TMP = ".pmss-tmp."  # atomic_write's file being written
_STAGING = ".pmss-staging."  # a directory being written, published by rename
_OLD = ".pmss-old."  # the directory a publication replaces, removed once the new one is in place


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_output_file(path: str | Path) -> None:
    """Refuse writing ``path`` if it exists and is neither a regular file nor a link (a link is
    replaced, never written through)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the write itself says why it cannot be)
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
        raise OutputPathError(f"{path} exists and is {kind}, not a file this command may replace; choose "
                              "another path")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk (fsync),
    then rename it into place: ``path`` holds the old contents or all of the new, never a part,
    even after a crash or power loss. A link at ``path`` is replaced, not followed; a device or
    FIFO is refused (`check_output_file`). The one atomic write of the package."""
    path = Path(path)
    check_output_file(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP}{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # the data on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: str | Path) -> None:
    """Remove a file, a link (the link, never what it points to) or a directory tree; nothing if
    absent."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# -- directories that appear whole or not at all --------------------------------------------------

def staging_dir(final: str | Path) -> Path:
    """Where the directory ``final`` is written before `publish_staged` renames it into place."""
    final = Path(final)
    return final.parent / f"{_STAGING}{final.name}"


def begin_staged(final: str | Path) -> Path:
    """Make an empty `staging_dir` for ``final`` (a stale one of a killed writer is removed) and
    return it. ``final`` may be absent, a directory (replaced whole at publication) or a link
    (the link is replaced); anything else is refused."""
    final = Path(final)
    if final.exists() and not final.is_symlink() and not final.is_dir():
        raise OutputPathError(f"{final} exists and is not a directory; choose another path")
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    staging = staging_dir(final)
    remove_path(staging)
    staging.mkdir()
    return staging


def publish_staged(final: str | Path) -> None:
    """Put the written `staging_dir` in place of ``final``: every file flushed to disk, the old
    ``final`` moved aside, the new one renamed in, the old one removed. Killed at any point,
    ``final`` is the whole old directory, the whole new one, or absent with the old one kept
    aside, which `recover` puts back."""
    final = Path(final)
    staging = staging_dir(final)
    for root, _, names in os.walk(staging):
        for name in names:
            _fsync(Path(root) / name)
        _fsync(root)
    old = final.parent / f"{_OLD}{final.name}"
    remove_path(old)
    if final.is_symlink() or final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync(final.parent)
    remove_path(old)


def publish_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(directory)`` into a new staging directory, then `publish_staged` it as ``final``
    (one process; several processes call `begin_staged` and `publish_staged` around their writes)."""
    staging = begin_staged(final)
    try:
        write(staging)
    except BaseException:
        remove_path(staging)
        raise
    publish_staged(final)
    return Path(final)


def recover(final: str | Path) -> None:
    """After a publication killed between its two renames: put the kept old directory back."""
    final = Path(final)
    old = final.parent / f"{_OLD}{final.name}"
    if (old.is_dir() or old.is_symlink()) and not (final.exists() or final.is_symlink()):
        os.replace(old, final)


def clean_stale(directory: str | Path) -> list[str]:
    """Remove what killed writers left in ``directory`` (our temporary names only), after putting
    back any directory a killed publication had moved aside; returns the names removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    for entry in directory.iterdir():
        if entry.name.startswith(_OLD):
            recover(directory / entry.name.removeprefix(_OLD))
    removed = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith((_TMP, _STAGING, _OLD)):
            remove_path(entry)
            removed.append(entry.name)
    return removed


def check_not_over_inputs(out: str | Path, inputs: dict[str, str | Path], what: str) -> None:
    """Refuse an output ``out`` (named ``what``, e.g. "--out") that is, lies inside or contains
    one of the command's ``inputs`` ({name: path}): writing it would change or replace an input."""
    target = Path(out).resolve()
    for name, path in inputs.items():
        source = Path(path).resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = ("is" if target == source else "lies inside" if source in target.parents else "contains")
            raise OutputPathError(f"{what} {out} {relation} {name} {path}, an input of this command; choose an "
                                  "output path outside the inputs")

"""A base checkpoint's fingerprint: what adapters, selections and checkpoints record of the base
they were made on, and what a resume, an export or a cached selection compares.

The fingerprint is the base's content: config.json and the bytes of every safetensors file. A large
base is hashed once; its fingerprint is cached in the user cache (`cache_dir`) by path, sizes and
mtimes. Below both ``hf`` (which reads bases) and ``train`` (which records them).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from pmss_dist.files import file_sha256


def read_safetensors_header(path: Path) -> tuple[int, bytes]:
    """The length and raw JSON bytes of a safetensors file's header (8-byte little-endian length,
    then the header; capped at 100 MB as safetensors itself caps it)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return header_len, f.read(min(header_len, 100_000_000))


# A base checkpoint's identity is its content: config.json and the bytes of every weight file.
# Fingerprints written before that (adapters, selection files and checkpoints of older versions)
# hashed only config.json and the safetensors headers and sizes; they are still accepted, by
# `header_fingerprint`, and reported as the weaker check they are.
FINGERPRINT_PREFIX = "sha256:"
_FINGERPRINT_VERSION = 1
CACHE_ENV = "PMSS_CACHE_DIR"  # the user cache: fingerprints, skeleton selections (default ~/.cache/pmss_dist)
CACHE_MIN_BYTES = 256 << 20  # smaller bases are hashed each time (well under a second), not cached


def header_fingerprint(ckpt_dir: str | Path) -> str:
    """The fingerprint of versions before content hashing: config.json plus every safetensors
    file's header (names, dtypes, shapes, offsets) and size; blind to the weights' values."""
    ckpt_dir = Path(ckpt_dir)
    digest = hashlib.sha256((ckpt_dir / "config.json").read_bytes())
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        digest.update(path.name.encode() + read_safetensors_header(path)[1])
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def weight_file_names(ckpt_dir: str | Path) -> list[str]:
    """The safetensors files a base fingerprint covers, sorted."""
    return sorted(p.name for p in Path(ckpt_dir).glob("*.safetensors"))


def cache_dir() -> Path:
    """The user cache of what is slow to compute again for a base: `CACHE_ENV`, else ~/.cache/pmss_dist."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pmss_dist")


def _cache_file(ckpt_dir: Path) -> Path:
    return cache_dir() / "fingerprints" / (hashlib.sha256(str(ckpt_dir.resolve()).encode()).hexdigest()[:24] + ".json")


def _stat_key(ckpt_dir: Path) -> dict:
    """What the cache is keyed by: the base's resolved path and each file's size and mtime."""
    names = ["config.json", *weight_file_names(ckpt_dir)]
    stats = {name: (ckpt_dir / name).stat() for name in names}
    return {"version": _FINGERPRINT_VERSION, "dir": str(ckpt_dir.resolve()),
            "files": {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}}


def weight_bytes(ckpt_dir: str | Path) -> int:
    return sum((Path(ckpt_dir) / name).stat().st_size for name in weight_file_names(ckpt_dir))


def cached_fingerprint(ckpt_dir: str | Path) -> str | None:
    """The content fingerprint cached for ``ckpt_dir``, if no file changed size or mtime since."""
    ckpt_dir = Path(ckpt_dir)
    try:
        doc = json.loads(_cache_file(ckpt_dir).read_text())
        if isinstance(doc, dict) and doc.get("key") == _stat_key(ckpt_dir):
            fingerprint = doc.get("fingerprint")
            return fingerprint if isinstance(fingerprint, str) else None
    except (OSError, ValueError):
        pass
    return None


def base_fingerprint(ckpt_dir: str | Path, digests: dict[str, str] | None = None) -> str:
    """The content identity of a base checkpoint: SHA-256 over config.json and, for every
    safetensors file, its name and the SHA-256 of its bytes (``"sha256:"`` + 32 hex digits). It is
    cached outside the base (`CACHE_ENV`) by path, file sizes and mtimes, so a large base is
    hashed once (bases under `CACHE_MIN_BYTES` are hashed each time). ``digests`` (file name ->
    `file_sha256`) are file hashes already computed, e.g. by other ranks; the rest are computed here."""
    ckpt_dir = Path(ckpt_dir)
    cache = weight_bytes(ckpt_dir) >= CACHE_MIN_BYTES
    cached = cached_fingerprint(ckpt_dir) if cache else None
    if cached is not None:
        return cached
    key = _stat_key(ckpt_dir)
    digests = dict(digests or {})
    digest = hashlib.sha256((ckpt_dir / "config.json").read_bytes())
    for name in weight_file_names(ckpt_dir):
        if name not in digests:
            digests[name] = file_sha256(ckpt_dir / name)
        digest.update(f"\n{name}\n{digests[name]}".encode())
    fingerprint = FINGERPRINT_PREFIX + digest.hexdigest()[:32]
    if not cache:
        return fingerprint
    cache_file = _cache_file(ckpt_dir)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "fingerprint": fingerprint}))
        os.replace(tmp, cache_file)
    except OSError as err:
        print(f"note: cannot cache the fingerprint of {ckpt_dir} in {cache_file.parent} ({err}); set {CACHE_ENV} "
              "to a writable directory, or it is hashed again next time", file=sys.stderr, flush=True)
    return fingerprint


def comparable_fingerprint(recorded: str, base_dir: str | Path, content: str | None = None) -> str:
    """The fingerprint of ``base_dir`` of the kind ``recorded`` is: its content fingerprint
    (``content`` when the caller has it), or for a record of an older version its header one."""
    if recorded.startswith(FINGERPRINT_PREFIX):
        return content or base_fingerprint(base_dir)
    return header_fingerprint(base_dir)


def check_base_fingerprint(trained: str | Path, recorded: str | None, base_dir: str | Path, fix: str,
                           error: type[Exception] = ValueError) -> str | None:
    """Refuse, with the caller's ``error`` type, a base other than the one ``trained`` (an adapter,
    a checkpoint) recorded; ``fix`` tells the user what to do instead. Returns a note for the user
    when the check was weaker than a content check: a header fingerprint of an older version
    (weights' values not compared) or none recorded (nothing compared)."""
    if not recorded:
        return f"{trained} records no base fingerprint (written before fingerprints): the base is not checked"
    current = comparable_fingerprint(recorded, base_dir)
    note = None if recorded.startswith(FINGERPRINT_PREFIX) else (
        f"{trained} records a header-only base fingerprint (written before content fingerprints): "
        "the base's names, shapes and sizes are checked, not its weights' values")
    if recorded != current:
        raise error(f"{trained} was trained on a base with fingerprint {recorded}, {base_dir} has "
                    f"{current}: {fix}")
    return note

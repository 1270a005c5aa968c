"""What a run trains on, as two digests a resume compares (`train.checkpoint`): the tokenized
training samples, and the tokenizer files of the base. The samples are hashed as they were read
and tokenized, so a changed data file, prompt template or chat template is caught even when the
file keeps its path and row count."""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

from pmss_dist.data.tokenizers import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE

# Every file load_tokenizer and the chat templates read: the tokenizer a run tokenizes with.
TOKENIZER_FILES = (BYTE_TOKENIZER_FILE, SENTENCEPIECE_FILE, HF_TOKENIZER_FILE, "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def samples_fingerprint(samples: list[dict]) -> str:
    """SHA-256 of the samples' integer fields (tokens, labels, packing's document ids ...; a pair's
    sides' too), in order."""
    digest = hashlib.sha256()
    for sample in samples:
        _hash_fields(digest, sample, "")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _hash_fields(digest, sample: dict, prefix: str) -> None:
    """A sample's integer lists by key, and a preference pair's two samples under their sides' names."""
    for key in sorted(sample):
        value = sample[key]
        if isinstance(value, (list, tuple)):
            digest.update((prefix + key).encode())
            digest.update(array("q", value).tobytes())
        elif isinstance(value, dict):
            _hash_fields(digest, value, f"{prefix}{key}.")


def tokenizer_fingerprint(base_dir: str | Path) -> str:
    """SHA-256 of the tokenizer files present in ``base_dir`` (names and bytes)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(base_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]

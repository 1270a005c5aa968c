"""Skeleton selections kept in the user cache, so that another run on the same base (an lr sweep,
another seed) reuses the indices instead of selecting them again.

An entry is one JSON file, ``<cache_dir>/selections/<key hash>.json``. Its key is everything the
indices depend on: the base's content fingerprint, the model dtype and the kind of device the SVDs
run on, and for every adapted layer its name and `selection.selection_inputs` (shape, k, method,
the resolved svd mode, the seed where the selection draws from it), with the code's
`INDICES_VERSION`. A changed base has another fingerprint, so another entry.

The entry is a selection file (`selection.selection_doc`) plus its key and the SHA-256 of the
rest. A cache directory is shared and may be damaged, so an entry is read as untrusted input: JSON
only, its hash and key compared, then every check of `selection.load_selection`. One that fails
is refused with a note and selected again (the entry is then written anew). A cache that cannot be
written is a note: the run goes on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

from pmss_dist.adapters.selection import (INDICES_VERSION, Selection, SelectionError, selection_doc,
                                          selection_from_doc, selection_inputs)
from pmss_dist.checkpoints.fingerprint import CACHE_ENV, cache_dir
from pmss_dist.console import print_main
from pmss_dist.data.rows import JSON_ERRORS, json_problem
from pmss_dist.errors import OutputPathError
from pmss_dist.files import atomic_write

SUBDIR = "selections"


class SelectionCache:
    """The cached selection of one key. ``load`` and ``store`` run on one rank and print notes
    (`print_main`)."""

    def __init__(self, *, base_fingerprint: str, dtype: str, device: str, method: str, k: int, seed: int,
                 svd: str, shapes: Mapping[str, tuple[int, int]]):
        layers = {name: selection_inputs(shape, k, method, svd, seed) for name, shape in sorted(shapes.items())}
        self.key = {"indices_version": INDICES_VERSION, "base_fingerprint": base_fingerprint, "dtype": dtype,
                    "device": device, "layers": layers}
        name = hashlib.sha256(_canonical(self.key)).hexdigest()[:32]
        self.path = cache_dir() / SUBDIR / f"{name}.json"
        # The selection-file fields of the entry. Its seed is the run's where a layer draws from it,
        # else 0: any seed gives those indices, so runs of every seed share the entry.
        draws = any(layer["seed"] is not None for layer in layers.values())
        self.expect = dict(method=method, k=k, seed=seed if draws else 0, base_fingerprint=base_fingerprint,
                           shapes=dict(shapes))

    def load(self) -> dict[str, Selection] | None:
        """The cached selection; None when there is none, or when the entry is refused (one note)."""
        try:
            raw = self.path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no entry, or no cache directory
            return None
        except OSError as err:
            return self._refuse(f"cannot read it: {err}")
        try:
            doc = json.loads(raw)
            intact = isinstance(doc, dict) and doc.get("sha256") == _digest(doc)
        except UnicodeDecodeError as err:
            return self._refuse(f"not valid JSON: {err}")
        except JSON_ERRORS as err:
            return self._refuse(f"not valid JSON: {json_problem(err)}")
        if not intact:
            return self._refuse("its SHA-256 does not match its content")
        if doc.get("cache_key") != self.key:
            return self._refuse("made for another base, model, device or request")
        try:
            return selection_from_doc(doc, self.path, hint="", **self.expect)
        except SelectionError as err:
            return self._refuse(str(err))

    def store(self, selections: Mapping[str, Selection]) -> None:
        """Write the entry atomically; a cache that cannot be written is a note."""
        doc = {**selection_doc(selections, **self.expect), "cache_key": self.key}
        doc["sha256"] = _digest(doc)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(_canonical(doc)))
        except (OSError, OutputPathError) as err:
            print_main(f"note: cannot cache the skeleton selection in {self.path.parent} ({err}); set {CACHE_ENV} "
                       "to a writable directory, or it is selected again next time")

    def _refuse(self, why: str) -> None:
        print_main(f"note: refusing the cached skeleton selection {self.path} ({why}); selecting again")
        return None


def _canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _digest(doc: dict) -> str:
    """The SHA-256 of an entry's content: its JSON, keys sorted, without the ``sha256`` field."""
    return hashlib.sha256(_canonical({key: value for key, value in doc.items() if key != "sha256"})).hexdigest()

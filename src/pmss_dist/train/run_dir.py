"""A run's output directory (``output_dir``): the one place that knows its layout.

    <output_dir>/
      config.json       the resolved config of the run (written at the end)
      summary.json      losses and counts; written last, so its presence means the run finished
      selection.json    PMSS skeleton indices (reusable through adapter.selection_file)
      adapter/          cores or LoRA factors and skeleton indices (``adapters.io``)
      merged/           the base with the update folded in, in the base's HF layout
      checkpoints/      step checkpoints (``train.checkpoint``)
      tensorboard/      scalars
      base_model/       only for ``model.path: builtin:tiny``: the tiny checkpoint the run wrote
"""

from __future__ import annotations

import json
from pathlib import Path

from pmss_dist.config import BUILTIN_TINY
from pmss_dist.files import atomic_write


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.summary = self.root / "summary.json"
        self.selection = self.root / "selection.json"
        self.adapter = self.root / "adapter"
        self.merged = self.root / "merged"
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tensorboard"
        self.base_model = self.root / "base_model"

    def base_dir(self, model_path: str) -> Path:
        """The base checkpoint of a run whose ``model.path`` is ``model_path``."""
        return self.base_model if model_path == BUILTIN_TINY else Path(model_path)

    def finished(self) -> bool:
        return self.summary.is_file() and self.config.is_file()

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def read_config(self) -> dict:
        """The run's resolved config, with the two keys every reader needs checked."""
        try:
            config = json.loads(self.config.read_text())
            config["model"]["path"], config["adapter"]["kind"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.config} has no model.path or adapter.kind: not a pmss_dist run config "
                             f"({err})") from err
        return config

    @staticmethod
    def write_json(path: Path, doc) -> None:
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(doc, indent=2)))

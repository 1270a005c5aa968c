"""Names and row orders between Hugging Face checkpoints and torchtune models.

Keys follow torchtune's HF map, checked in both directions (`match_keys`): every base parameter
of the model must be found in the checkpoint, and every tensor of the checkpoint must land in
the model (a Llama saved with ``attention_bias`` would otherwise lose its biases without a
word). q/k rows are permuted between HF's half-split RoPE and torchtune's interleaved one for
the families that need it; any row index chosen on a permuted weight maps back through it. A
family's ``FUSED`` table says which HF tensors stack several torchtune weights by rows (Phi-3's
``qkv_proj``): each torchtune parameter is then a row range of that tensor (`HFRows`), computed
here once for import, export and PEFT alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torchtune.models.convert_weights import _FROM_HF

from pmss_dist.errors import HFCheckpointError
from pmss_dist.models import build_decoder
from pmss_dist.models.spec import ModelSpec

# torchtune key (with "{}" for the layer) -> HF key, shared by every family: torchtune's own map.
# A family module adds or replaces keys in ``HF_KEYS`` (Qwen2's q/k/v biases, Gemma 2's norms, ...).
COMMON_KEYS = {tune: hf for hf, tune in _FROM_HF.items() if tune is not None}
# Checkpoint tensors that hold nothing the model needs (old Llama saves carry RoPE frequencies).
_DERIVED_HF_KEYS = {hf for hf, tune in _FROM_HF.items() if tune is None}


def _template(key: str) -> tuple[str, str | None]:
    """``layers.3.attn.q_proj.weight`` -> (``layers.{}.attn.q_proj.weight``, ``"3"``)."""
    layer = next((p for p in key.split(".") if p.isdigit()), None)
    return (key.replace(f".{layer}.", ".{}.", 1) if layer is not None else key), layer


def key_map(family: ModuleType) -> dict[str, str]:
    """torchtune key template -> HF key template for ``family`` (a `pmss_dist.models.FAMILIES`
    entry); every part of a fused tensor maps to that tensor's key."""
    fused = {part: hf for hf, parts in getattr(family, "FUSED", {}).items() for part in parts}
    return {**COMMON_KEYS, **getattr(family, "HF_KEYS", {}), **fused}


def tune_key_to_hf(key: str, family: ModuleType) -> str:
    """``layers.3.attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    template, layer = _template(key)
    keys = key_map(family)
    if template not in keys:
        raise KeyError(f"no Hugging Face name for parameter {key!r}: export would drop it")
    return keys[template].format(layer)


@dataclass(frozen=True)
class HFRows:
    """Where a torchtune parameter lives in an HF checkpoint: rows ``start:stop`` of tensor ``key``,
    whose whole shape config.json implies to be ``shape``. Only a fused tensor (`key_map`, a
    family's ``FUSED``) holds more rows than the parameter."""

    key: str
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def fused(self) -> bool:
        return self.stop - self.start != self.shape[0]


def hf_rows(tune_shapes: Mapping[str, Sequence[int]], family: ModuleType) -> dict[str, HFRows]:
    """``{torchtune name: HFRows}`` for parameters of the given (whole, unsharded) shapes. The parts
    of a fused tensor follow each other in the family's ``FUSED`` order; all of them must be given."""
    parts_of = {part: parts for parts in getattr(family, "FUSED", {}).values() for part in parts}
    out = {}
    for name, shape in tune_shapes.items():
        template, layer = _template(name)
        hf_key = tune_key_to_hf(name, family)
        if template not in parts_of:
            out[name] = HFRows(hf_key, 0, shape[0] if len(shape) else 0, tuple(shape))
            continue
        parts = [part.format(layer) for part in parts_of[template]]
        absent = [part for part in parts if part not in tune_shapes]
        if absent:
            raise KeyError(f"{hf_key} stacks {parts}, but {absent} are not parameters of the model")
        rows = [tune_shapes[part][0] for part in parts]
        start = sum(rows[:parts.index(name)])
        out[name] = HFRows(hf_key, start, start + shape[0], (sum(rows), *shape[1:]))
    return out


def tune_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The base parameters' names and shapes of the model ``spec`` describes (a meta build: no
    memory), for callers that have no model, such as export."""
    with torch.device("meta"):
        model = build_decoder(spec)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def permutation_for(tune_key: str, perms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The row permutation of a q/k weight (``layers.0.attn.q_proj.weight``), else ``None``."""
    parts = tune_key.split(".")
    return perms.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "weight" else None


def to_hf_rows(rows: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """A tensor in torchtune's row order back in HF's (HF row ``perm[t]`` <- torchtune row ``t``);
    ``perm=None``: the rows as they are."""
    return rows if perm is None else torch.empty_like(rows).index_copy_(0, perm, rows)


def match_keys(tune_shapes: Mapping[str, Sequence[int]], files: dict[str, Path], spec: ModelSpec,
               ckpt_dir: Path) -> dict[str, HFRows]:
    """``{torchtune name: HFRows}`` for every base parameter (name -> whole shape); fails naming the
    first parameter the checkpoint lacks or the first checkpoint tensor the model has no place for."""
    layers = {int(layer) for layer in (_template(key)[1] for key in files if key.startswith("model.layers."))
              if layer is not None}
    if layers and max(layers) + 1 != spec.num_layers:
        raise HFCheckpointError(f"{ckpt_dir}: config.json's num_hidden_layers={spec.num_layers}, "
                                f"but the checkpoint holds layers 0..{max(layers)}: config.json contradicts the "
                                f"weights; set num_hidden_layers to {max(layers) + 1}")
    pairs = hf_rows(tune_shapes, spec.family)
    missing = [f"{rows.key} (for {name})" for name, rows in pairs.items() if rows.key not in files]
    if missing:
        raise HFCheckpointError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
                                f"e.g. {missing[:3]}: a weight file is incomplete, or config.json describes "
                                "another model")
    used = {rows.key for rows in pairs.values()}
    unused = [k for k in files if k not in used and _template(k)[0] not in _DERIVED_HF_KEYS
              and not (k == "lm_head.weight" and spec.tied)]
    if unused:
        where = files[unused[0]]
        raise HFCheckpointError(f"{where}: tensor(s) {unused[:3]} have no place in the "
                                f"{spec.family.ARCHITECTURE} model that config.json describes (e.g. "
                                "attention_bias/mlp_bias, which the torchtune builder lacks); refusing to drop them")
    return pairs

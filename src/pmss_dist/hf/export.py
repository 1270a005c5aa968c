"""Hugging Face checkpoints out: the base with the adapter folded in, the adapter as PEFT LoRA, or
the weights of a full fine-tuning checkpoint.

Merged export streams from the base files and needs nothing else: PMSS's ``C = W[:, J]`` and
``R = W[I, :]`` are slices of the base weight itself, so ``W' = W + s·C·U·R`` is computed from
the base tensor and the saved core and indices. Shapes and dtypes do not change, so every output
file is a byte copy of its base file with the adapted tensors overwritten in place: file names,
safetensors headers and the index stay the base's, tensors not adapted stay byte-identical, and
peak memory is one weight matrix (in fp32 while it is merged) whatever the model size. Files can
be divided among ranks (``rank``/``world_size``).

Layouts. Indices and factors are saved in torchtune's layout, whose q/k rows are a permutation of
HF's (``perm[t]`` = HF row of torchtune row ``t``). Columns are not permuted, so in HF layout
``C = W_hf[:, J]`` and ``R = W_hf[perm[I], :]``: the update needs no permuting back at all. A
LoRA ``B`` has its rows in torchtune order: row ``t`` goes to HF row ``perm[t]``, as do the rows of
a fully fine-tuned q/k weight.

Fused tensors (a family's ``FUSED``: Phi-3's ``qkv_proj`` = [q; k; v] by rows). Each torchtune
weight is a row block of one HF tensor (`hf.keys.HFRows`); its update is computed from that block
alone and written back into it, so the other blocks stay byte-identical. PEFT targets the fused
module: ``lora_A`` stacks the parts' ``A`` (or ``R``) and ``lora_B`` puts each part's ``s·B`` (or
``s·C·U``) in its own rows and columns (block-diagonal), a LoRA of rank k × (parts adapted). The
PEFT adapter has one rank for every module, the largest: the others are padded with zeros, since
servers (vLLM, llama.cpp) read only the global ``r`` and ``lora_alpha``, never PEFT's patterns.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from pmss_dist.errors import ExportError
from pmss_dist.adapters.io import ADAPTER_META, ADAPTER_WEIGHTS, read_adapter
from pmss_dist.adapters.layers import (ADAPTER_TENSORS, FULL, TARGET_ALIASES, lora_factors, merge_dtype, merge_update,
                                      pmss_factors, update_scale)
from pmss_dist.adapters.quantize import as_stored
from pmss_dist.files import atomic_write, check_not_over_inputs, publish_dir
from pmss_dist.hf.keys import HFRows, hf_rows, match_keys, permutation_for, to_hf_rows, tune_key_to_hf, tune_shapes
from pmss_dist.hf.load import copy_side_files, open_safetensors, read_model_spec, weight_files
from pmss_dist.models.spec import ModelSpec
from pmss_dist.console import print_main
from pmss_dist.checkpoints import storage
from pmss_dist.checkpoints.fingerprint import check_base_fingerprint, read_safetensors_header
from pmss_dist.checkpoints.record import CheckpointError, read_record

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# What a merged or full export was made from and, for an adapter, which base weights took its update.
EXPORT_RECORD = "pmss_export.json"
ORIGINAL_WEIGHTS = "the original weights"
_PROJECTIONS = set(TARGET_ALIASES.values())
_BASE_FIX = ("pass the original base (or skip this check if the base was only re-saved, e.g. in another "
             "dtype)")


@dataclass(frozen=True)
class LayerUpdate:
    """One adapted weight: where it lives in the HF checkpoint and what its update is."""

    name: str  # torchtune layer, e.g. layers.0.attn.q_proj
    rows: HFRows  # its weight in the HF checkpoint, e.g. model.layers.0.self_attn.q_proj.weight, all rows
    kind: str
    size: int  # k for PMSS, r for LoRA (adapter.json's "rank")
    alpha: float
    tensors: dict[str, torch.Tensor]
    perm: torch.Tensor | None  # q/k rows: torchtune row t is HF row perm[t]

    @property
    def hf_key(self) -> str:
        return self.rows.key

    @property
    def scale(self) -> float:
        return update_scale(self.alpha, self.size)

    def check_shape(self, shape: tuple[int, ...], where: Path) -> None:
        """Refuse a base tensor of another ``shape`` than config.json implies, and an adapter that
        cannot belong to this weight (another base)."""
        if len(shape) != 2 or shape != self.rows.shape:
            raise ExportError(f"{where}: {self.hf_key} has shape {shape}, config.json implies {self.rows.shape}")
        d_out, d_in = self.rows.stop - self.rows.start, shape[1]  # this layer's rows of it (fused or not)
        t, k = self.tensors, self.size
        if self.kind == "pmss":
            ok = (t["core"].shape == (k, k) and t["row_idx"].shape == (k,) and t["col_idx"].shape == (k,)
                  and t["row_idx"].dtype == t["col_idx"].dtype == torch.int64
                  and 0 <= int(t["row_idx"].min()) and int(t["row_idx"].max()) < d_out
                  and 0 <= int(t["col_idx"].min()) and int(t["col_idx"].max()) < d_in)
        else:
            ok = t["lora_a"].shape == (k, d_in) and t["lora_b"].shape == (d_out, k)
        if not ok:
            shapes = {name: tuple(v.shape) for name, v in t.items()}
            size = f"{'k' if self.kind == 'pmss' else 'r'}={k}"
            block = f" rows {self.rows.start}:{self.rows.stop}" if self.rows.fused else ""
            raise ExportError(f"adapter layer {self.name} ({shapes}, {size}) does not fit {self.hf_key}{block} "
                              f"{(d_out, d_in)} in {where}: the adapter was trained on another base model")

    def factors(self, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` in HF layout with ``update = scale · left @ right``: PMSS ``(C·U, R)``
        from the base ``weight`` (this layer's rows of it: `block`), LoRA ``(B, A)``
        (`lora_factors`; ``weight`` only sets the dtype); in `merge_dtype`. Only the q/k row
        permutation is done here."""
        t = self.tensors
        if self.kind == "pmss":
            rows = t["row_idx"] if self.perm is None else self.perm[t["row_idx"]]  # R = W_hf[perm[I], :]
            return pmss_factors(weight, t["core"], rows, t["col_idx"])
        b, a = lora_factors(t["lora_a"], t["lora_b"], merge_dtype(weight))
        return to_hf_rows(b, self.perm), a

    def block(self, weight: torch.Tensor) -> torch.Tensor:
        """This layer's rows of the HF tensor ``weight`` (all of them unless it is fused)."""
        return weight[self.rows.start:self.rows.stop]

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + s·left·right`` for this layer's block ``W`` of the HF tensor, in the weight's dtype
        (computed in fp32, as `merge_adapters` does)."""
        left, right = self.factors(weight)
        return merge_update(weight, self.scale * (left @ right))


def _merge_into(updates: list[LayerUpdate], as_trained: TrainedBase | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``replace`` entry for `_write_replaced_file`: the HF tensor with each update merged into
    its own rows (into them as the run stored them, with ``as_trained``); rows of a fused tensor
    that no update touches are copied unchanged."""
    def new_value(weight: torch.Tensor) -> torch.Tensor:
        out = weight.clone()  # safetensors hands out views of its memory map: never write into them
        for update in updates:
            block = update.block(weight)
            if as_trained is not None:
                block = as_trained.block(block, update.perm)
            out[update.rows.start:update.rows.stop] = update.merged(block)
        return out

    return new_value


@dataclass(frozen=True)
class TrainedBase:
    """How a run stored its frozen base: ``model.quantize`` and ``model.dtype``."""

    quantize: str
    dtype: torch.dtype

    @classmethod
    def of_run(cls, model_config: dict) -> TrainedBase | None:
        """The base a run with this ``model`` config section trained on; None when that is the
        original weights (``model.quantize: none``)."""
        quantize = model_config.get("quantize", "none")
        return None if quantize == "none" else cls(quantize, getattr(torch, model_config["dtype"]))

    def describe(self) -> str:
        return f"the {self.quantize} base as trained, dequantized to {str(self.dtype).removeprefix('torch.')}"

    def block(self, weight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        """A layer's HF block as the run computed with it: quantized in torchtune's row order
        (``perm``: torchtune row t is HF row perm[t]), dequantized, in the block's dtype."""
        tune = weight if perm is None else weight[perm]
        return to_hf_rows(as_stored(self.quantize, tune, self.dtype).to(weight.dtype), perm)


def read_updates(adapter_dir: Path, spec: ModelSpec) -> tuple[dict, dict[str, LayerUpdate]]:
    """The adapter's metadata and ``{torchtune layer: LayerUpdate}``. Every tensor of the adapter
    must map to an HF weight: an unknown tensor or layer is an error, never dropped."""
    state, meta = read_adapter(adapter_dir)
    where = adapter_dir / ADAPTER_WEIGHTS
    kind = meta.get("kind")
    if kind not in ADAPTER_TENSORS:
        raise ExportError(f"{adapter_dir / ADAPTER_META}: unknown adapter kind {kind!r}; "
                          f"expected one of {sorted(ADAPTER_TENSORS)}")
    try:
        size, alpha = int(meta["rank"]), float(meta["alpha"])  # "rank": k for PMSS, r for LoRA
        if size <= 0:
            raise ValueError(f"rank {size} is not positive")
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{adapter_dir / ADAPTER_META}: needs numeric 'rank' and 'alpha' ({err})") from err
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer, _, attr = key.rpartition(".")
        if attr not in ADAPTER_TENSORS[kind] or layer.rpartition(".")[2] not in _PROJECTIONS:
            raise ExportError(f"{where}: tensor {key!r} is not part of a {kind} adapter on a projection "
                              f"({', '.join(sorted(_PROJECTIONS))}); refusing to export without it")
        layers.setdefault(layer, {})[attr] = value
    if not layers:
        raise ExportError(f"{where} holds no adapter tensors")
    perms = spec.qk_permutations
    rows_of = hf_rows(tune_shapes(spec), spec.family)
    updates = {}
    for layer, tensors in layers.items():
        missing = set(ADAPTER_TENSORS[kind]) - set(tensors)
        if missing:
            raise ExportError(f"{where}: layer {layer} lacks {sorted(missing)}")
        try:
            hf_key = tune_key_to_hf(f"{layer}.weight", spec.family)
        except KeyError as err:
            raise ExportError(f"{where}: layer {layer} has no Hugging Face name; refusing to drop it") from err
        if f"{layer}.weight" not in rows_of:
            raise ExportError(f"the base (its config.json) has no tensor {hf_key} for adapter layer {layer}")
        updates[layer] = LayerUpdate(layer, rows_of[f"{layer}.weight"], kind, size, alpha, tensors,
                                     permutation_for(f"{layer}.weight", perms))
    return {**meta, "rank": size, "alpha": alpha}, updates


def _load(adapter_dir, base_dir, check_base: bool):
    """Parse and validate everything before a byte is written: config, adapter, that the adapter
    belongs to this base, and that every adapted weight exists with a fitting shape."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    meta, updates = read_updates(adapter_dir, read_model_spec(base_dir))
    if check_base:
        check_base_fingerprint(adapter_dir, meta.get("base_fingerprint"), base_dir, _BASE_FIX, ExportError)
    files = weight_files(base_dir)
    for update in updates.values():
        if update.hf_key not in files:
            raise ExportError(f"{base_dir} has no tensor {update.hf_key} for adapter layer {update.name}")
        with open_safetensors(files[update.hf_key]) as f:
            update.check_shape(tuple(f.get_slice(update.hf_key).get_shape()), files[update.hf_key])
    return meta, updates, files


def _by_hf_key(updates: dict[str, LayerUpdate]) -> dict[str, list[LayerUpdate]]:
    """The updates of each HF tensor, in row order: one, or one per adapted part of a fused tensor."""
    groups: dict[str, list[LayerUpdate]] = {}
    for update in sorted(updates.values(), key=lambda u: (u.hf_key, u.rows.start)):
        groups.setdefault(update.hf_key, []).append(update)
    return groups


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of each tensor's data (the file was validated by ``safe_open``)."""
    header_len, raw = read_safetensors_header(path)
    header = json.loads(raw)
    start = 8 + header_len
    return {key: (start + v["data_offsets"][0], start + v["data_offsets"][1])
            for key, v in header.items() if key != "__metadata__"}


def _write_replaced_file(src: Path, dst: Path, replace: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """``dst`` = ``src`` with each tensor named in ``replace`` overwritten by ``replace[key](base
    tensor)`` (same shape and dtype), byte for byte elsewhere; one tensor in memory at a time.
    Written under a temporary name, then renamed."""
    if sys.byteorder != "little":
        raise ExportError("safetensors data is little-endian; in-place merge needs a little-endian host")

    def write(tmp: str) -> None:
        shutil.copyfile(src, tmp)
        if not replace:
            return
        offsets = _safetensors_offsets(src)
        with open_safetensors(src) as f, open(tmp, "r+b") as out:
            for hf_key, new_value in replace.items():
                value = new_value(f.get_tensor(hf_key)).contiguous()
                start, end = offsets[hf_key]
                data = value.view(torch.uint8).numpy()
                assert data.nbytes == end - start, f"{hf_key}: new size differs from the base's"
                out.seek(start)
                out.write(data.tobytes())

    atomic_write(dst, write)


# Export kinds by what a previous export's EXPORT_RECORD says: an HF checkpoint (merged, or a full
# fine-tuning run's weights) may replace another; a PEFT adapter directory, another PEFT one.
_KINDS = {"merged": "hf", "full": "hf", "peft": "peft"}


def check_export_target(out_dir: str | Path, kind: str, inputs: dict[str, Path]) -> None:
    """Refuse an export directory ``out_dir`` that is, lies inside or contains one of the
    command's ``inputs``, or that holds anything but a previous export of the same ``kind``
    ("merged", "full", "peft"): an export replaces its directory whole."""
    out_dir = Path(out_dir)
    check_not_over_inputs(out_dir, inputs, "output directory")
    if out_dir.is_symlink() or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return  # absent, empty, or a link: the export is put in its place
    try:
        previous = json.loads((out_dir / EXPORT_RECORD).read_text())["export"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if _KINDS.get(previous) != _KINDS[kind]:
        held = ", ".join(sorted(p.name for p in out_dir.iterdir())[:4])
        what = f"a {previous} export" if previous else f"files of something else ({held}, ...)"
        raise ExportError(f"{out_dir} holds {what}; an export replaces its directory whole, so it goes to a new "
                          f"or empty directory or over a previous {kind} export")


def verify_hf_export(out_dir: Path, base_dir: Path) -> None:
    """Before publication: every weight file of the base is there at its size (each is a byte
    copy with tensors overwritten in place), and config.json."""
    for path in sorted(set(weight_files(base_dir).values())):
        written = out_dir / path.name
        if not written.is_file() or written.stat().st_size != path.stat().st_size:
            raise ExportError(f"{written} is missing or not the size of {path}: the export was not completed")
    if not (out_dir / "config.json").is_file():
        raise ExportError(f"{out_dir / 'config.json'} is missing: the export was not completed")


def export_merged(adapter_dir: str | Path, base_dir: str | Path, out_dir: str | Path, progress: bool = True,
                  *, check_base: bool = True, as_trained: TrainedBase | None = None) -> Path:
    """`write_merged` in one process, published as ``out_dir`` whole or not at all: written into a
    staging directory beside it, checked, then renamed in place of any previous export there."""
    adapter_dir, base_dir, out_dir = Path(adapter_dir), Path(base_dir), Path(out_dir)
    check_export_target(out_dir, "merged", {"the base": base_dir, "the adapter": adapter_dir})

    def write(staging: Path) -> None:
        write_merged(adapter_dir, base_dir, staging, progress, check_base=check_base, as_trained=as_trained)
        verify_hf_export(staging, base_dir)

    publish_dir(out_dir, write)
    return out_dir


def write_merged(adapter_dir: str | Path, base_dir: str | Path, out_dir: str | Path, progress: bool = True,
                 *, rank: int = 0, world_size: int = 1, check_base: bool = True,
                 as_trained: TrainedBase | None = None) -> Path:
    """Write ``base_dir`` with the adapter of ``adapter_dir`` folded in to ``out_dir``: same weight
    files, index, dtypes and key names as the base, config and tokenizer files copied, no adapter
    files, and `EXPORT_RECORD` saying what the update was merged into. The update goes into the
    original weights; with ``as_trained`` (a quantized run: `TrainedBase.of_run`), into each
    adapted weight as the run stored it, with the skeletons cut from that: the model as trained.
    ``out_dir`` is a new directory (`export_merged` and the trainer publish it). With
    ``world_size > 1`` each rank writes every ``world_size``-th weight file and rank 0 the side
    files; call it on every rank, then barrier."""
    adapter_dir, base_dir, out_dir = Path(adapter_dir), Path(base_dir), Path(out_dir)
    meta, updates, files = _load(adapter_dir, base_dir, check_base)
    paths = sorted(set(files.values()))
    by_file: dict[Path, dict] = {}
    for hf_key, group in _by_hf_key(updates).items():
        by_file.setdefault(files[hf_key], {})[hf_key] = _merge_into(group, as_trained)
    mine = paths[rank::world_size]
    for i, path in enumerate(mine, 1):
        _write_replaced_file(path, out_dir / path.name, by_file.get(path, {}))
        if progress:
            print_main(f"export_merged: [{i}/{len(mine)}] {path.name}: "
                       f"{len(by_file.get(path, {}))} adapted weight(s) merged")
    if rank == 0:
        merged_into = ORIGINAL_WEIGHTS if as_trained is None else as_trained.describe()
        _write_export_record(out_dir, {"export": "merged", "base": str(base_dir.resolve()),
                                       "adapter": str(adapter_dir.resolve()), "step": meta.get("step"),
                                       "merged_into": merged_into})
        copied = copy_side_files(base_dir, out_dir)
        if progress:
            print_main(f"export_merged: {len(updates)} weights merged into {merged_into} "
                       f"(copied {', '.join(copied)})")
    return out_dir


def _write_export_record(out_dir: Path, record: dict) -> None:
    atomic_write(out_dir / EXPORT_RECORD, lambda p: Path(p).write_text(json.dumps(record, indent=2) + "\n"))


def export_full(checkpoint_dir: str | Path, base_dir: str | Path, out_dir: str | Path, progress: bool = True,
                *, check_base: bool = True) -> Path:
    """`write_full` in one process, published as ``out_dir`` whole or not at all (`export_merged`)."""
    checkpoint_dir, base_dir, out_dir = Path(checkpoint_dir), Path(base_dir), Path(out_dir)
    check_export_target(out_dir, "full", {"the base": base_dir, "the checkpoint": checkpoint_dir})

    def write(staging: Path) -> None:
        write_full(checkpoint_dir, base_dir, staging, progress, check_base=check_base)
        verify_hf_export(staging, base_dir)

    publish_dir(out_dir, write)
    return out_dir


def write_full(checkpoint_dir: str | Path, base_dir: str | Path, out_dir: str | Path, progress: bool = True,
               *, rank: int = 0, world_size: int = 1, check_base: bool = True) -> Path:
    """Write the weights of a full fine-tuning step checkpoint (``adapter.kind: full``) to ``out_dir``
    in ``base_dir``'s file layout, index and dtypes, config and tokenizer files copied, as
    `export_merged` does with an adapter. Reads the DCP files in this process (no process group);
    peak memory is one base file's tensors in fp32. Files are divided among ranks the same way."""
    checkpoint_dir, base_dir, out_dir = Path(checkpoint_dir), Path(base_dir), Path(out_dir)
    try:
        record = read_record(checkpoint_dir)
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    kind = (record.config or {}).get("adapter", {}).get("kind")
    if kind != FULL:
        raise ExportError(f"{checkpoint_dir} is a checkpoint of a {kind or 'pre-config'} run, not of full "
                          "fine-tuning: export its adapter (pmss-export --run) instead")
    if check_base:
        check_base_fingerprint(checkpoint_dir, record.base_fingerprint, base_dir, _BASE_FIX, ExportError)
    spec = read_model_spec(base_dir)
    files = weight_files(base_dir)
    try:  # the restricted loader: a checkpoint is a file from elsewhere, its pickle may not run code
        metadata = storage.load_metadata(checkpoint_dir).state_dict_metadata
    except storage.StorageError as err:
        raise ExportError(str(err)) from None
    shapes = {key.removeprefix("model."): tuple(metadata[key].size) for key in metadata if key.startswith("model.")}
    try:  # the same two-way check as loading: every trained tensor has a base tensor, and back
        pairs = match_keys(shapes, files, spec, base_dir)
    except (KeyError, ValueError) as err:
        raise ExportError(f"{checkpoint_dir} does not hold the weights of {base_dir}: {err}") from err
    # HF tensor -> the trained tensors it is made of, in row order (several for a fused tensor).
    parts_of: dict[str, list[str]] = {}
    for tune, rows in sorted(pairs.items(), key=lambda item: item[1].start):
        parts_of.setdefault(rows.key, []).append(tune)
    if spec.tied and "lm_head.weight" in files:
        parts_of["lm_head.weight"] = ["tok_embeddings.weight"]  # a tied copy the base carries: keep it equal
    perms = spec.qk_permutations
    paths = sorted(set(files.values()))
    mine = paths[rank::world_size]
    for i, path in enumerate(mine, 1):
        keys = {hf_key: parts for hf_key, parts in parts_of.items() if files[hf_key] == path}
        state = {f"model.{tune}": torch.empty(shapes[tune], dtype=metadata[f"model.{tune}"].properties.dtype)
                 for parts in keys.values() for tune in parts}
        storage.load(state, checkpoint_dir, no_dist=True)
        replace = {k: _trained_weight(k, [(state[f"model.{t}"], permutation_for(t, perms)) for t in parts], path)
                   for k, parts in keys.items()}
        _write_replaced_file(path, out_dir / path.name, replace)
        if progress:
            print_main(f"export_full: [{i}/{len(mine)}] {path.name}: {len(keys)} trained weight(s)")
    if rank == 0:
        _write_export_record(out_dir, {"export": "full", "base": str(base_dir.resolve()),
                                       "checkpoint": str(checkpoint_dir.resolve()), "step": record.step})
        copied = copy_side_files(base_dir, out_dir)
        if progress:
            print_main(f"export_full: {len(parts_of)} weights of {checkpoint_dir.name} "
                       f"(copied {', '.join(copied)})")
    return out_dir


def _trained_weight(hf_key: str, parts: list[tuple[torch.Tensor, torch.Tensor | None]], where: Path):
    """A ``replace`` entry for `_write_replaced_file`: the trained tensor(s) (with their q/k row
    permutations), each in HF row order and stacked by rows if the HF tensor is fused, cast to the
    base tensor's dtype after checking that the result has the base tensor's shape."""
    def new_value(base: torch.Tensor) -> torch.Tensor:
        value = torch.cat([to_hf_rows(t, perm) for t, perm in parts])  # built when written, one at a time
        if value.shape != base.shape:
            raise ExportError(f"trained {hf_key} has shape {tuple(value.shape)}, {where} has "
                              f"{tuple(base.shape)}: the checkpoint belongs to another base model")
        return value.to(base.dtype)

    return new_value


# The values vLLM's --max-lora-rank accepts (``MaxLoRARanks``, the ``max_lora_rank`` choices in
# vLLM's vllm/config/lora.py): an adapter of a higher rank cannot be served by vLLM as a LoRA.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest ``--max-lora-rank`` with which vLLM serves a LoRA of rank ``r``; None if
    ``r`` exceeds them all."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= r), None)


def vllm_serving_note(r: int) -> str:
    """What a user serving a PEFT export of rank ``r`` with vLLM must know."""
    max_rank = vllm_max_lora_rank(r)
    if max_rank is None:
        return (f"export_peft: vLLM cannot serve this adapter as a LoRA (rank {r} > {VLLM_MAX_LORA_RANKS[-1]}); "
                "serve the merged export (pmss-export without --peft) instead")
    return f"export_peft: vLLM serves this adapter (rank {r}) with --max-lora-rank {max_rank}"


def export_peft(adapter_dir: str | Path, base_dir: str | Path, out_dir: str | Path, progress: bool = False,
                *, check_base: bool = True) -> Path:
    """Write the adapter's update as a standard PEFT LoRA (``adapter_config.json`` +
    ``adapter_model.safetensors``, fp32, HF layout) that ``PeftModel.from_pretrained(base, out_dir)``
    loads. The update's scale is folded into ``lora_B``: PMSS ``lora_A = R``, ``lora_B = s·C·U``;
    LoRA ``lora_A = A``, ``lora_B = (alpha/r)·B``. A fused HF module with n adapted parts gets the
    parts' factors stacked (``lora_A``) and block-diagonal (``lora_B``), rank n·k. Every module is
    zero-padded to one rank r, the largest, with ``lora_alpha = r`` (PEFT's scale 1) and empty
    ``rank_pattern``/``alpha_pattern``: what servers that read only ``r``/``lora_alpha`` (vLLM,
    llama.cpp) apply correctly. Prints (always) the ``--max-lora-rank`` vLLM needs for it."""
    adapter_dir, base_dir, out_dir = Path(adapter_dir), Path(base_dir), Path(out_dir)
    check_export_target(out_dir, "peft", {"the base": base_dir, "the adapter": adapter_dir})
    meta, updates, files = _load(adapter_dir, base_dir, check_base)
    groups = _by_hf_key(updates)
    # One rank for all: vLLM and llama.cpp ignore rank_pattern/alpha_pattern, so a module of lower
    # rank is padded with zero rows of lora_A and zero columns of lora_B (its update is unchanged).
    r = max(sum(u.size for u in group) for group in groups.values())
    tensors = {}
    for i, (hf_key, group) in enumerate(groups.items(), 1):
        weight = None
        if group[0].kind == "pmss":
            with open_safetensors(files[hf_key]) as f:
                weight = f.get_tensor(hf_key)
        # lora_A stacks the parts' right factors; lora_B holds each part's scaled left factor in the
        # part's rows and its own columns (block-diagonal when the HF tensor is fused).
        lora_a, lora_b, col = torch.zeros(r, group[0].rows.shape[1]), torch.zeros(group[0].rows.shape[0], r), 0
        for update in group:
            left, right = update.factors(None if weight is None else update.block(weight))
            lora_a[col:col + update.size] = right
            lora_b[update.rows.start:update.rows.stop, col:col + update.size] = update.scale * left  # PEFT's scale: 1
            col += update.size
        module = hf_key.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
        if progress and i % 16 == 0:
            print_main(f"export_peft: {i} modules")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir.resolve()),
        "r": r, "lora_alpha": r, "target_modules": sorted({key.removesuffix(".weight").rpartition(".")[2]
                                                           for key in groups}),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }
    record = {"export": "peft", "base": str(base_dir.resolve()), "adapter": str(adapter_dir.resolve()),
              "step": meta.get("step")}

    def write(staging: Path) -> None:
        atomic_write(staging / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(staging / PEFT_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
        _write_export_record(staging, record)

    publish_dir(out_dir, write)
    if progress:
        print_main(f"export_peft: {len(updates)} layers as {len(tensors) // 2} PEFT LoRA modules (r={r}) in {out_dir}")
    print_main(vllm_serving_note(r))  # always: the user needs it to serve the adapter at all
    return out_dir

"""Hugging Face checkpoint directories in: each rank reads only the rows of its own shards.

Tensors are memory-mapped through ``safetensors`` (never unpickled) and sliced before they are
copied, so a rank's peak memory is its shards plus one slice. Names and q/k row orders come
from ``hf.keys``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.tensor import DTensor, Shard

from pmss_dist.adapters.layers import adapter_layers, plain_name
from pmss_dist.hf.keys import match_keys, permutation_for, row_permutations
from pmss_dist.models import build_decoder
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a checkpoint directory besides the weights that a copy of it must carry.
SIDE_FILES = ("config.json", "generation_config.json", INDEX_FILE, "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              BYTE_TOKENIZER_FILE)


def read_hf_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: model.path must be an HF checkpoint directory "
                                "with config.json and *.safetensors")
    with open(path) as f:
        return json.load(f)


def read_safetensors_header(path: Path) -> tuple[int, bytes]:
    """The length and raw JSON bytes of a safetensors file's header (8-byte little-endian length,
    then the header; capped at 100 MB as safetensors itself caps it)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return header_len, f.read(min(header_len, 100_000_000))


def base_fingerprint(ckpt_dir: str | Path) -> str:
    """A cheap, content-derived identity of a base checkpoint: config.json plus every safetensors
    file's header (names, dtypes, shapes, offsets) and size. It changes when the weights are
    swapped for another model or re-saved differently, without hashing gigabytes."""
    ckpt_dir = Path(ckpt_dir)
    digest = hashlib.sha256((ckpt_dir / "config.json").read_bytes())
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        digest.update(path.name.encode() + read_safetensors_header(path)[1])
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def check_base_fingerprint(trained: str | Path, recorded: str | None, base_dir: str | Path, fix: str,
                           error: type[Exception] = ValueError) -> None:
    """Refuse, with the caller's ``error`` type, a base other than the one ``trained`` (an adapter,
    a checkpoint) recorded; ``fix`` tells the user what to do instead. Nothing recorded (files
    older than fingerprints): nothing to check."""
    if recorded and recorded != base_fingerprint(base_dir):
        raise error(f"{trained} was trained on a base with fingerprint {recorded}, {base_dir} has "
                    f"{base_fingerprint(base_dir)}: {fix}")


def weight_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it. Like transformers, a single ``model.safetensors``
    wins over an index (``save_pretrained`` into an old sharded directory leaves its index)."""
    ckpt_dir = Path(ckpt_dir)
    single, index = ckpt_dir / SINGLE_FILE, ckpt_dir / INDEX_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {key: single for key in f.keys()}
    if not index.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a safetensors index (no weight_map): {err}") from err
    files = {key: ckpt_dir / name for key, name in weight_map.items()}
    for path in sorted(set(files.values())):
        if path.parent != ckpt_dir:
            raise ValueError(f"{index} names {path.name!r}, outside the checkpoint directory")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
    return files


def open_safetensors(path: Path):
    """``safe_open`` with an error that names the file: safetensors checks on open that the
    header is whole and that the data covers every tensor, so a truncated file fails here."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for short/corrupt files
        raise ValueError(f"cannot read {path}: {err} (truncated or not a safetensors file?)") from err


def _row_range(param: torch.Tensor) -> tuple[int, int]:
    """The global rows this rank holds: DTensor ``Shard(0)`` splits like ``torch.chunk``."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 0
    (placement,) = param.placements
    assert isinstance(placement, Shard) and placement.dim == 0, f"unexpected placement {placement}"
    n, world = param.shape[0], param.device_mesh.size()
    chunk = math.ceil(n / world)
    start = min(param.device_mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    assert param.to_local().shape[0] == stop - start, "DTensor shard layout differs from torch.chunk"
    return start, stop


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's base tensors (everything but adapter cores/factors) by plain torchtune name,
    wrapper prefixes (``_orig_mod.``, ``_checkpoint_wrapped_module.``) removed."""
    adapter_owned = {f"{layer_name}.{p_name}" for layer_name, layer in adapter_layers(model).items()
                     for p_name, _ in layer.named_parameters(recurse=False) if p_name not in ("weight", "bias")}
    out = {}
    for name, p in model.named_parameters():
        name = plain_name(name)
        if name not in adapter_owned:
            out[name] = p
    return out


def _read_rows(handle, hf_key: str, start: int, stop: int, perm: torch.Tensor | None) -> torch.Tensor:
    """Rows ``start:stop`` of the tensor in torchtune layout, reading no more than the block of HF
    rows they come from (q/k rows of a contiguous torchtune range lie within the same heads)."""
    sliced = handle.get_slice(hf_key)
    if perm is None:
        return sliced[start:stop]
    rows = perm[start:stop]
    if rows.numel() == 0:
        return sliced[0:0]
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return sliced[lo:hi][rows - lo]


@torch.no_grad()
def load_hf_weights(model: nn.Module, ckpt_dir: str | Path, hf_config: dict) -> None:
    """Copy the base weights of ``ckpt_dir`` into ``model`` (plain tensors or FSDP2 shards), each
    rank reading only the rows it owns, converted to the model's dtype. Adapter tensors (cores,
    LoRA factors) are left alone: `reset_adapters` initialises them."""
    ckpt_dir = Path(ckpt_dir)
    files = weight_files(ckpt_dir)
    params = base_parameters(model)
    pairs = match_keys(params, files, hf_config, ckpt_dir)
    perms = row_permutations(hf_config)
    handles: dict[Path, object] = {}
    for name, param in params.items():
        hf_key, path = pairs[name], files[pairs[name]]
        if path not in handles:
            handles[path] = open_safetensors(path)
        try:
            full_shape = tuple(handles[path].get_slice(hf_key).get_shape())
        except Exception as err:
            raise ValueError(f"{path}: cannot read {hf_key}: {err} (the index names a tensor the file lacks?)") from err
        if full_shape != tuple(param.shape):
            raise ValueError(f"{path}: {hf_key} has shape {full_shape}, the model built from config.json "
                             f"expects {tuple(param.shape)} for {name}")
        start, stop = _row_range(param)
        try:
            value = _read_rows(handles[path], hf_key, start, stop, permutation_for(name, perms))
        except Exception as err:
            raise ValueError(f"cannot read {hf_key} from {path}: {err}") from err
        local = param.to_local() if isinstance(param, DTensor) else param
        local.copy_(value.to(local.dtype))


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy config, index, generation config and tokenizer files (never weights, never adapter
    files) from one checkpoint directory to another; returns the names copied."""
    names = {p.name for p in src_dir.iterdir() if p.is_file()
             and (p.name in SIDE_FILES or p.name.startswith("tokenizer"))}
    for name in sorted(names, key=lambda n: (n == "config.json", n)):  # config last: a loadable dir is whole
        shutil.copyfile(src_dir / name, dst_dir / name)
    return sorted(names)


def _progress(enabled: bool, line: str) -> None:
    if enabled:
        print(line, file=sys.stderr, flush=True)


def hf_to_dcp(hf_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict[str, str]:
    """Write the base weights of an HF checkpoint as a ``torch.distributed.checkpoint`` directory
    keyed by torchtune parameter names (q/k rows in torchtune's layout, dtypes as in the files),
    plus config.json and the tokenizer files. Any number of ranks can then ``dcp.load`` their
    shards from it. One process; one tensor in memory at a time (read when DCP writes it).
    Returns ``{torchtune name: HF key}``."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.resolve() == hf_dir.resolve():
        raise ValueError(f"--out {out_dir} is the HF checkpoint itself; choose a new directory")
    hf_config = read_hf_config(hf_dir)
    files = weight_files(hf_dir)
    with torch.device("meta"):
        model = build_decoder(hf_config)
    params = base_parameters(model)
    pairs = match_keys(params, files, hf_config, hf_dir)
    handles = {path: open_safetensors(path) for path in sorted(set(files.values()))}
    placeholders = {}
    for name, hf_key in pairs.items():
        sliced = handles[files[hf_key]].get_slice(hf_key)
        shape = tuple(sliced.get_shape())
        if shape != tuple(params[name].shape):
            raise ValueError(f"{files[hf_key]}: {hf_key} has shape {shape}, config.json implies "
                             f"{tuple(params[name].shape)}")
        # Same shape and dtype as the converted tensor: DCP plans from these, reads come later.
        placeholders[name] = torch.empty(shape, dtype=_SAFETENSORS_DTYPES[sliced.get_dtype()], device="meta")
    perms = row_permutations(hf_config)

    def read(name: str) -> torch.Tensor:
        hf_key = pairs[name]
        return _read_rows(handles[files[hf_key]], hf_key, 0, placeholders[name].shape[0],
                          permutation_for(name, perms)).contiguous()

    planner = _LazyPlanner(read, total=len(placeholders), progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(placeholders, checkpoint_id=out_dir, planner=planner, no_dist=True)
    copied = copy_side_files(hf_dir, out_dir)
    _progress(progress, f"wrote {len(placeholders)} tensors and {', '.join(copied)} to {out_dir}")
    return pairs


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class _LazyPlanner(DefaultSavePlanner):
    """Plans from meta placeholders; reads and converts each tensor only when DCP writes it."""

    def __init__(self, read, total: int, progress: bool):
        super().__init__()
        self._read, self._total, self._progress, self._done = read, total, progress, 0

    def lookup_object(self, index):
        self._done += 1
        if self._done % 16 == 0 or self._done == self._total:
            _progress(self._progress, f"hf_to_dcp: {self._done}/{self._total} tensors")
        return self._read(index.fqn)

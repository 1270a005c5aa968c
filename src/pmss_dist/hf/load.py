"""Hugging Face checkpoint directories in: each rank reads only the rows of its own shards.

Tensors are memory-mapped through ``safetensors`` (never unpickled) and sliced before they are
copied, so a rank's peak memory is its shards plus one slice. Names and q/k row orders come
from ``hf.keys``. A directory that cannot be read as it is (config.json, the index, a weight
file) raises `HFCheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.tensor import DTensor, Replicate, Shard

from pmss_dist.adapters.layers import adapter_layers, plain_name
from pmss_dist.hf.keys import HFRows, match_keys, permutation_for
from pmss_dist.errors import HFCheckpointError
from pmss_dist.models import build_decoder, model_spec
from pmss_dist.models.spec import ModelSpec
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a checkpoint directory besides the weights that a copy of it must carry.
SIDE_FILES = ("config.json", "generation_config.json", INDEX_FILE, "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              BYTE_TOKENIZER_FILE)


class MissingHFFile(HFCheckpointError, FileNotFoundError):
    """A file the checkpoint directory needs is not there (a FileNotFoundError too, for the tools
    that report missing files)."""


def read_model_spec(ckpt_dir: str | Path) -> ModelSpec:
    """The `ModelSpec` of a checkpoint directory's config.json, read and checked once (`model_spec`)."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise MissingHFFile(f"{path} not found: model.path must be an HF checkpoint directory "
                            "with config.json and *.safetensors")
    try:
        config = json.loads(path.read_bytes())
    except ValueError as err:  # not JSON, or not UTF-8
        raise HFCheckpointError(f"{path} is not valid JSON ({err}): restore the model's own config.json") from err
    return model_spec(config, where=str(path))


def weight_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it. Like transformers, a single ``model.safetensors``
    wins over an index (``save_pretrained`` into an old sharded directory leaves its index)."""
    ckpt_dir = Path(ckpt_dir)
    single, index = ckpt_dir / SINGLE_FILE, ckpt_dir / INDEX_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {key: single for key in f.keys()}
    if not index.is_file():
        raise MissingHFFile(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}: model.path must be an HF "
                            "checkpoint directory with config.json and *.safetensors")
    files = {key: ckpt_dir / name for key, name in _weight_map(index).items()}
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise MissingHFFile(f"{path} is listed in {index.name} but missing: download it again")
    return files


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> file name map; every file a .safetensors file of the index's own
    directory (a path elsewhere, ``../x.safetensors``, is refused, never read)."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:  # not JSON, no weight_map, or not an object
        raise HFCheckpointError(f"{index} is not a safetensors index (no weight_map: {err}): download it "
                                "again") from err
    if not isinstance(weight_map, dict):
        raise HFCheckpointError(f"{index}: weight_map is a {type(weight_map).__name__}, not an object of "
                                "tensor name -> file name: download it again")
    for key, name in weight_map.items():
        if not (isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name):
            raise HFCheckpointError(f"{index}: {key} is mapped to {name!r}, not the name of a .safetensors file "
                                    f"in {index.parent}: download the index again")
    return weight_map


def open_safetensors(path: Path):
    """``safe_open`` with an error that names the file: safetensors checks on open that the
    header is whole and its offsets true (within the file, no overlaps, the data covering every
    tensor), so a truncated or corrupt file fails here."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for short/corrupt files
        raise HFCheckpointError(f"cannot read {path}: {err}: the file is truncated or not a safetensors file; "
                                "download it again") from err


def _shard_mesh_dim(param: DTensor) -> int:
    """The mesh dimension a DTensor's rows are split over: FSDP2 places it ``Shard(0)`` there, and
    ``Replicate`` on the other dimension of an HSDP mesh."""
    shards = [(i, p) for i, p in enumerate(param.placements) if not isinstance(p, Replicate)]
    if len(shards) != 1 or not (isinstance(shards[0][1], Shard) and shards[0][1].dim == 0):
        raise AssertionError(f"unexpected placements {param.placements}")
    return shards[0][0]


def _row_range(param: torch.Tensor) -> tuple[int, int]:
    """The global rows this rank holds: DTensor ``Shard(0)`` splits like ``torch.chunk``."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 0
    mesh_dim = _shard_mesh_dim(param)
    n, world = param.shape[0], param.device_mesh.size(mesh_dim)
    chunk = math.ceil(n / world)
    start = min(param.device_mesh.get_local_rank(mesh_dim) * chunk, n)
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


def _read_rows(handle, rows: HFRows, start: int, stop: int, perm: torch.Tensor | None) -> torch.Tensor:
    """Rows ``start:stop`` of the torchtune parameter at ``rows`` (its row range of an HF tensor,
    fused or not), reading no more than the block of HF rows they come from (q/k rows of a
    contiguous torchtune range lie within the same heads)."""
    sliced = handle.get_slice(rows.key)
    if perm is None:
        return sliced[rows.start + start:rows.start + stop]
    picked = perm[start:stop]
    if picked.numel() == 0:
        return sliced[0:0]
    lo, hi = int(picked.min()), int(picked.max()) + 1
    return sliced[rows.start + lo:rows.start + hi][picked - lo]


def check_hf_weights(tune_shapes: Mapping[str, Sequence[int]], ckpt_dir: str | Path,
                     spec: ModelSpec) -> tuple[dict[str, Path], dict[str, HFRows]]:
    """Match every base parameter (torchtune name -> whole shape) to its checkpoint tensor and
    compare shapes, from the safetensors headers alone, so that a config.json contradicting its
    weights fails before anything is allocated or read, naming the fields that set the shape.
    Returns `weight_files` and `match_keys`'s pairs."""
    ckpt_dir = Path(ckpt_dir)
    files = weight_files(ckpt_dir)
    pairs = match_keys(tune_shapes, files, spec, ckpt_dir)
    by_file: dict[Path, list[str]] = {}
    for name, rows in pairs.items():
        by_file.setdefault(files[rows.key], []).append(name)
    for path, names in sorted(by_file.items()):
        with open_safetensors(path) as handle:
            for name in names:
                rows = pairs[name]
                try:
                    full_shape = tuple(handle.get_slice(rows.key).get_shape())
                except Exception as err:  # safetensors' own error for a name the file lacks
                    raise HFCheckpointError(f"{path} holds no {rows.key}, which {INDEX_FILE} places there ({err}): "
                                            "the index does not match its shards; download them again") from err
                if full_shape != tuple(rows.shape):
                    # A fused tensor's shape is set by the fields of all its parts.
                    parts = [n for n, r in pairs.items() if r.key == rows.key]
                    fields = dict.fromkeys(f for n in parts for f in spec.shape_fields(n).split(", "))
                    raise HFCheckpointError(f"{path}: {rows.key} has shape {full_shape}, but config.json's "
                                            f"{', '.join(fields)} give {tuple(rows.shape)} for {', '.join(parts)}: "
                                            "config.json contradicts the weights; correct those fields")
    return files, pairs


@torch.no_grad()
def load_hf_weights(model: nn.Module, ckpt_dir: str | Path, spec: ModelSpec) -> None:
    """Copy the base weights of ``ckpt_dir`` into ``model`` (plain tensors or FSDP2 shards), each
    rank reading only the rows it owns, converted to the model's dtype. Adapter tensors (cores,
    LoRA factors) are left alone: `reset_adapters` initialises them."""
    reader = BaseReader(model, ckpt_dir, spec)
    adapted = {f"{name}.weight": layer for name, layer in adapter_layers(model).items()}
    for name, param in reader.params.items():
        value = reader.rows(name)
        if name in adapted:  # stored as the layer says (quantized or not)
            adapted[name].load_weight(value, shard_group(param))
        else:
            local = param.to_local() if isinstance(param, DTensor) else param
            local.copy_(value.to(local.dtype))


class BaseReader:
    """Reads, for each base parameter of ``model``, the rows this rank holds of it from the HF
    checkpoint ``ckpt_dir`` (checked against the model first, `check_hf_weights`), as stored there."""

    def __init__(self, model: nn.Module, ckpt_dir: str | Path, spec: ModelSpec):
        self.params = base_parameters(model)
        self.files, self.pairs = check_hf_weights({name: p.shape for name, p in self.params.items()},
                                                  Path(ckpt_dir), spec)
        self.perms = spec.qk_permutations
        self.handles: dict[Path, object] = {}

    def rows(self, name: str) -> torch.Tensor:
        rows = self.pairs[name]
        hf_key, path = rows.key, self.files[rows.key]
        if path not in self.handles:
            self.handles[path] = open_safetensors(path)
        start, stop = _row_range(self.params[name])
        try:
            return _read_rows(self.handles[path], rows, start, stop, permutation_for(name, self.perms))
        except Exception as err:
            raise ValueError(f"cannot read {hf_key} from {path}: {err}") from err


def original_weights(model: nn.Module, ckpt_dir: str | Path, spec: ModelSpec):
    """Adapter layer name -> this rank's part of its weight as the HF checkpoint holds it (before
    any quantization), in the layer's dtype and the layout of the layer's parameter: what skeleton
    selection of a quantized base reads, one layer at a time."""
    reader = BaseReader(model, ckpt_dir, spec)
    layers = adapter_layers(model)

    def read(name: str) -> torch.Tensor:
        param, rows = layers[name].weight, reader.rows(f"{name}.weight").to(layers[name].dtype)
        if not isinstance(param, DTensor):
            return rows
        return DTensor.from_local(rows, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())

    return read


def shard_group(param: torch.Tensor):
    """The process group holding the other rows of a sharded parameter (None: not sharded)."""
    return param.device_mesh.get_group(_shard_mesh_dim(param)) if isinstance(param, DTensor) else None


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


def hf_to_dcp(hf_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict[str, HFRows]:
    """Write the base weights of an HF checkpoint as a ``torch.distributed.checkpoint`` directory
    keyed by torchtune parameter names (q/k rows in torchtune's layout, dtypes as in the files),
    plus config.json and the tokenizer files. Any number of ranks can then ``dcp.load`` their
    shards from it. One process; one tensor in memory at a time (read when DCP writes it).
    Returns ``{torchtune name: HFRows}`` (its HF tensor and rows)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.resolve() == hf_dir.resolve():
        raise ValueError(f"--out {out_dir} is the HF checkpoint itself; choose a new directory")
    spec = read_model_spec(hf_dir)
    files = weight_files(hf_dir)
    with torch.device("meta"):
        model = build_decoder(spec)
    params = base_parameters(model)
    pairs = match_keys({name: p.shape for name, p in params.items()}, files, spec, hf_dir)
    handles = {path: open_safetensors(path) for path in sorted(set(files.values()))}
    placeholders = {}
    for name, rows in pairs.items():
        sliced = handles[files[rows.key]].get_slice(rows.key)
        shape = tuple(sliced.get_shape())
        if shape != rows.shape:
            raise HFCheckpointError(f"{files[rows.key]}: {rows.key} has shape {shape}, config.json implies "
                                    f"{rows.shape}: config.json contradicts the weights")
        # Same shape and dtype as the converted tensor: DCP plans from these, reads come later.
        placeholders[name] = torch.empty(tuple(params[name].shape), dtype=_SAFETENSORS_DTYPES[sliced.get_dtype()],
                                         device="meta")
    perms = spec.qk_permutations

    def read(name: str) -> torch.Tensor:
        rows = pairs[name]
        return _read_rows(handles[files[rows.key]], rows, 0, placeholders[name].shape[0],
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

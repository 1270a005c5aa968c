"""Hugging Face checkpoint directories in: each rank reads only the rows of its own shards.

Tensors are memory-mapped through ``safetensors`` (never unpickled) and sliced before they are
copied, so a rank's peak memory is its shards plus one slice. Keys follow torchtune's HF map;
q/k rows are permuted between HF's half-split RoPE and torchtune's interleaved one.

The map is checked in both directions: every base parameter of the model must be found in the
checkpoint, and every tensor of the checkpoint must land in the model (a Llama saved with
``attention_bias`` would otherwise lose its biases without a word).
"""

from __future__ import annotations

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
from torchtune.models.convert_weights import _FROM_HF

from pmss_dist.adapters import adapter_layers, plain_name
from pmss_dist.builtin import BYTE_TOKENIZER_FILE
from pmss_dist.models import PERMUTED_QK_FAMILIES, build_model, head_dim, model_family

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# torchtune key (with "{}" for the layer) -> HF key. Built from torchtune's own map.
TUNE_TO_HF = {tune: hf for hf, tune in _FROM_HF.items() if tune is not None}
# Families whose attention projections carry biases (Qwen2's q/k/v).
_BIAS_KEYS = {"layers.{}.attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
              "layers.{}.attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
              "layers.{}.attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias"}
TUNE_TO_HF.update(_BIAS_KEYS)
# Checkpoint tensors that hold nothing the model needs (old Llama saves carry RoPE frequencies).
_DERIVED_HF_KEYS = {hf for hf, tune in _FROM_HF.items() if tune is None}
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


def _template(key: str) -> tuple[str, str | None]:
    """``layers.3.attn.q_proj.weight`` -> (``layers.{}.attn.q_proj.weight``, ``"3"``)."""
    layer = next((p for p in key.split(".") if p.isdigit()), None)
    return (key.replace(f".{layer}.", ".{}.", 1) if layer is not None else key), layer


def tune_key_to_hf(key: str) -> str:
    """``layers.3.attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    template, layer = _template(key)
    if template not in TUNE_TO_HF:
        raise KeyError(f"no Hugging Face name for parameter {key!r}: export would drop it")
    return TUNE_TO_HF[template].format(layer)


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


def qk_row_permutation(n_heads: int, hd: int) -> torch.Tensor:
    """``perm[t]`` is the HF row that becomes torchtune row ``t`` (interleaved RoPE pairs)."""
    return torch.arange(n_heads * hd).view(n_heads, 2, hd // 2).transpose(1, 2).reshape(-1)


def row_permutations(hf_config: dict) -> dict[str, torch.Tensor]:
    """``{"q_proj": perm, "k_proj": perm}`` for families whose q/k rows are permuted, else ``{}``."""
    if model_family(hf_config) not in PERMUTED_QK_FAMILIES:
        return {}
    hd = head_dim(hf_config)
    n_heads = hf_config["num_attention_heads"]
    n_kv = hf_config.get("num_key_value_heads", n_heads)
    return {"q_proj": qk_row_permutation(n_heads, hd), "k_proj": qk_row_permutation(n_kv, hd)}


def permutation_for(tune_key: str, perms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The row permutation of a q/k weight (``layers.0.attn.q_proj.weight``), else ``None``."""
    parts = tune_key.split(".")
    return perms.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "weight" else None


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


def tied_embeddings(hf_config: dict) -> bool:
    return bool(hf_config.get("tie_word_embeddings", model_family(hf_config) == "gemma"))


def match_keys(tune_names, files: dict[str, Path], hf_config: dict, ckpt_dir: Path) -> dict[str, str]:
    """``{torchtune name: HF key}`` for every base parameter; fails naming the first parameter
    the checkpoint lacks or the first checkpoint tensor the model has no place for."""
    pairs = {name: tune_key_to_hf(name) for name in tune_names}
    missing = [f"{hf} (for {name})" for name, hf in pairs.items() if hf not in files]
    if missing:
        raise KeyError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
                       f"e.g. {missing[:3]}: config.json does not describe these weights")
    used = set(pairs.values())
    unused = [k for k in files if k not in used and _template(k)[0] not in _DERIVED_HF_KEYS
              and not (k == "lm_head.weight" and tied_embeddings(hf_config))]
    if unused:
        where = files[unused[0]]
        raise ValueError(f"{where}: tensor(s) {unused[:3]} have no place in the {model_family(hf_config)} "
                         f"model that config.json describes (e.g. attention_bias/mlp_bias, which the "
                         f"torchtune builder lacks); refusing to drop them")
    return pairs


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
        model = build_model(hf_config)
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

"""A broken base checkpoint (model.path) stops the trainer with one line that names the file and
the fix, exit code 2 and no traceback: the readers raise `HFCheckpointError` naming the file,
and the entry point reports it. Each case starts from a tiny valid checkpoint, in one file or
in two shards with an index, broken the way a download, a copy or an edit breaks one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_direct
from pmss_dist.build import build_model
from pmss_dist.config import ConfigError
from pmss_dist.hf.load import INDEX_FILE, SINGLE_FILE, read_model_spec
from pmss_dist.models import HFCheckpointError
from pmss_dist.models.builtin import write_tiny_checkpoint

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The built-in tiny checkpoint as one file, and the same tensors in two shards with an index."""
    root = tmp_path_factory.mktemp("bases")
    single = write_tiny_checkpoint(root / "single")
    sharded = root / "sharded"
    shutil.copytree(single, sharded)
    (sharded / SINGLE_FILE).unlink()
    tensors = load_file(str(single / SINGLE_FILE))
    keys = sorted(tensors)
    weight_map = {key: SHARDS[key >= "model.layers.2"] for key in keys}  # norm.weight in the second shard
    for shard in SHARDS:
        save_file({k: tensors[k] for k in keys if weight_map[k] == shard}, str(sharded / shard),
                  metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"single": single, "sharded": sharded}


def _rewrite_header(path: Path, change) -> None:
    """``path`` with its safetensors header changed by ``change(header)``, the data left as it is."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])


def _tensors_in_order(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _past_the_end(header: dict) -> None:
    last = _tensors_in_order(header)[-1]
    header[last]["data_offsets"][1] += 1 << 20


def _overlapping(header: dict) -> None:
    first, second = _tensors_in_order(header)[:2]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    start = header[first]["data_offsets"][0]
    header[second]["data_offsets"] = [start, start + size]


def _absurd_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((1 << 60).to_bytes(8, "little") + data[8:])


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _without_norm(path: Path) -> None:
    tensors = load_file(str(path))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})


def _map(change):
    """The index with its weight_map changed by ``change(weight_map)``."""
    return lambda d: _edit_json(d / INDEX_FILE, lambda index: {**index, "weight_map": change(index["weight_map"])})


def _outside(d: Path) -> None:
    # A real file, one directory up: the index must not be able to read it.
    shutil.copyfile(d / SHARDS[1], d.parent / SHARDS[1])
    _map(lambda m: {k: f"../{v}" if v == SHARDS[1] else v for k, v in m.items()})(d)


def _config(**changes):
    return lambda d: _edit_json(d / "config.json", lambda c: {**c, **changes})


# case -> (which base, how it breaks, what the one line must say besides the file's name)
BREAKS = {
    "truncated": ("single", lambda d: (d / SINGLE_FILE).write_bytes((d / SINGLE_FILE).read_bytes()[:-4096]),
                  SINGLE_FILE, "truncated"),
    "offsets-past-the-end": ("single", lambda d: _rewrite_header(d / SINGLE_FILE, _past_the_end), SINGLE_FILE,
                             "download it again"),
    "offsets-overlap": ("single", lambda d: _rewrite_header(d / SINGLE_FILE, _overlapping), SINGLE_FILE,
                        "download it again"),
    "absurd-header-length": ("single", lambda d: _absurd_header_length(d / SINGLE_FILE), SINGLE_FILE,
                             "header too large"),
    "weight-map-a-list": ("sharded", _map(lambda m: sorted(m.items())), INDEX_FILE, "weight_map is a list"),
    "missing-shard": ("sharded", lambda d: (d / SHARDS[1]).unlink(), SHARDS[1],
                      f"is listed in {INDEX_FILE} but missing"),
    "shard-outside": ("sharded", _outside, INDEX_FILE, f"'../{SHARDS[1]}', not the name of a .safetensors file"),
    "tensor-in-the-wrong-shard": ("sharded", _map(lambda m: {**m, "model.norm.weight": SHARDS[0]}), SHARDS[0],
                                  f"holds no model.norm.weight, which {INDEX_FILE} places there"),
    "missing-tensor": ("single", lambda d: _without_norm(d / SINGLE_FILE), "", "lacks 1 tensor(s) the model needs, "
                       "e.g. ['model.norm.weight (for norm.scale)']"),
    "config-not-json": ("single", lambda d: (d / "config.json").write_text('{"architectures": ['), "config.json",
                        "is not valid JSON"),
    "config-a-list": ("single", lambda d: (d / "config.json").write_text("[]"), "config.json", "holds a JSON array"),
    "config-a-string": ("single", lambda d: (d / "config.json").write_text('"LlamaForCausalLM"'), "config.json",
                        "holds a JSON string"),
    "zero-heads": ("single", _config(num_attention_heads=0), "config.json",
                   "num_attention_heads=0 is not a positive integer"),
    "a-string-for-a-number": ("sharded", _config(hidden_size="128"), "config.json",
                              "hidden_size='128' is not a positive integer"),
    "negative-size": ("single", _config(intermediate_size=-344), "config.json",
                      "intermediate_size=-344 is not a positive integer"),
}


@pytest.mark.parametrize("base,breaks,file,says", BREAKS.values(), ids=BREAKS.keys())
def test_broken_base_stops_the_trainer_in_one_line(bases, tmp_path, base, breaks, file, says):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(bases[base], ckpt)
    breaks(ckpt)
    # The reader refuses it with our error, naming the file ...
    with pytest.raises(HFCheckpointError) as refusal:
        build_model(read_model_spec(ckpt), adapter=None, mesh=None, device=torch.device("cpu"), dtype=torch.float32, weights=ckpt)
    message = str(refusal.value)
    assert isinstance(refusal.value, ConfigError) and str(ckpt / file) in message and says in message, message
    # ... and the trainer reports it in one line, once, its last (safetensors may name another
    # tensor of the same broken header in another process).
    proc = run_direct([f"model.path={ckpt}", f"output_dir={tmp_path / 'run'}", "max_steps=1"], timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("config error: ") and lines.count(lines[-1]) == 1, proc.stderr[-3000:]
    assert str(ckpt / file) in lines[-1] and says in lines[-1], lines[-1]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_the_valid_bases_load(bases):
    """The cases above break these, which load: any refusal above is the break's."""
    for ckpt in bases.values():
        model = build_model(read_model_spec(ckpt), adapter=None, mesh=None, device=torch.device("cpu"),
                            dtype=torch.float32, weights=ckpt)
        assert torch.equal(model.norm.scale, load_file(str(bases["single"] / SINGLE_FILE))["model.norm.weight"])

"""Typed run configuration: a YAML file (safe loader) plus ``key=value`` overrides.

Every key is checked against the dataclasses below before any work starts; an unknown key, a
value of the wrong type or an impossible value stops the run with a message naming the key.
YAML that a config has no use for and that can hurt is refused at its line: aliases (``*name``:
an alias bomb expands to gigabytes), duplicate keys (YAML keeps the last one silently), nesting
deeper than `MAX_YAML_DEPTH`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pmss_dist.errors import ConfigError
from pmss_dist.adapters.layers import ADAPTER_KINDS, FULL, TARGET_ALIASES, AdapterSpec
from pmss_dist.adapters.quantize import QUANTIZE_FORMATS
from pmss_dist.data.quote import cut, quote

if typing.TYPE_CHECKING:  # the spec's module loads torchtune, which the config's readers need not
    from pmss_dist.models.spec import ModelSpec

DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "instruction", "chat", "qa", "preference")
BAD_ROW_MODES = ("error", "skip")
# Canonical row fields that data.columns may rename (chat: role/content inside each message).
DATA_FIELDS = ("instruction", "input", "output", "messages", "role", "content", "question", "answer", "prompt",
               "chosen", "rejected")
OBJECTIVES = ("sft", "dpo")
PREFERENCE_LOSSES = ("sigmoid", "ipo")
AC_MODES = ("none", "full", "selective")
SELECTION_METHODS = ("deim", "qdeim", "leverage", "norm", "random")
SVD_MODES = ("auto", "exact", "randomized")


# A config is three levels deep at most (data.columns.question); deeper YAML is a mistake or an
# attack, and composing it recursively would overflow Python's stack.
MAX_YAML_DEPTH = 32
# Keys that name a file or directory: an empty one would silently mean the current directory.
PATH_KEYS = ("output_dir", "model.path", "data.source", "data.eval_source", "adapter.selection_file",
             "checkpoint.resume")
INT_BOUNDS = (-(2**63), 2**63 - 1)  # ints travel as int64 (seeds, steps, sizes in tensors and torch calls)

# model.path of the built-in base: the trainer writes models.builtin.TINY_CONFIG into the run directory.
BUILTIN_TINY = "builtin:tiny"


@dataclass
class ModelConfig:
    path: str = BUILTIN_TINY  # an HF checkpoint directory, or builtin:tiny
    dtype: str = "bfloat16"  # frozen weights and compute; adapter weights are always fp32
    quantize: str = "none"  # none | nf4 | int8: how the adapted projections' frozen weights are stored


@dataclass
class AdapterConfig:
    kind: str = "pmss"  # pmss | lora | full (no adapter: every weight trains; rank, alpha, targets unused)
    targets: list[str] = field(default_factory=lambda: list(TARGET_ALIASES))
    rank: int = 16  # PMSS: k (skeleton size, core is k x k); LoRA: r
    alpha: float = 16.0  # update scale s = alpha / rank
    method: str = "deim"  # PMSS skeleton selection
    svd: str = "auto"  # exact | randomized | auto (by matrix size)
    selection_file: str | None = None  # reuse a saved selection (refused if made for another base)


@dataclass
class DataConfig:
    source: str = "builtin:arithmetic"
    num_samples: int = 4096  # size of the built-in task
    seq_len: int = 32
    batch_size: int = 32  # global batch, in sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward on one rank
    train_on_prompt: bool = False
    # Files (source: a .json/.jsonl/.parquet/.csv file or a directory of them): row format and
    # the file's column names for the canonical fields, e.g. {question: problem, answer: solution}.
    format: str = "auto"  # auto | instruction | chat | qa | preference
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None  # None: the format's default (docs/DATA.md)
    use_chat_template: bool = False  # render instruction/qa rows through the tokenizer's chat template
    on_bad_row: str = "error"  # error: stop at the first malformed row | skip: count, report, go on
    packed: bool = False  # pack short samples into seq_len rows with per-document attention
    eval_source: str | None = None  # held-out data for the eval loss (same formats as source)
    eval_every: int = 0  # optimizer steps between eval-loss passes; 0: never
    eval_batches: int = 0  # global batches (data.batch_size samples) per eval pass; 0: the whole eval set


@dataclass
class ObjectiveConfig:
    kind: str = "sft"  # sft: token cross-entropy | dpo: preference pairs against the base (adapter off)
    loss: str = "sigmoid"  # dpo: sigmoid (DPO) | ipo
    beta: float = 0.1  # dpo: the strength of the pull towards the reference
    label_smoothing: float = 0.0  # dpo, sigmoid: the assumed share of flipped pairs (conservative DPO)
    precompute_reference: bool = False  # dpo: score every pair under the reference once at start-up


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class ParallelConfig:
    compile: bool = False
    activation_checkpointing: str = "none"  # none | full | selective
    # auto: keep blocks gathered from forward to backward (one all-gather per block per step
    # instead of two) when the whole model fits in a quarter of a rank's memory; see parallelize.
    reshard_after_forward: bool | str = "auto"  # auto | true | false
    # The data-parallel mesh, dp_replicate x dp_shard = world size (parallel/mesh.py): dp_shard ranks
    # share one copy of the base, sharded (FSDP2); dp_replicate copies (HSDP across them).
    dp_shard: int | str = "auto"  # auto: a node's ranks, or the whole nodes the base needs; 1: replicated
    dp_replicate: int | str = "auto"  # auto: world size / dp_shard


@dataclass
class LogConfig:
    log_every: int = 10
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end (and when SIGTERM/SIGUSR1 asks to stop)
    keep_last: int = 2
    resume: str = "auto"  # auto (newest valid checkpoint in output_dir) | none | a checkpoint dir
    async_save: bool = False  # overlap writing with the next steps (pays off for large adapters)
    # A step whose loss exceeds this factor times the mean of the recent losses is divergence: the
    # run stops and the checkpoint before it is not published. 0: only non-finite losses count.
    divergence_factor: float = 10.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/tiny"
    max_steps: int = 200
    seed: int = 0
    export_merged: bool = True  # write <output_dir>/merged (HF layout, adapter folded in) at the end
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = _parse_yaml(path.read_text(encoding="utf-8"), str(path), in_file=True) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {quote(item)} is not key=value (e.g. max_steps=5, adapter.rank=8)")
        parsed = _parse_yaml(value, f"override {quote(item)}", in_file=False) if value.strip() else None
        _set_dotted(raw, key.strip(), parsed)
    cfg = _build(TrainConfig, raw, prefix="")
    validate(cfg)
    return cfg


def _parse_yaml(text: str, where: str, *, in_file: bool):
    """YAML through the safe loader; a syntax error, a tag that would build a Python object or YAML
    a config refuses (`_ConfigLoader`) is a ConfigError naming ``where`` (a file, or an override)
    and, ``in_file``, the line."""
    loader = _ConfigLoader(text, where, in_file)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if context is not None and in_file and getattr(err, "context", None) and context.line != mark.line:
            problem += f" ({err.context} started on line {context.line + 1})"
        hint = ("only plain YAML values are allowed (no !!python tags)"
                if isinstance(err, yaml.constructor.ConstructorError)
                else "fix the YAML syntax (quote values with special characters)")
        raise ConfigError(f"{loader.at(mark)}: {cut(problem)}; {hint}") from None
    finally:
        loader.dispose()


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, refusing at their line what a config has no use for: aliases, duplicate
    keys, nesting deeper than `MAX_YAML_DEPTH`, integers Python will not read (over 4300 digits)."""

    def __init__(self, text: str, where: str, in_file: bool):
        super().__init__(text)
        self.where, self.in_file, self.depth = where, in_file, 0

    def at(self, mark) -> str:
        """``where``, with the line of ``mark`` in a file (an override is one line)."""
        return f"{self.where}:{mark.line + 1}" if mark is not None and self.in_file else self.where

    def refuse(self, mark, problem: str, fix: str):
        raise ConfigError(f"{self.at(mark)}: {problem}; {fix}")

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):  # refused before it is expanded
            self.refuse(event.start_mark, f"YAML alias *{cut(event.anchor)}",
                        "a config takes no anchors or aliases: write the value out")
        if self.depth == MAX_YAML_DEPTH:
            self.refuse(event.start_mark, f"nested deeper than {MAX_YAML_DEPTH} levels",
                        "a config is at most three levels deep (data.columns.question)")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the safe loader refuses it below
                continue
            if duplicate:
                self.refuse(key_node.start_mark, f"duplicate key {quote(key)}", "keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python reads at most 4300 decimal digits
            self.refuse(node.start_mark, f"an integer of {len(node.value)} digits",
                        "integers must fit in 64 bits")


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def _set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {cut(key)}: {cut(p)} is not a section")
    tree[leaf] = value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {quote(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((key for key in raw if key not in names), key=str)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{cut(str(unknown[0]))}; valid keys here: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", kind, value)
    return cls(**kwargs)


def _coerce(key: str, kind, value):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds[:-1]:
            try:
                return _coerce(key, kind, value)
            except ConfigError:
                pass
        return _coerce(key, kinds[-1], value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {quote(value)}")
        return {_coerce(f"{key} (a key)", args[0], k): _coerce(f"{key}.{cut(str(k))}", args[1], v)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {quote(value)}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_BOUNDS[0] <= value <= INT_BOUNDS[1]:
                raise ConfigError(f"{key} must fit in 64 bits, got {quote(value)}")
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be {getattr(kind, '__name__', kind)}, got {quote(value)}")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={quote(value)} is not one of {list(choices)}")


def _check_float(key: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """``value`` is a finite number in the range from ``low`` to ``high`` (open or closed ends)."""
    ok = (math.isfinite(value) and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ConfigError(f"{key} must be a finite number in {lo}{low}, {high}{hi}, got {value}")


def validate(cfg: TrainConfig) -> None:
    """Checks that need no model and no process group (those follow at start-up)."""
    for key in PATH_KEYS:
        _check_path(key, _value(cfg, key))
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("model.quantize", cfg.model.quantize, QUANTIZE_FORMATS)
    if cfg.model.quantize != "none" and cfg.adapter.kind == FULL:
        raise ConfigError(f"model.quantize={cfg.model.quantize} needs a frozen base, but adapter.kind=full trains "
                          "every weight: use adapter.kind pmss or lora, or model.quantize=none")
    _choice("adapter.kind", cfg.adapter.kind, ADAPTER_KINDS)
    _choice("adapter.method", cfg.adapter.method, SELECTION_METHODS)
    _choice("adapter.svd", cfg.adapter.svd, SVD_MODES)
    _choice("parallel.activation_checkpointing", cfg.parallel.activation_checkpointing, AC_MODES)
    if isinstance(cfg.parallel.reshard_after_forward, str):
        _choice("parallel.reshard_after_forward", cfg.parallel.reshard_after_forward, ("auto", True, False))
    for key in ("dp_shard", "dp_replicate"):
        value = getattr(cfg.parallel, key)
        if isinstance(value, str):
            _choice(f"parallel.{key}", value, ("auto",))
        elif value < 1:
            raise ConfigError(f"parallel.{key} must be >= 1 or auto, got {value}")
    for t in cfg.adapter.targets:
        _choice("adapter.targets", t, TARGET_ALIASES)
    positive = {"max_steps": cfg.max_steps, "adapter.rank": cfg.adapter.rank, "data.seq_len": cfg.data.seq_len,
                "data.batch_size": cfg.data.batch_size, "data.micro_batch_size": cfg.data.micro_batch_size,
                "data.num_samples": cfg.data.num_samples, "log.log_every": cfg.log.log_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1, got "
                          f"{cfg.checkpoint.every_steps} and {cfg.checkpoint.keep_last}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")
    _check_float("optim.lr", cfg.optim.lr, 0, low_open=True)
    _check_float("adapter.alpha", cfg.adapter.alpha, 0, low_open=True)
    _check_float("optim.weight_decay", cfg.optim.weight_decay, 0)
    _check_float("optim.eps", cfg.optim.eps, 0, low_open=True)
    for i, beta in enumerate(cfg.optim.betas):
        _check_float(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
    _check_float("optim.min_lr_ratio", cfg.optim.min_lr_ratio, 0, 1)
    _check_float("optim.grad_clip", cfg.optim.grad_clip, 0)
    _check_float("checkpoint.divergence_factor", cfg.checkpoint.divergence_factor, 0)
    if cfg.checkpoint.divergence_factor and cfg.checkpoint.divergence_factor <= 1:
        raise ConfigError(f"checkpoint.divergence_factor must be 0 (off) or above 1, got "
                          f"{cfg.checkpoint.divergence_factor}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")
    _choice("data.format", cfg.data.format, DATA_FORMATS)
    _choice("data.on_bad_row", cfg.data.on_bad_row, BAD_ROW_MODES)
    for name in cfg.data.columns:
        _choice("data.columns", name, DATA_FIELDS)
    if cfg.data.eval_every < 0 or cfg.data.eval_batches < 0:
        raise ConfigError("data.eval_every and data.eval_batches must be >= 0, got "
                          f"{cfg.data.eval_every} and {cfg.data.eval_batches}")
    if cfg.data.eval_every and not cfg.data.eval_source:
        raise ConfigError(f"data.eval_every={cfg.data.eval_every} needs data.eval_source (a held-out file, "
                          "or builtin:arithmetic)")
    if cfg.data.batch_size % cfg.data.micro_batch_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                          f"data.micro_batch_size={cfg.data.micro_batch_size}")
    validate_objective(cfg)


def validate_objective(cfg: TrainConfig) -> None:
    """``objective``, and what it asks of the adapter and the data."""
    o = cfg.objective
    _choice("objective.kind", o.kind, OBJECTIVES)
    _choice("objective.loss", o.loss, PREFERENCE_LOSSES)
    _check_float("objective.beta", o.beta, 0, low_open=True)
    _check_float("objective.label_smoothing", o.label_smoothing, 0, 0.5, high_open=True)
    if o.kind == "sft":
        if o.precompute_reference:
            raise ConfigError("objective.precompute_reference applies to objective.kind=dpo only: leave it out")
        if cfg.data.format == "preference":
            raise ConfigError("data.format=preference holds preference pairs, which objective.kind=sft does not "
                              "train on: set objective.kind=dpo, or a supervised format")
        return
    if o.label_smoothing and o.loss != "sigmoid":
        raise ConfigError(f"objective.label_smoothing={o.label_smoothing:g} applies to objective.loss=sigmoid only; "
                          f"leave it at 0 for objective.loss={o.loss}")
    if cfg.adapter.kind == FULL:
        raise ConfigError("objective.kind=dpo takes the base with the adapter switched off as its reference model, "
                          "and adapter.kind=full has no frozen base to switch back to: use adapter.kind pmss or lora")
    if cfg.data.format not in ("auto", "preference"):
        raise ConfigError(f"objective.kind=dpo trains on preference pairs, not data.format={cfg.data.format}: "
                          "use data.format=preference (or auto)")
    for key in ("data.packed", "data.train_on_prompt", "data.prompt_template"):
        if _value(cfg, key):
            raise ConfigError(f"{key} does not apply to objective.kind=dpo (a pair is its prompt and two responses, "
                              "each scored on its response in a row of its own): leave it out")


def _value(cfg: TrainConfig, key: str):
    """The value of a dotted key."""
    return functools.reduce(getattr, key.split("."), cfg)


def _check_path(key: str, value: str | None) -> None:
    if value is None:  # an optional path, not given
        return
    if not value.strip():
        raise ConfigError(f"{key} is empty; give a path (or leave the key out for its default)")
    if "\0" in value:
        raise ConfigError(f"{key} holds a NUL character, which no path can; fix the value")


def check_seq_len(cfg: TrainConfig, model_spec: ModelSpec) -> None:
    """``data.seq_len`` within the model's context (config.json's ``max_position_embeddings``; a
    config.json without it sets no limit): the RoPE caches and every batch are ``seq_len`` long,
    and the model never saw positions past its context. Called where config.json is read."""
    limit = model_spec.max_seq_len
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context "
                          f"(max_position_embeddings={limit} in its config.json); lower data.seq_len "
                          f"to at most {limit}")


def check_world_size(cfg: TrainConfig, world_size: int) -> int:
    """Gradient-accumulation steps for this world size, or a ConfigError naming the keys."""
    per_step = cfg.data.micro_batch_size * world_size
    if cfg.data.batch_size % per_step:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by data.micro_batch_size "
                          f"({cfg.data.micro_batch_size}) x world size ({world_size}); change one of them")
    return cfg.data.batch_size // per_step


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """A resolved config (``to_dict``, or a ``config.json``) as ``{dotted key: value}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "columns":  # data.columns is a value, not a section
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# What a run *is*: the settings that decide which model is trained on which data in which order.
# A resume that changes one of them would continue another run's state, so it is refused
# (train.checkpoint); every other key (max_steps, optim.*, eval, logging, checkpointing,
# parallelism, the world size) may change on resume and takes effect from the resumed step.
RUN_IDENTITY_KEYS = ("seed", "model.dtype", "model.quantize", "adapter.kind", "adapter.rank", "adapter.alpha", "adapter.targets",
                     "adapter.method", "data.source", "data.num_samples", "data.seq_len", "data.batch_size",
                     "data.train_on_prompt", "data.format", "data.columns", "data.prompt_template",
                     "data.use_chat_template", "data.packed", "objective.kind", "objective.loss")
# What an identity key was before it existed (a record that lacks it was written with this value).
IDENTITY_DEFAULTS = {"model.quantize": "none", "objective.kind": "sft"}


def adapter_spec(cfg: TrainConfig) -> AdapterSpec:
    """The adapters a config asks for, with the frozen base's storage format (``model.quantize``)."""
    a = cfg.adapter
    return AdapterSpec(a.kind, tuple(a.targets), a.rank, a.alpha, cfg.model.quantize)


def run_identity(config: dict) -> dict[str, object]:
    """The `RUN_IDENTITY_KEYS` of a resolved config that matter for its adapter kind and data
    source (``adapter.rank`` means nothing to full fine-tuning, ``data.num_samples`` only to the
    built-in task), as JSON values. Keys a config lacks are left out."""
    flat = flat_config(config)
    unused = set()
    if flat.get("adapter.kind") == "full":
        unused |= {"adapter.rank", "adapter.alpha", "adapter.targets", "adapter.method"}
    elif flat.get("adapter.kind") == "lora":
        unused.add("adapter.method")
    if not str(flat.get("data.source", "")).startswith("builtin:"):
        unused.add("data.num_samples")
    if flat.get("objective.kind", "sft") == "sft":
        unused.add("objective.loss")
    return {key: _json_value(flat[key]) for key in RUN_IDENTITY_KEYS if key in flat and key not in unused}


def _json_value(value):
    """Tuples as lists: values compare as they will after a round trip through JSON."""
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value

"""`ModelSpec`: a Hugging Face ``config.json`` read once, checked once, resolved into typed facts.

Every field a family reads is read here, with transformers' defaults, so that no caller looks a
fact up in the dict again: sizes, heads and head_dim, RoPE (base, rotated features, a scaling of
one of the typed kinds below), norm eps, each layer's sliding window, Gemma 2's soft caps, tying
and the q/k row permutations between HF's RoPE layout and torchtune's. A config.json that is
not an object of well-formed fields fails here with an `HFCheckpointError` naming the field; a
family's ``build`` refuses what its builder does not implement (a RoPE scaling type, a head_dim
it derives), which a spec may state: the GGUF converters carry those models through.

The raw dict stays on the spec (``config``) only for what is written back as config.json states
it: the fields GGUF metadata copies key by key. HF export copies config.json's bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import torch

from pmss_dist.errors import HFCheckpointError


@dataclass(frozen=True)
class RoPEScaling:
    """A RoPE scaling config.json names that nothing here computes (yarn, dynamic, ...): kept by
    its type, ``rope_type`` (or older files' ``type``), which builders and GGUF export refuse by name."""

    kind: str


@dataclass(frozen=True)
class LinearScaling(RoPEScaling):
    """Positions divided by ``factor`` (GGUF carries it; no builder here implements it)."""

    factor: float


@dataclass(frozen=True)
class Llama3Scaling(RoPEScaling):
    """Llama 3.1's frequency-dependent scaling, with its four parameters."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int


@dataclass(frozen=True)
class LongRoPEScaling(RoPEScaling):
    """Phi-3's LongRoPE (``longrope``, older files ``su``): one divisor per rotary frequency for
    sequences within ``original_max_seq_len`` (short) and past it (long), cos/sin scaled by
    ``attention_factor``."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float
    original_max_seq_len: int


@dataclass(frozen=True)
class RoPE:
    theta: float
    rotary_dim: int  # the features of a head that rotate: head_dim, fewer with partial_rotary_factor
    scaling: RoPEScaling | None  # None: plain RoPE


@dataclass(frozen=True)
class ModelSpec:
    """The decoder a config.json describes; `from_hf_config` is the one reader of the dict."""

    family: ModuleType  # its entry of `pmss_dist.models.FAMILIES`
    vocab_size: int
    dim: int
    hidden_dim: int  # the MLP's
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_derived: bool  # config.json gives none: hidden_size / num_attention_heads
    norm_eps: float
    rope: RoPE
    max_seq_len: int | None  # max_position_embeddings; None: config.json sets no limit
    tied: bool  # the output shares the embedding matrix
    windows: tuple[int | None, ...]  # each layer's sliding window; None: full attention
    attn_softcap: float | None = None  # Gemma 2: cap · tanh(scores / cap); None: no cap
    final_softcap: float | None = None  # Gemma 2, on the logits
    query_pre_attn_scalar: float | None = None  # Gemma 2: queries scaled by its -1/2 power
    config: dict = field(default_factory=dict, repr=False, compare=False)  # as read, see the module's doc

    @classmethod
    def from_hf_config(cls, c: dict, family: ModuleType, where: str = "config.json") -> ModelSpec:
        """The spec of ``c`` (a config.json object, read from ``where``) for ``family``, after
        refusing missing or malformed shared fields (`check_shared_fields`) and what the family's
        ``read_fields`` refuses."""
        check_shared_fields(c, where)
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        eps = c.get("rms_norm_eps")
        own = {"windows": (None,) * c["num_hidden_layers"],  # full attention unless the family reads windows
               **(family.read_fields(c, c["num_hidden_layers"]) if hasattr(family, "read_fields") else {})}
        return cls(family=family, vocab_size=c["vocab_size"], dim=c["hidden_size"], hidden_dim=c["intermediate_size"],
                   num_layers=c["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim,
                   head_dim_derived=not c.get("head_dim"), norm_eps=1e-5 if eps is None else eps,
                   rope=_read_rope(c, head_dim), max_seq_len=c.get("max_position_embeddings"),
                   tied=bool(c.get("tie_word_embeddings", getattr(family, "TIED_BY_DEFAULT", False))),
                   **own, config=c)

    def torchtune_args(self, max_seq_len: int) -> dict:
        """The arguments every torchtune decoder builder takes, for ``max_seq_len`` positions."""
        return dict(vocab_size=self.vocab_size, num_layers=self.num_layers, num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, embed_dim=self.dim, max_seq_len=max_seq_len,
                    intermediate_dim=self.hidden_dim, norm_eps=self.norm_eps, rope_base=self.rope.theta)

    @property
    def qk_permutations(self) -> dict[str, torch.Tensor]:
        """``{"q_proj": perm, "k_proj": perm}`` (torchtune row ``t`` is HF row ``perm[t]``) for
        families whose torchtune RoPE rotates interleaved pairs where HF rotates halves; else ``{}``."""
        if not self.family.PERMUTED_QK:
            return {}
        return {"q_proj": qk_row_permutation(self.num_heads, self.head_dim),
                "k_proj": qk_row_permutation(self.num_kv_heads, self.head_dim)}

    def shape_fields(self, tune_name: str) -> str:
        """``"num_key_value_heads=2, head_dim=8, hidden_size=32"``: the config.json fields, with the
        values the model was built from, that set the shape of parameter ``tune_name``."""
        parts = tune_name.split(".")
        module = parts[-2] if len(parts) >= 2 else parts[0]
        derived = f" (hidden_size/num_attention_heads = {self.dim}/{self.num_heads})" if self.head_dim_derived else ""
        values = {attr: getattr(self, attr) for attr in _CONFIG_KEYS}
        values["head_dim"] = f"{self.head_dim}{derived}"
        return ", ".join(f"{_CONFIG_KEYS[attr]}={values[attr]}" for attr in _SHAPE_FIELDS.get(module, ("dim",)))


def qk_row_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """``perm[t]`` is the HF row that becomes torchtune row ``t`` (interleaved RoPE pairs)."""
    return torch.arange(n_heads * head_dim).view(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


# The config.json field that sets each size of the spec.
_CONFIG_KEYS = {"vocab_size": "vocab_size", "dim": "hidden_size", "hidden_dim": "intermediate_size",
                "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}
# The sizes that set a parameter's shape, by the parameter's module (its name's last part before
# weight/bias/scale); anything else (the norms) is hidden_size wide.
_SHAPE_FIELDS = {
    "tok_embeddings": ("vocab_size", "dim"), "output": ("vocab_size", "dim"),
    "q_proj": ("num_heads", "head_dim", "dim"), "output_proj": ("num_heads", "head_dim", "dim"),
    "k_proj": ("num_kv_heads", "head_dim", "dim"), "v_proj": ("num_kv_heads", "head_dim", "dim"),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "w1": ("hidden_dim", "dim"), "w2": ("hidden_dim", "dim"), "w3": ("hidden_dim", "dim"),
}

# The shared fields, by what each must be; the sizes and head counts of the first group are required.
_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_OBJECTS = ("rope_scaling", "rope_parameters")


def check_shared_fields(c: dict, where: str = "config.json") -> None:
    """Refuse a config.json (read from ``where``) whose shared fields are missing or not what they
    must be: sizes and head counts positive integers, the norm eps and RoPE base positive numbers,
    the heads a whole number of KV groups and, when head_dim is derived, hidden_size a whole number
    of heads. torch would otherwise fail deep in the build, or build a model with no weights to match."""
    fix = "set it to the model's own value"
    for name in _COUNTS:
        if name not in c:
            raise HFCheckpointError(f"{where} has no {name}: {fix}")
    for name in (*_COUNTS, *_OPTIONAL_COUNTS):
        value = c.get(name)
        if (value is not None or name in _COUNTS) and not _is_count(value):
            raise HFCheckpointError(f"{where}: {name}={value!r} is not a positive integer: {fix}")
    for name in _OPTIONAL_OBJECTS:
        if c.get(name) is not None and not isinstance(c[name], dict):
            raise HFCheckpointError(f"{where}: {name}={c[name]!r} is not an object: {fix}")
    theta_field = "rope_theta" if "rope_theta" in c else "rope_parameters.rope_theta"
    for name, value in (("rms_norm_eps", c.get("rms_norm_eps")), (theta_field, _stated_theta(c))):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise HFCheckpointError(f"{where}: {name}={value!r} is not a positive number: {fix}")
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if heads % kv_heads:
        raise HFCheckpointError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
                                f"{kv_heads}: set them to the model's own values")
    if not c.get("head_dim") and c["hidden_size"] % heads:
        raise HFCheckpointError(f"{where}: hidden_size={c['hidden_size']} is not a multiple of num_attention_heads="
                                f"{heads}, and there is no head_dim: set them to the model's own values")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _stated_theta(c: dict):
    """config.json's RoPE base as written: top-level ``rope_theta`` (transformers < 5) or
    ``rope_parameters.rope_theta`` (5.x); None when it gives none."""
    return c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta"))


def _read_rope(c: dict, head_dim: int) -> RoPE:
    theta = _stated_theta(c)
    partial = (c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    return RoPE(theta=10000.0 if theta is None else float(theta), rotary_dim=int(head_dim * float(partial)),
                scaling=_read_scaling(c))


# The fields of a llama3 scaling that transformers requires (it has no default for them).
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor")


def _read_scaling(c: dict) -> RoPEScaling | None:
    """The RoPE scaling config.json asks for. transformers < 5 writes ``rope_scaling`` (type under
    ``type`` or ``rope_type``) at the top level; 5.x nests it in ``rope_parameters`` (``rope_type``
    "default" meaning no scaling). Where transformers reads a pre-training length, a top-level
    ``original_max_position_embeddings`` wins, then the scaling's, then max_position_embeddings."""
    scaling = c.get("rope_scaling") or c.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        if scaling.get("factor") is None:
            raise HFCheckpointError("config.json: rope_scaling of type 'linear' lacks ['factor']")
        return LinearScaling(kind, float(scaling["factor"]))
    if kind not in ("llama3", "longrope", "su"):
        return RoPEScaling(kind)
    needed = _LLAMA3_FIELDS if kind == "llama3" else ("short_factor", "long_factor")
    missing = [k for k in needed if scaling.get(k) in (None, [])]
    if missing:
        raise HFCheckpointError(f"config.json: rope_scaling of type {kind!r} lacks {missing}"
                                + ("; copy them from the model's original config.json" if kind == "llama3" else ""))
    original = (c.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                or c.get("max_position_embeddings"))
    if original is None:
        raise HFCheckpointError(f"config.json: rope_scaling of type {kind!r} needs the pre-training length: "
                                "set original_max_position_embeddings as in the model's original config.json")
    if kind == "llama3":
        return Llama3Scaling(kind, *(float(scaling[k]) for k in _LLAMA3_FIELDS), original_max_seq_len=original)
    # The attention factor defaults to sqrt(1 + ln(factor) / ln(original)), ``factor`` the context
    # extension max_position_embeddings / original.
    factor = scaling.get("factor") or (c.get("max_position_embeddings") or original) / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return LongRoPEScaling(kind, tuple(scaling["short_factor"]), tuple(scaling["long_factor"]), float(attention),
                           int(original))


def check_head_dim_derived(spec: ModelSpec, builder: str) -> None:
    """Refuse an explicit ``head_dim`` other than hidden_size / num_attention_heads, for torchtune
    builders that derive it (llama3, mistral): their model would not be the checkpoint's."""
    if spec.head_dim != spec.dim // spec.num_heads:
        raise HFCheckpointError(f"config.json: head_dim={spec.head_dim} differs from hidden_size/num_attention_heads "
                                f"({spec.dim}/{spec.num_heads}), which torchtune's {builder} builder assumes for "
                                f"{spec.family.ARCHITECTURE}; such checkpoints (e.g. Mistral-Nemo) are not supported")

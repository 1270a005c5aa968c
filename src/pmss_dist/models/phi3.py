"""Phi-3 and Phi-4 (``Phi3ForCausalLM``: one HF class, different sizes): fused q/k/v and gate/up
weights in the HF files, RoPE on halves, tied or untied output, the sliding window config.json
sets on every layer (Phi-3-mini-4k: 2047); LongRoPE scaling (Phi-3-128k, Phi-3.5, Phi-4-mini) and
partial rotary (Phi-4-mini) as transformers computes them."""

from __future__ import annotations

import torch
from torch import nn
from torchtune.models.phi3 import phi3
from torchtune.modules import TiedLinear

from pmss_dist.errors import HFCheckpointError
from pmss_dist.models.sliding_window import add_sliding_windows, layer_windows
from pmss_dist.models.spec import ModelSpec, check_head_dim_derived

ARCHITECTURE = "Phi3ForCausalLM"
MODEL_TYPE = "phi3"
GGUF_ARCH = "phi3"
# torchtune's Phi3 RoPE rotates halves, as HF does: no permutation.
PERMUTED_QK = False
# "su" is the name older Phi-3 configs give LongRoPE (transformers reads it as "longrope").
ROPE_SCALING = ("longrope", "su")
# HF stores q, k, v stacked by rows in qkv_proj and gate, up in gate_up_proj; torchtune (and so
# PMSS, which selects a skeleton per projection) has one module each.
FUSED = {
    "model.layers.{}.self_attn.qkv_proj.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight",
                                                  "layers.{}.attn.v_proj.weight"),
    "model.layers.{}.mlp.gate_up_proj.weight": ("layers.{}.mlp.w1.weight", "layers.{}.mlp.w3.weight"),
}


def read_fields(c: dict, num_layers: int) -> dict:
    # transformers' Phi3Config has no window unless config.json sets one, then on every layer.
    return {"windows": layer_windows(c, c.get("sliding_window"), [True] * num_layers)}


def build(spec: ModelSpec, max_seq_len: int):
    check_head_dim_derived(spec, "phi3")
    model = phi3(**spec.torchtune_args(max_seq_len))
    rope, scaling = spec.rope, spec.rope.scaling  # a LongRoPEScaling, or None
    if scaling is not None or rope.rotary_dim != spec.head_dim:
        # One module shared by every layer, as torchtune's builder shares its own.
        longrope = {} if scaling is None else dict(
            short_factor=scaling.short_factor, long_factor=scaling.long_factor,
            attention_factor=scaling.attention_factor, original_max_seq_len=scaling.original_max_seq_len)
        shared = Phi3RoPE(rope.rotary_dim, max_seq_len, rope.theta, **longrope)
        for layer in model.layers:
            layer.attn.pos_embeddings = shared
    add_sliding_windows(model, spec.windows)
    if spec.tied:
        del model.output  # a registered nn.Linear; TiedLinear is a plain callable
        model.output = TiedLinear(model.tok_embeddings)
    return model


class Phi3RoPE(nn.Module):
    """HF Phi-3's rotary embedding where torchtune's lacks it: only the first ``rotary_dim`` features
    of each head rotate (halves of them; the rest pass through), and with LongRoPE each frequency is
    divided by its short or long factor and cos/sin are scaled by ``attention_factor``. As in
    transformers, the long factors apply to a whole forward once a position in it reaches
    ``original_max_seq_len``."""

    def __init__(self, rotary_dim: int, max_seq_len: int, base: float,
                 short_factor=None, long_factor=None, attention_factor: float = 1.0,
                 original_max_seq_len: int | None = None):
        super().__init__()
        n = rotary_dim // 2
        for name, factors in (("short_factor", short_factor), ("long_factor", long_factor)):
            if factors is not None and len(factors) != n:
                raise HFCheckpointError(f"config.json: rope_scaling {name} has {len(factors)} entries, the rotary "
                                        f"dimension {rotary_dim} needs {n}")
        self.rotary_dim, self.max_seq_len, self.base = rotary_dim, max_seq_len, base
        self.short_factor, self.long_factor = short_factor or (1.0,) * n, long_factor
        self.attention_factor, self.original_max_seq_len = attention_factor, original_max_seq_len
        self.rope_init()

    def _cache(self, factors) -> torch.Tensor:
        # transformers' arithmetic, in fp32: inv_freq = 1 / (factor · base^(2i/d)), angle = pos · inv_freq.
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * self.base ** exponent)
        angles = torch.arange(self.max_seq_len).float()[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return torch.cat([angles.cos(), angles.sin()], dim=-1) * self.attention_factor

    def rope_init(self) -> None:
        # Non-persistent buffers, computed again on the device after a meta build (init_rope_caches).
        self.register_buffer("cache", self._cache(self.short_factor), persistent=False)
        if self.long_factor is not None:
            self.register_buffer("long_cache", self._cache(self.long_factor), persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = x.size(1)
        if input_pos is None:
            longer = self.long_factor is not None and seq_len > self.original_max_seq_len
            cache = (self.long_cache if longer else self.cache)[:seq_len]
        else:
            cache = self.cache[input_pos]
            if self.long_factor is not None:  # decided from the positions' values, inside the graph
                cache = torch.where(input_pos.max() + 1 > self.original_max_seq_len, self.long_cache[input_pos], cache)
        cache = cache.view(-1, seq_len, 1, 2 * self.rotary_dim)
        cos, sin = cache[..., :self.rotary_dim], cache[..., self.rotary_dim:]
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1).type_as(x)

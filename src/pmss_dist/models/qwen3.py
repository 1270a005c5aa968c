"""Qwen3 dense (``Qwen3ForCausalLM``): RMSNorm on each q and k head *before* RoPE, explicit
head_dim (16 heads x 128 = 2048 on a 1024-wide Qwen3-0.6B), no q/k/v bias, tied or untied output.

torchtune 0.6.1 has no Qwen3 builder, so the decoder is composed here from its modules. Its
``MultiHeadAttention`` takes ``q_norm``/``k_norm`` but applies them *after* RoPE. The two orders
differ: RoPE rotates pairs of features (i, i + head_dim/2), which leaves the RMS of a head
unchanged but mixes features that the norm's per-feature weight scales differently.
`Qwen3Attention` keeps MultiHeadAttention's modules and names (adapters find ``q_proj`` ...
``output_proj``) and reorders the forward. Sliding windows (off in released Qwen3) follow
``use_sliding_window``/``max_window_layers``/``layer_types`` as for Qwen2.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.models.qwen2._component_builders import qwen2_mlp
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import (MultiHeadAttention, RMSNorm, TiedLinear, TransformerDecoder,
                               TransformerSelfAttentionLayer)

from pmss_dist.errors import HFCheckpointError
from pmss_dist.models import qwen2
from pmss_dist.models.sliding_window import add_sliding_windows
from pmss_dist.models.spec import ModelSpec

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"
GGUF_ARCH = "qwen3"
# Qwen2's RoPE in torchtune rotates halves, as HF does: no permutation, and the q/k norm weights
# keep HF's feature order too.
PERMUTED_QK = False
# Beyond the common map: the per-head q/k norms.
HF_KEYS = {f"layers.{{}}.attn.{p}_norm.scale": f"model.layers.{{}}.self_attn.{p}_norm.weight" for p in "qk"}


class Qwen3Attention(MultiHeadAttention):
    """`MultiHeadAttention` with q/k RMSNorm per head applied before RoPE, as Qwen3 does."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask=None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        b, s_x, _ = x.shape
        q = self.pos_embeddings(self.q_norm(self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)),
                                input_pos=input_pos).transpose(1, 2)
        if y is None:  # decoding from the cache alone, as MultiHeadAttention allows
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        else:
            s_y = y.shape[1]
            k = self.pos_embeddings(self.k_norm(self.k_proj(y).view(b, s_y, -1, self.head_dim)),
                                    input_pos=input_pos).transpose(1, 2)
            v = self.v_proj(y).view(b, s_y, -1, self.head_dim).transpose(1, 2)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)
        if self.num_heads != self.num_kv_heads:
            expand = (b, self.num_kv_heads, self.num_heads // self.num_kv_heads, -1, self.head_dim)
            k = k.unsqueeze(2).expand(expand).flatten(1, 2)
            v = v.unsqueeze(2).expand(expand).flatten(1, 2)
        out = self._attention_call(q, k, v, mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                                   is_causal=self.kv_cache is None and mask is None and self.is_causal)
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))


def read_fields(c: dict, num_layers: int) -> dict:
    """Qwen2's windows, after refusing what this builder does not model, naming the config.json field."""
    arch = ARCHITECTURE
    if c.get("attention_bias"):
        raise HFCheckpointError(f"config.json sets attention_bias: true; pmss_dist builds {arch} without q/k/v/o "
                                "biases (released Qwen3 models have none): use a checkpoint without them")
    if c.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"config.json sets hidden_act: {c['hidden_act']!r}; pmss_dist builds {arch} "
                                "with the SiLU of the released models: set hidden_act: silu")
    return qwen2.read_fields(c, num_layers)


def build(spec: ModelSpec, max_seq_len: int) -> TransformerDecoder:
    hd, dim, heads, kv_heads, eps = spec.head_dim, spec.dim, spec.num_heads, spec.num_kv_heads, spec.norm_eps
    rope = Qwen2RotaryPositionalEmbeddings(dim=hd, max_seq_len=max_seq_len, base=spec.rope.theta)
    layers = nn.ModuleList()
    for _ in range(spec.num_layers):
        attn = Qwen3Attention(
            embed_dim=dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
            q_proj=nn.Linear(dim, heads * hd, bias=False),
            k_proj=nn.Linear(dim, kv_heads * hd, bias=False),
            v_proj=nn.Linear(dim, kv_heads * hd, bias=False),
            output_proj=nn.Linear(heads * hd, dim, bias=False),
            pos_embeddings=rope, q_norm=RMSNorm(hd, eps=eps), k_norm=RMSNorm(hd, eps=eps),
            max_seq_len=max_seq_len)
        layers.append(TransformerSelfAttentionLayer(
            attn=attn, mlp=qwen2_mlp(dim=dim, hidden_dim=spec.hidden_dim),
            sa_norm=RMSNorm(dim, eps=eps), mlp_norm=RMSNorm(dim, eps=eps)))
    tok_embeddings = nn.Embedding(spec.vocab_size, dim)
    output = TiedLinear(tok_embeddings) if spec.tied else nn.Linear(dim, spec.vocab_size, bias=False)
    model = TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers, max_seq_len=max_seq_len,
                               num_heads=heads, head_dim=hd, norm=RMSNorm(dim, eps=eps), output=output)
    add_sliding_windows(model, spec.windows)
    return model

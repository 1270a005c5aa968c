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

ARCHITECTURE = "Qwen3ForCausalLM"
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


def check(hf_config: dict) -> None:
    """Refuse what this builder does not model, naming the config.json field."""
    arch = ARCHITECTURE
    if hf_config.get("attention_bias"):
        raise HFCheckpointError(f"config.json sets attention_bias: true; pmss_dist builds {arch} without q/k/v/o "
                                "biases (released Qwen3 models have none): use a checkpoint without them")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"config.json sets hidden_act: {hf_config['hidden_act']!r}; pmss_dist builds {arch} "
                                "with the SiLU of the released models: set hidden_act: silu")


def build(hf_config: dict, *, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
          embed_dim: int, max_seq_len: int, intermediate_dim: int, norm_eps: float,
          rope_base: float) -> TransformerDecoder:
    from pmss_dist.models import head_dim as config_head_dim

    check(hf_config)
    hd = config_head_dim(hf_config)
    rope = Qwen2RotaryPositionalEmbeddings(dim=hd, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = Qwen3Attention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hd,
            q_proj=nn.Linear(embed_dim, num_heads * hd, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * hd, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * hd, bias=False),
            output_proj=nn.Linear(num_heads * hd, embed_dim, bias=False),
            pos_embeddings=rope, q_norm=RMSNorm(hd, eps=norm_eps), k_norm=RMSNorm(hd, eps=norm_eps),
            max_seq_len=max_seq_len)
        layers.append(TransformerSelfAttentionLayer(
            attn=attn, mlp=qwen2_mlp(dim=embed_dim, hidden_dim=intermediate_dim),
            sa_norm=RMSNorm(embed_dim, eps=norm_eps), mlp_norm=RMSNorm(embed_dim, eps=norm_eps)))
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    tied = hf_config.get("tie_word_embeddings", False)
    output = TiedLinear(tok_embeddings) if tied else nn.Linear(embed_dim, vocab_size, bias=False)
    model = TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers, max_seq_len=max_seq_len,
                               num_heads=num_heads, head_dim=hd, norm=RMSNorm(embed_dim, eps=norm_eps), output=output)
    add_sliding_windows(model, qwen2.sliding_windows(hf_config, num_layers))
    return model

"""Gemma 2 (``Gemma2ForCausalLM``): soft-capped attention scores and final logits,
``query_pre_attn_scalar``, a norm before and after both attention and MLP (``(1 + weight)``
RMSNorms, as Gemma 1), sliding-window and global layers alternating, tied output.

Composed from torchtune's Gemma 2 modules rather than its ``gemma2`` builder, which differs from
transformers' model in three places (found by comparing logits on the same weights): it
soft-caps the normalised hidden state instead of the logits, its weight conversion swaps the pre-
and post-feedforward norms, and its attention draws the sliding window on the mask's row numbers,
which are the query positions only without a KV cache (a decoding step would see the first
``window`` keys, not the last). Here the window is the mask hook of ``models.sliding_window``, as
for Mistral and Qwen2.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.models.gemma._component_builders import gemma_mlp
from torchtune.models.gemma.gemma_norm_embedding import GemmaNormEmbeddings
from torchtune.models.gemma.rms_norm import GemmaRMSNorm
from torchtune.models.gemma2._attention import Gemma2Attention
from torchtune.modules import (RotaryPositionalEmbeddings, TiedLinear, TransformerDecoder,
                               TransformerSelfAttentionLayer)

from pmss_dist.errors import HFCheckpointError
from pmss_dist.models.sliding_window import add_sliding_windows, layer_windows
from pmss_dist.models.spec import ModelSpec

ARCHITECTURE = "Gemma2ForCausalLM"
MODEL_TYPE = "gemma2"
GGUF_ARCH = "gemma2"
PERMUTED_QK = True  # torchtune's RoPE rotates interleaved pairs, HF halves
TIED_BY_DEFAULT = True
# torchtune's layer applies sa_norm -> attn -> sa_scale and mlp_norm -> mlp -> mlp_scale; these
# replace the common map's mlp_norm = post_attention_layernorm, which is Llama's naming.
HF_KEYS = {
    "layers.{}.sa_scale.scale": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp_norm.scale": "model.layers.{}.pre_feedforward_layernorm.weight",
    "layers.{}.mlp_scale.scale": "model.layers.{}.post_feedforward_layernorm.weight",
}
# transformers' Gemma2Config defaults, for config.json files that leave a field out.
_DEFAULTS = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
             "sliding_window": 4096}


class SoftCappedLogits:
    """The output projection, then ``cap · tanh(logits / cap)``. A plain callable, like
    `TiedLinear`: it owns no parameters, so state dicts and sharding do not see it."""

    def __init__(self, output, cap: float):
        self.output, self.cap = output, cap

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(self.output(h) / self.cap)


def read_fields(c: dict, num_layers: int) -> dict:
    """The caps, query scale and windows, after refusing what this builder does not model, naming
    the config.json field."""
    arch = ARCHITECTURE
    if not c.get("tie_word_embeddings", TIED_BY_DEFAULT):
        raise HFCheckpointError(f"config.json sets tie_word_embeddings: false; pmss_dist builds {arch} with the output "
                                "tied to the embedding, as every released Gemma 2 is: use a tied checkpoint")
    if c.get("attention_bias"):
        raise HFCheckpointError(f"config.json sets attention_bias: true; pmss_dist builds {arch} without attention "
                                "biases, as released: use a checkpoint without them")
    act = c.get("hidden_activation") or "gelu_pytorch_tanh"  # transformers ignores hidden_act here
    if act != "gelu_pytorch_tanh":
        raise HFCheckpointError(f"config.json sets hidden_activation: {act!r}; pmss_dist builds {arch} with the tanh "
                                "GELU of the released models: set hidden_activation: gelu_pytorch_tanh")
    if c.get("use_bidirectional_attention"):
        raise HFCheckpointError(f"config.json sets use_bidirectional_attention: true; pmss_dist trains {arch} as a "
                                "causal decoder: set it to false")
    setting = {key: c.get(key, default) for key, default in _DEFAULTS.items()}
    # Files without layer_types (before transformers 5): every even layer slides, as transformers assumes.
    return {"attn_softcap": setting["attn_logit_softcapping"], "final_softcap": setting["final_logit_softcapping"],
            "query_pre_attn_scalar": setting["query_pre_attn_scalar"],
            "windows": layer_windows(c, setting["sliding_window"], [i % 2 == 0 for i in range(num_layers)])}


def build(spec: ModelSpec, max_seq_len: int) -> TransformerDecoder:
    hd, dim, heads, kv_heads, eps = spec.head_dim, spec.dim, spec.num_heads, spec.num_kv_heads, spec.norm_eps
    rope = RotaryPositionalEmbeddings(dim=hd, max_seq_len=max_seq_len, base=spec.rope.theta)
    layers = nn.ModuleList()
    for _ in range(spec.num_layers):
        attn = Gemma2Attention(
            embed_dim=dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
            q_proj=nn.Linear(dim, heads * hd, bias=False),
            k_proj=nn.Linear(dim, kv_heads * hd, bias=False),
            v_proj=nn.Linear(dim, kv_heads * hd, bias=False),
            output_proj=nn.Linear(heads * hd, dim, bias=False),
            pos_embeddings=rope, max_seq_len=max_seq_len, sliding_window_size=None,  # a mask hook, below
            softcapping=spec.attn_softcap, query_pre_attn_scalar=spec.query_pre_attn_scalar)
        layers.append(TransformerSelfAttentionLayer(
            attn=attn, mlp=gemma_mlp(dim=dim, hidden_dim=spec.hidden_dim),
            sa_norm=GemmaRMSNorm(dim, eps=eps), sa_scale=GemmaRMSNorm(dim, eps=eps),
            mlp_norm=GemmaRMSNorm(dim, eps=eps), mlp_scale=GemmaRMSNorm(dim, eps=eps)))
    tok_embeddings = GemmaNormEmbeddings(spec.vocab_size, dim)
    output = TiedLinear(tok_embeddings)
    cap = spec.final_softcap
    model = TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers, max_seq_len=max_seq_len,
                               num_heads=heads, head_dim=hd, norm=GemmaRMSNorm(dim, eps=eps),
                               output=SoftCappedLogits(output, cap) if cap is not None else output)
    add_sliding_windows(model, spec.windows)
    return model

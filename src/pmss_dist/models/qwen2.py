"""Qwen2 (``Qwen2ForCausalLM``): q/k/v biases, tied or untied output."""

from torchtune.models.qwen2 import qwen2

ARCHITECTURE = "Qwen2ForCausalLM"
# torchtune's Qwen2 rotates halves, as HF does: no permutation.
PERMUTED_QK = False
# Beyond the common map: the q/k/v biases.
HF_KEYS = {f"layers.{{}}.attn.{p}_proj.bias": f"model.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"}


def build(hf_config: dict, **common):
    return qwen2(**common, tie_word_embeddings=hf_config.get("tie_word_embeddings", False))

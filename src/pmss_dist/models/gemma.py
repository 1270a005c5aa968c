"""Gemma 1 (``GemmaForCausalLM``): always tied, explicit head_dim."""

from torchtune.models.gemma import gemma

from pmss_dist.models.spec import ModelSpec

ARCHITECTURE = "GemmaForCausalLM"
MODEL_TYPE = "gemma"
GGUF_ARCH = "gemma"
PERMUTED_QK = True
TIED_BY_DEFAULT = True


def build(spec: ModelSpec, max_seq_len: int):
    return gemma(**spec.torchtune_args(max_seq_len), head_dim=spec.head_dim)

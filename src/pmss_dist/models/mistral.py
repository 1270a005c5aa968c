"""Mistral (``MistralForCausalLM``)."""

from torchtune.models.mistral import mistral

ARCHITECTURE = "MistralForCausalLM"
PERMUTED_QK = True


def build(hf_config: dict, **common):
    del hf_config
    return mistral(**common)

"""Gemma 1 (``GemmaForCausalLM``): always tied, explicit head_dim."""

from torchtune.models.gemma import gemma

ARCHITECTURE = "GemmaForCausalLM"
PERMUTED_QK = True
TIED_BY_DEFAULT = True


def build(hf_config: dict, **common):
    from pmss_dist.models import head_dim

    return gemma(**common, head_dim=head_dim(hf_config))

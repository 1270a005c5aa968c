"""Llama 2 and 3.0 (``LlamaForCausalLM``), tied or untied output."""

from torchtune.models.llama3 import llama3
from torchtune.modules import TiedLinear

ARCHITECTURE = "LlamaForCausalLM"
# HF rotates halves, torchtune interleaved pairs: q/k rows are permuted on import and export.
PERMUTED_QK = True


def build(hf_config: dict, **common):
    model = llama3(**common)
    if hf_config.get("tie_word_embeddings", False):
        del model.output  # a registered nn.Linear; TiedLinear is a plain callable
        model.output = TiedLinear(model.tok_embeddings)
    return model

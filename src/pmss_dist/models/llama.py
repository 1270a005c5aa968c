"""Llama 2, 3.0 and 3.1-3.3 (``LlamaForCausalLM``), tied or untied output; Llama 3.1's RoPE
scaling (``rope_type: llama3``) with all four of its parameters read from config.json."""

from torchtune.models.llama3_1 import llama3_1
from torchtune.models.llama3 import llama3
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import TiedLinear

from pmss_dist.errors import HFCheckpointError

ARCHITECTURE = "LlamaForCausalLM"
# HF rotates halves, torchtune interleaved pairs: q/k rows are permuted on import and export.
PERMUTED_QK = True
ROPE_SCALING = ("llama3",)
# The fields of a llama3 scaling that transformers requires (it has no default for them).
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor")


def build(hf_config: dict, **common):
    from pmss_dist.models import check_head_dim_derived, head_dim, rope_scaling

    check_head_dim_derived(hf_config, "llama3")
    scaling = rope_scaling(hf_config)
    if scaling is None:
        model = llama3(**common)
    else:
        missing = [k for k in LLAMA3_FIELDS if scaling.get(k) is None]
        if missing:
            raise HFCheckpointError(f"config.json: rope_scaling of type 'llama3' lacks {missing}; "
                                    "copy them from the model's original config.json")
        # As transformers: a top-level original_max_position_embeddings wins, then the scaling's,
        # then max_position_embeddings.
        original = (hf_config.get("original_max_position_embeddings")
                    or scaling.get("original_max_position_embeddings") or hf_config["max_position_embeddings"])
        model = llama3_1(**common, scale_factor=scaling["factor"])
        # torchtune's builder fixes the frequency factors and the original length at Llama 3.1's
        # values (1, 4, 8192); one RoPE with this checkpoint's four, shared as the builder shares its.
        rope = Llama3ScaledRoPE(dim=head_dim(hf_config), max_seq_len=common["max_seq_len"], base=common["rope_base"],
                                scale_factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                                high_freq_factor=scaling["high_freq_factor"], old_context_len=original)
        for layer in model.layers:
            layer.attn.pos_embeddings = rope
    if hf_config.get("tie_word_embeddings", False):
        del model.output  # a registered nn.Linear; TiedLinear is a plain callable
        model.output = TiedLinear(model.tok_embeddings)
    return model

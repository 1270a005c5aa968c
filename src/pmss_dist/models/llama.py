"""Llama 2, 3.0 and 3.1-3.3 (``LlamaForCausalLM``), tied or untied output; Llama 3.1's RoPE
scaling (``rope_type: llama3``) with all four of its parameters read from config.json."""

from torchtune.models.llama3_1 import llama3_1
from torchtune.models.llama3 import llama3
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import TiedLinear

from pmss_dist.models.spec import ModelSpec, check_head_dim_derived

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
GGUF_ARCH = "llama"
# HF rotates halves, torchtune interleaved pairs: q/k rows are permuted on import and export.
PERMUTED_QK = True
ROPE_SCALING = ("llama3",)


def build(spec: ModelSpec, max_seq_len: int):
    check_head_dim_derived(spec, "llama3")
    scaling = spec.rope.scaling  # a Llama3Scaling, or None
    if scaling is None:
        model = llama3(**spec.torchtune_args(max_seq_len))
    else:
        model = llama3_1(**spec.torchtune_args(max_seq_len), scale_factor=scaling.factor)
        # torchtune's builder fixes the frequency factors and the original length at Llama 3.1's
        # values (1, 4, 8192); one RoPE with this checkpoint's four, shared as the builder shares its.
        rope = Llama3ScaledRoPE(dim=spec.head_dim, max_seq_len=max_seq_len, base=spec.rope.theta,
                                scale_factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                                high_freq_factor=scaling.high_freq_factor, old_context_len=scaling.original_max_seq_len)
        for layer in model.layers:
            layer.attn.pos_embeddings = rope
    if spec.tied:
        del model.output  # a registered nn.Linear; TiedLinear is a plain callable
        model.output = TiedLinear(model.tok_embeddings)
    return model

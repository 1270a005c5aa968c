"""Mistral (``MistralForCausalLM``), with its sliding window when config.json sets one."""

from torchtune.models.mistral import mistral

from pmss_dist.models.sliding_window import add_sliding_windows, layer_windows

ARCHITECTURE = "MistralForCausalLM"
PERMUTED_QK = True
# transformers' MistralConfig default, for a config.json without the key (null: no window).
DEFAULT_SLIDING_WINDOW = 4096


def build(hf_config: dict, **common):
    from pmss_dist.models import check_head_dim_derived

    check_head_dim_derived(hf_config, "mistral")
    model = mistral(**common)
    window = hf_config.get("sliding_window", DEFAULT_SLIDING_WINDOW)
    add_sliding_windows(model, layer_windows(hf_config, window, [True] * common["num_layers"]))
    return model

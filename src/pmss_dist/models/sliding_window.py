"""Sliding-window attention on torchtune's ``MultiHeadAttention``, as transformers computes it.

torchtune's Mistral and Qwen2 builders have no window, but their attention takes a boolean mask
(True = may attend). `add_sliding_windows` puts a forward pre-hook on the attention of each
windowed layer that ANDs the window into the mask it is given (the packed batches' per-document
masks, generation's padding masks) or into the causal mask it would use without one: query ``i``
may attend key ``j`` only if ``i - j < window``, transformers' ``kv_idx > q_idx - sliding_window``.

``i`` and ``j`` are indices in the sequence. Within one document of a packed row, and between the
real tokens of a left-padded prompt, they differ exactly as the RoPE positions do. With a KV cache
the keys are the cache's slots and the queries are the slots they are written to.
"""

from __future__ import annotations

from functools import partial

import torch
from torchtune.modules import MultiHeadAttention, TransformerDecoder

from pmss_dist.errors import HFCheckpointError


def window_mask(attn: MultiHeadAttention, seq_len: int, mask: torch.Tensor | None,
                window: int, device: torch.device) -> torch.Tensor | None:
    """The mask ``attn`` should use for ``seq_len`` queries given ``mask``: ``mask`` (or causal)
    restricted to the last ``window`` keys of each query. Without a KV cache and with no more
    queries than the window, the window excludes nothing and ``mask`` comes back unchanged."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise NotImplementedError("sliding-window attention takes boolean tensor masks, not flex-attention "
                                  "BlockMasks (data.packed builds tensor masks)")
    cached = attn.kv_cache is not None and attn.cache_enabled
    if not cached and seq_len <= window:
        return mask
    queries = attn.kv_cache.cache_pos[:seq_len] if cached else torch.arange(seq_len, device=device)
    keys = torch.arange(attn.kv_cache.k_cache.shape[2] if cached else seq_len, device=device)
    back = queries[:, None] - keys[None, :]
    in_window = back < window
    # Causal as well where no mask is given: it then stands in for SDPA's is_causal. torchtune
    # wants a [b, s, keys] mask; a batch of 1 broadcasts.
    return (in_window & (back >= 0))[None] if mask is None else mask & in_window


def _apply_window(window: int, attn: MultiHeadAttention, args: tuple, kwargs: dict):
    x = args[0]
    kwargs["mask"] = window_mask(attn, x.shape[1], kwargs.get("mask"), window, x.device)
    return args, kwargs


def add_sliding_windows(model: TransformerDecoder, windows: tuple[int | None, ...]) -> None:
    """Give layer ``i`` a sliding window of ``windows[i]`` tokens (``None``: full attention)."""
    if len(windows) != len(model.layers):
        raise ValueError(f"{len(windows)} sliding windows for {len(model.layers)} layers")
    for layer, window in zip(model.layers, windows):
        if window is not None:
            layer.attn.register_forward_pre_hook(partial(_apply_window, window), with_kwargs=True)


def layer_windows(c: dict, window: int | None, default_sliding: list[bool]) -> tuple[int | None, ...]:
    """Each layer's window, as a family reads config.json ``c``: ``window`` for the layers that
    ``layer_types`` (transformers 5.x files) calls ``sliding_attention``, or without it for
    ``default_sliding`` (the family's rule for older files); ``None`` everywhere when ``window`` is ``None``."""
    if window is not None and window < 1:
        raise HFCheckpointError(f"config.json: sliding_window {window} must be a positive number of tokens")
    n = len(default_sliding)
    types = c.get("layer_types")
    if types is None:
        sliding = default_sliding
    else:
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if len(types) != n or unknown:
            raise HFCheckpointError(f"config.json's layer_types must name sliding_attention or full_attention for each "
                                    f"of the {n} layers (num_hidden_layers); got {len(types)} entries"
                                    + (f", unknown {unknown}" if unknown else ""))
        sliding = [t == "sliding_attention" for t in types]
    return tuple(window if s and window is not None else None for s in sliding)

"""Generation: the KV-cache path equals the full-recompute path (greedy and seeded sampling),
a prompt's output does not depend on its batch, greedy equals torchtune's own generate, and the
evaluator's GSM8K answer matching."""

from __future__ import annotations

import pytest
import torch
from torchtune.generation import generate as torchtune_generate

from pmss_dist.eval.scoring import final_number_match
from pmss_dist.eval.generation import generate
from pmss_dist.models import build_decoder, model_spec

PROMPTS = [[1, 5, 9], [1, 7, 3, 3, 8, 2], [1, 4, 4, 4, 4, 4, 4, 2, 9, 11]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    m = build_decoder(model_spec(config)).eval()
    for p in m.parameters():  # larger weights than the default init: peaked, varied next-token choices
        torch.nn.init.normal_(p, std=0.3)
    return m


def test_greedy_cache_equals_no_cache_and_batch_independent(model):
    cached = generate(model, PROMPTS, 12, use_cache=True)
    assert cached == generate(model, PROMPTS, 12, use_cache=False)
    assert all(len(out) == 12 for out in cached)
    assert len({tuple(o) for o in cached}) == 3
    for prompt, out in zip(PROMPTS, cached):
        assert generate(model, [prompt], 12) == [out]  # left padding changes nothing


def test_greedy_equals_torchtune_generate(model):
    for prompt in PROMPTS:
        ours = generate(model, [prompt], 10, use_cache=False)[0]
        # top_k=1 makes torchtune's sampler an argmax (an independent implementation).
        theirs, _ = torchtune_generate(model, torch.tensor(prompt), max_generated_tokens=10, top_k=1,
                                       rng=torch.Generator().manual_seed(0))
        assert ours == theirs[0, len(prompt):].tolist()


def test_seeded_sampling_cache_equals_no_cache(model):
    kwargs = dict(temperature=0.9, top_k=20, seed=7)
    cached = generate(model, PROMPTS, 15, use_cache=True, **kwargs)
    assert cached == generate(model, PROMPTS, 15, use_cache=False, **kwargs)
    assert cached != generate(model, PROMPTS, 15, **{**kwargs, "seed": 8})
    assert cached != generate(model, PROMPTS, 15)  # not greedy in disguise
    # A row's noise comes from (seed, row_id): alone, it samples the same tokens.
    assert generate(model, [PROMPTS[2]], 15, row_ids=[2], **kwargs) == [cached[2]]


def test_stop_tokens_and_length_limit(model):
    full = generate(model, PROMPTS, 12)
    stop = full[1][4]
    cut = generate(model, PROMPTS, 12, stop_ids=[stop])
    assert cut[1] == full[1][:full[1].index(stop)]
    for f, c in zip(full, cut):
        assert c == (f[:f.index(stop)] if stop in f else f)
    with pytest.raises(ValueError, match="max_seq_len 40"):
        generate(model, PROMPTS, 31)


def test_final_number_match():
    reference = "She pays 3 * 400 = <<3*400=1200>>1200 dollars.\n#### 1,200"
    assert final_number_match("So the total is $1,200.00.", reference)["correct"]
    assert final_number_match("3 * 400 = 1200\n#### 1200", reference) == {"predicted": "1200", "expected": "1200",
                                                                         "correct": True}
    assert not final_number_match("#### 1200 5", "#### 5")["correct"]  # the number right after ####
    assert not final_number_match("no idea", reference)["correct"]
    assert not final_number_match("", "")["correct"]  # nothing found on either side is not a match

"""Packing: a packed row computes exactly what its documents compute one by one (logits, loss,
gradients), positions restart per document, and packs depend on the seed only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pmss_dist.data import batches
from pmss_dist.data import examples as D
from pmss_dist.config import DataConfig
from pmss_dist.models import build_decoder, model_spec
from pmss_dist.data.packing import document_mask_and_positions, pack_samples
from pmss_dist.data.tokenizers import ByteTokenizer

IGNORE = D.IGNORE_INDEX


def test_mask_and_positions_by_hand():
    mask, pos = document_mask_and_positions([2, 3], 7)
    assert pos.tolist() == [0, 1, 0, 1, 2, 0, 1]  # the padding tail is a document of its own
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def _samples(n, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (), generator=gen))
        tokens = torch.randint(0, vocab, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length, (), generator=gen))
        out.append({"tokens": tokens, "labels": [IGNORE] * (prompt - 1) + tokens[prompt:] + [IGNORE]})
    return out


def test_packed_batch_equals_documents_one_by_one():
    torch.manual_seed(0)
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):  # interleaved and half-split RoPE
        config = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = build_decoder(model_spec(config)).float()
        samples = _samples(9, 64, seed=1)
        packs = pack_samples(samples, 24, seed=0)
        assert sorted(sum((p["seq_lens"] for p in packs), [])) == sorted(len(s["tokens"]) for s in samples)
        batch = batches.collate(packs, 24, pad_id=0)
        logits = model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
        packed_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                                      reduction="sum")
        (packed_grad,) = torch.autograd.grad(packed_loss, model.layers[0].attn.q_proj.weight)

        single_loss = 0.0
        for row, pack in enumerate(packs):
            start = 0
            for n in pack["seq_lens"]:
                ref = model(torch.tensor([pack["tokens"][start:start + n]]))
                torch.testing.assert_close(logits[row, start:start + n], ref[0], rtol=1e-5, atol=1e-5)
                single_loss = single_loss + F.cross_entropy(ref[0], torch.tensor(pack["labels"][start:start + n]),
                                                            ignore_index=IGNORE, reduction="sum")
                start += n
        (single_grad,) = torch.autograd.grad(single_loss, model.layers[0].attn.q_proj.weight)
        torch.testing.assert_close(packed_loss, single_loss, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(packed_grad, single_grad, rtol=1e-5, atol=1e-6)
        # Without the mask the documents would see each other: the test can tell the difference.
        assert not torch.allclose(model(batch["tokens"]), logits, atol=1e-3)


def test_packed_builtin_dataset_is_seeded_and_lossless():
    tok = ByteTokenizer(256, 257, 258)
    cfg = DataConfig(num_samples=200, seq_len=32, packed=True)
    packs = D.build_dataset(cfg, tok, seed=4)
    assert packs == D.build_dataset(cfg, tok, seed=4)
    assert packs != D.build_dataset(cfg, tok, seed=5)
    assert all(sum(p["seq_lens"]) == len(p["tokens"]) <= 32 for p in packs)
    docs = []
    for p in packs:
        start = 0
        for n in p["seq_lens"]:
            docs.append((tuple(p["tokens"][start:start + n]), tuple(p["labels"][start:start + n])))
            start += n
    plain = D.build_dataset(DataConfig(num_samples=200, seq_len=32), tok, seed=4)
    assert sorted(docs) == sorted((tuple(s["tokens"]), tuple(s["labels"])) for s in plain)
    assert len(packs) < len(plain) // 2  # 8-10 token samples: three or more per 32-token row
    batch = batches.collate(packs[:2], 32, tok.pad_id)
    assert batch["mask"].shape == (2, 32, 32) and batch["input_pos"].shape == (2, 32)

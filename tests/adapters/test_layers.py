"""PMSS and LoRA layers against dense references; apply_adapters on every torchtune family."""

import pytest
import torch
from torch import nn

from pmss_dist.adapters.layers import (AdapterSpec, LoRALinear, PMSSLinear, adapter_layers, apply_adapters, apply_pmss,
                                merge_adapters, reset_adapters)
from pmss_dist.adapters.selection import select_skeleton
from pmss_dist.models import build_decoder, model_spec

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _pmss_layer(d_out=24, d_in=20, k=6, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = PMSSLinear(d_in, d_out, k=k, alpha=3.0, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=gen, dtype=torch.float64))
        if bias:
            layer.bias.copy_(torch.randn(d_out, generator=gen, dtype=torch.float64))
        layer.row_idx.copy_(torch.randperm(d_out, generator=gen)[:k])
        layer.col_idx.copy_(torch.randperm(d_in, generator=gen)[:k])
        layer.core.data = torch.randn(k, k, generator=gen, dtype=torch.float64)
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_out,d_in", [(24, 20), (20, 24)], ids=["wide-out", "wide-in"])
def test_pmss_forward_and_grads_equal_dense_reference(bias, d_out, d_in):
    # Both forward formulations: the update folded into the input (d_out > d_in) and read off
    # the base output (d_out <= d_in).
    layer = _pmss_layer(d_out=d_out, d_in=d_in, bias=bias)
    x = torch.randn(3, 5, d_in, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    w, rows, cols = layer.weight, layer.row_idx, layer.col_idx
    core = layer.core.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    dense = w + layer.scale * w[:, cols] @ core @ w[rows, :]  # W + s·C·U·R, written out
    ref = x_ref @ dense.T + (layer.bias if bias else 0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(layer.core.grad, core.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    torch.testing.assert_close(layer.delta_weight().double(), dense - w, rtol=1e-6, atol=1e-6)


def test_lora_forward_equals_dense_reference():
    layer = LoRALinear(20, 24, r=4, alpha=8.0, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 20, dtype=torch.float64))
    layer.reset_adapter(seed=1, name="x")
    layer.lora_b.data = torch.randn(24, 4)
    x = torch.randn(7, 20, dtype=torch.float64)
    ref = x @ (layer.weight + 2.0 * layer.lora_b.double() @ layer.lora_a.double()).T
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)


def _tiny(arch, **extra):
    torch.manual_seed(0)
    cfg = {**TINY, "architectures": [arch], **extra}
    return build_decoder(model_spec(cfg)).double()


FAMILIES = [("LlamaForCausalLM", {}), ("MistralForCausalLM", {}), ("Qwen2ForCausalLM", {}),
            ("GemmaForCausalLM", {"head_dim": 8}), ("LlamaForCausalLM", {"tie_word_embeddings": True})]


@pytest.mark.parametrize("arch,extra", FAMILIES)
def test_apply_pmss_counts_and_identity_at_init(arch, extra):
    model = _tiny(arch, **extra)
    tokens = torch.randint(0, 96, (2, 11))
    base_logits = model(tokens)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}
    k = 6
    counts = apply_adapters(model, AdapterSpec("pmss", size=k, alpha=6.0))
    layers = adapter_layers(model)
    assert set(layers) == set(linears)  # every q,k,v,o,gate,up,down projection, nothing else
    assert counts["trainable"] == len(linears) * k * k
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.core" for n in linears}
    gen = torch.Generator().manual_seed(0)
    for layer in layers.values():
        layer.row_idx.copy_(torch.randperm(layer.out_features, generator=gen)[:k])
        layer.col_idx.copy_(torch.randperm(layer.in_features, generator=gen)[:k])
    reset_adapters(model, seed=0)
    assert torch.equal(model(tokens), base_logits)  # zero core: exactly the pretrained model


def test_lora_counts_and_init_is_rank_independent():
    model = _tiny("LlamaForCausalLM")
    counts = apply_adapters(model, AdapterSpec("lora", targets=("q_proj", "v_proj"), size=4, alpha=8.0))
    layers = adapter_layers(model)
    assert counts["trainable"] == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    reset_adapters(model, seed=3)
    first = {n: m.lora_a.clone() for n, m in layers.items()}
    reset_adapters(model, seed=3)
    assert all(torch.equal(first[n], m.lora_a) for n, m in layers.items())
    assert not torch.equal(*list(first.values())[:2])  # per-layer streams differ


@pytest.mark.parametrize("kind", ["pmss", "lora"])
def test_merge_reproduces_adapted_model(kind):
    model = _tiny("LlamaForCausalLM")
    apply_adapters(model, AdapterSpec(kind, size=4, alpha=4.0))
    gen = torch.Generator().manual_seed(1)
    reset_adapters(model, seed=0)
    for layer in adapter_layers(model).values():
        if kind == "pmss":
            layer.row_idx.copy_(torch.randperm(layer.out_features, generator=gen)[:4])
            layer.col_idx.copy_(torch.randperm(layer.in_features, generator=gen)[:4])
            layer.core.data = torch.randn(4, 4, generator=gen)
        else:
            layer.lora_b.data = torch.randn(layer.out_features, 4, generator=gen)
    tokens = torch.randint(0, 96, (2, 9))
    adapted = model(tokens)
    merge_adapters(model)
    assert not adapter_layers(model)
    torch.testing.assert_close(model(tokens), adapted, rtol=1e-9, atol=1e-9)


def test_rank_too_large_and_bad_targets_name_the_problem():
    model = _tiny("LlamaForCausalLM")
    with pytest.raises(ValueError, match=r"adapter.rank=40 is larger than layer layers.0.attn.q_proj"):
        apply_adapters(model, AdapterSpec("pmss", size=40))
    with pytest.raises(ValueError, match="unknown projection"):
        apply_adapters(_tiny("LlamaForCausalLM"), AdapterSpec("pmss", targets=("qproj",), size=4))
    with pytest.raises(ValueError, match="must be positive"):
        apply_adapters(_tiny("LlamaForCausalLM"), AdapterSpec("pmss", size=0))


def test_apply_pmss_selects_every_skeleton_from_its_own_weight():
    model = _tiny("LlamaForCausalLM").float()
    tokens = torch.randint(0, 96, (2, 7))
    base_logits = model(tokens)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("layers.")}
    counts = apply_pmss(model, k=5, method="qdeim", seed=2)
    assert counts["trainable"] == len(weights) * 25
    for name, layer in adapter_layers(model).items():
        rows, cols = select_skeleton(weights[name], 5, "qdeim", seed=2, name=name)
        assert torch.equal(layer.row_idx, rows) and torch.equal(layer.col_idx, cols)
        assert layer.scale == 1.0
    assert torch.equal(model(tokens), base_logits)

"""A quantized frozen base (NF4, int8): the formats against torchao and their error bounds, the
adapter layers against dense layers built from the dequantized weights, what backward keeps, the
bytes a quantized model holds, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torchao.dtypes.nf4tensor import to_nf4

from pmss_dist.adapters.layers import AdapterSpec, LoRALinear, PMSSLinear, apply_adapters
from pmss_dist.adapters.quantize import (NF4_BLOCK, check_quantizable, int8_rows, nf4_dense, nf4_rows,
                                         nf4_scale_mean, nf4_scaler_block, tensor_bytes)
from pmss_dist.build import build_model
from pmss_dist.models import model_spec
from pmss_dist.config import ConfigError, load_config
from pmss_dist.models.builtin import TINY_CONFIG

FORMATS = ("nf4", "int8")


def weight(d_out=256, d_in=128, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, d_in, generator=gen) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_nf4_rows_are_torchaos_whole_tensor_quantization_row_by_row(dtype, shards):
    w = weight(d_out=512, dtype=dtype)  # 1024 blocks: 4 double-quantization factors
    whole = to_nf4(w, NF4_BLOCK, nf4_scaler_block(tuple(w.shape)))
    # The mean of the block scales: ours sums in fp64 (as the all-reduce of the shards' sums
    # does), torchao reduces in the weight's dtype; they differ by rounding only.
    torch.testing.assert_close(nf4_scale_mean(w).to(dtype), whole.scaler_mean, rtol=1e-6, atol=0)
    for i, expected in enumerate(whole.split(w.shape[0] // shards)):
        rows = w[i * w.shape[0] // shards:(i + 1) * w.shape[0] // shards]
        got = nf4_rows(rows, whole.scaler_mean, nf4_scaler_block(tuple(w.shape)))
        for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(512, 128), (576, 576)])  # scaler blocks of 256, and SmolLM2's 216
def test_nf4_dense_is_torchaos_dequantization_bit_for_bit(dtype, shape):
    w = weight(*shape, dtype=dtype) * torch.linspace(0.1, 10, shape[1]).to(dtype)  # scales spread wide
    q = to_nf4(w, NF4_BLOCK, nf4_scaler_block(shape))
    for out_dtype in (torch.float32, torch.bfloat16):
        expected = q.to(out_dtype)  # torchao's NF4Tensor.get_original_weight, cast
        got = nf4_dense(q, out_dtype)
        assert got.dtype == out_dtype and got.shape == w.shape
        assert torch.equal(got, expected)


def test_nf4_scaler_block_is_torchaos_where_it_divides_and_the_largest_divisor_elsewhere():
    assert nf4_scaler_block((4096, 4096)) == 256
    assert nf4_scaler_block((576, 576)) == 216  # SmolLM2: 5184 scales
    assert nf4_scaler_block((192, 576)) == 216  # 1728 scales
    assert 5184 % 216 == 0 and 1728 % 216 == 0


def test_nf4_error_is_within_half_the_widest_gap_of_its_levels():
    w = weight(d_out=64, d_in=512)
    q = nf4_rows(w, nf4_scale_mean(w), nf4_scaler_block(tuple(w.shape)))
    levels = q.nf4.sort().values
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    blocks = w.reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # codes are nearest to w / absmax; dequantization uses the double-quantized absmax s'
    stored_absmax = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor, q.scaler_block_size)[:, None]
    error = (q.get_original_weight().reshape(-1, NF4_BLOCK) - blocks).abs()
    assert (error <= half_gap * absmax + (stored_absmax - absmax).abs() + 1e-7).all()
    assert float(error.max()) > 0  # four bits do lose something


def test_int8_error_is_within_half_a_scale_per_row():
    w = weight()
    codes, scale = int8_rows(w)
    assert codes.dtype == torch.int8 and scale.shape == (w.shape[0],)
    error = (codes.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (codes.abs().amax(dim=1) == 127).all()  # every row uses its full range


def quantized_layer(cls, fmt, w, size=8, seed=1):
    layer = cls(w.shape[1], w.shape[0], size, 16.0, quantize=fmt)
    layer.load_weight(w)
    return _with_adapter_state(layer, seed)


def _with_adapter_state(layer, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(layer, PMSSLinear):
            layer.row_idx.copy_(torch.randperm(layer.out_features, generator=gen)[:layer.k])
            layer.col_idx.copy_(torch.randperm(layer.in_features, generator=gen)[:layer.k])
            layer.core.copy_(torch.randn(layer.k, layer.k, generator=gen))
        else:
            layer.lora_a.copy_(torch.randn_like(layer.lora_a))
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen))
    return layer


def dense_twin(layer):
    """The same adapter on an unquantized layer whose weight is the quantized one dequantized."""
    size = layer.k if isinstance(layer, PMSSLinear) else layer.r
    twin = type(layer)(layer.in_features, layer.out_features, size, 16.0)
    twin.load_weight(layer.dense_weight(torch.float32))
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("weight")}, strict=False)
    return twin


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cls", [PMSSLinear, LoRALinear])
@pytest.mark.parametrize("shape", [(256, 128), (128, 256)])  # PMSS's narrow and wide-output paths
def test_quantized_layer_matches_a_dense_layer_of_its_dequantized_weight(fmt, cls, shape):
    w = weight(*shape)
    layer = quantized_layer(cls, fmt, w)
    twin = dense_twin(layer)
    x = torch.randn(3, 5, shape[1], requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), twin(x_twin)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-6)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, dict(twin.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)
    # and the quantization error is what separates it from the original weight
    assert (layer.dense_weight(torch.float32) - w).abs().max() > 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cls", [PMSSLinear, LoRALinear])
def test_backward_keeps_the_quantized_weight_not_a_dense_copy(fmt, cls):
    w = weight()
    layer = quantized_layer(cls, fmt, w)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, w.shape[1], requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    dense = [t for t in saved if t.is_floating_point() and t.numel() == w.numel() and type(t) is torch.Tensor]
    assert not dense, [tuple(t.shape) for t in dense]
    out.sum().backward()  # and backward still gets what it needs


def test_quantized_model_holds_a_fraction_of_the_frozen_bytes():
    # A model whose projections dominate, as in a 7B model's layers: width 256, 4 blocks.
    hf = {**TINY_CONFIG, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}
    frozen = {}
    for fmt in ("none", "nf4", "int8"):
        model = build_model(model_spec(hf), adapter=AdapterSpec("pmss", size=8, quantize=fmt), mesh=None,
                            device=torch.device("cpu"), dtype=torch.bfloat16)
        frozen[fmt] = sum(tensor_bytes(p) for p in model.parameters() if not p.requires_grad)
    assert frozen["nf4"] <= 0.30 * frozen["none"]
    assert frozen["int8"] <= 0.55 * frozen["none"]


def test_shapes_nf4_cannot_split_are_refused_with_the_fix():
    check_quantizable("layers.0.attn.k_proj", (128, 256), "nf4", 2)  # 64 rows x 256 = 256 blocks a rank
    with pytest.raises(ConfigError, match=r"layers.0.attn.k_proj \(64x128\) cannot be split over dp_shard=2.*"
                                          r"model.quantize=int8"):
        check_quantizable("layers.0.attn.k_proj", (64, 128), "nf4", 2)
    with pytest.raises(ConfigError, match="blocks of 64 weights"):
        check_quantizable("w", (3, 5), "nf4", 1)
    check_quantizable("w", (3, 5), "int8", 3)  # int8 rows split anywhere


def test_bad_quantize_values_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"model.quantize='nf3' is not one of \['none', 'nf4', 'int8'\]"):
        load_config("configs/tiny.yaml", ["model.quantize=nf3"])
    with pytest.raises(ConfigError, match="model.quantize=nf4 needs a frozen base.*adapter.kind=full"):
        load_config("configs/tiny.yaml", ["model.quantize=nf4", "adapter.kind=full"])
    with pytest.raises(ValueError, match="needs a frozen base"):
        apply_adapters(torch.nn.Linear(4, 4), AdapterSpec("full", quantize="int8"))

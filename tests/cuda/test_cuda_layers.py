"""PMSS and LoRA layers in bf16 on CUDA, forward and backward, against an fp64 reference.

The reference runs the same layer in float64 on the CPU on the same (bf16-rounded) weight and
input, with the fp32 adapter tensors as they are: the test measures the arithmetic of the bf16
path (cast of the adapter to the compute dtype, bf16 GEMMs, index_select/index_add on the GPU),
not the rounding of the inputs. The update is made comparable in size to the base output, so a
wrong or missing update cannot hide inside the tolerance.
"""

from __future__ import annotations

import pytest
import torch

from cudalib import DEVICE, cuda_only

from pmss_dist.adapters.layers import LoRALinear, PMSSLinear

pytestmark = cuda_only

TOKENS = 512
# Norm-wise relative error ||got - ref|| / ||ref||. bf16 keeps 8 significant bits (unit roundoff
# 2^-9 = 0.2%); the GEMMs accumulate in fp32; the update's chain rounds 2-3 times.
FWD_TOL = 1.5e-2
GRAD_TOL = 3e-2


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double().cpu() - ref).norm() / ref.norm())


def make_layer(kind: str, d_out: int, d_in: int, size: int, gen: torch.Generator):
    cls = PMSSLinear if kind == "pmss" else LoRALinear
    layer = cls(d_in, d_out, size, alpha=float(size))
    weight = (torch.randn(d_out, d_in, generator=gen) * 0.02).bfloat16().float()  # bf16-exact
    with torch.no_grad():
        layer.weight.copy_(weight)
        if kind == "pmss":
            layer.row_idx.copy_(torch.randperm(d_out, generator=gen)[:size])
            layer.col_idx.copy_(torch.randperm(d_in, generator=gen)[:size])
            # C and R are slices of W (entries ~0.02): a core of ~1/(0.02·k) makes the update
            # about as large as the base output, on either side.
            layer.core.copy_(torch.randn(size, size, generator=gen) / (0.02 * size))
        else:
            layer.lora_a.copy_(torch.randn(size, d_in, generator=gen) / d_in**0.5)
            layer.lora_b.copy_(torch.randn(d_out, size, generator=gen) * 0.02 * (d_in / size) ** 0.5)
    return layer


def forward_backward(layer, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    trained = [p for p in layer.parameters() if p.requires_grad]
    return out.detach(), x.grad, [p.grad for p in trained]


@pytest.mark.parametrize("kind,d_out,d_in,size", [
    ("pmss", 1024, 1024, 64),   # square (q/o): the update on the output side
    ("pmss", 2752, 1024, 87),   # wide output (gate/up): the update folded into the input
    ("pmss", 1024, 2752, 87),   # wide input (down)
    ("lora", 1024, 1024, 8),
    ("lora", 2752, 1024, 8),
])
def test_bf16_layer_matches_fp64(kind, d_out, d_in, size):
    gen = torch.Generator().manual_seed(0)
    layer = make_layer(kind, d_out, d_in, size, gen)
    x = torch.randn(TOKENS, d_in, generator=gen).bfloat16()
    grad_out = torch.randn(TOKENS, d_out, generator=gen).bfloat16()

    ref_layer = make_layer(kind, d_out, d_in, size, torch.Generator().manual_seed(0)).double()
    ref_out, ref_gx, ref_grads = forward_backward(ref_layer, x.double(), grad_out.double())
    base = x.double() @ ref_layer.weight.T
    update_share = float((ref_out - base).norm() / base.norm())
    assert 0.2 < update_share < 5, f"the update must be comparable to the base output, is {update_share:.3f}x"

    dev_layer = layer.to(DEVICE)
    dev_layer.weight.data = dev_layer.weight.data.bfloat16()  # frozen base in bf16, adapters fp32
    out, gx, grads = forward_backward(dev_layer, x.to(DEVICE), grad_out.to(DEVICE))
    assert out.dtype == torch.bfloat16 and out.device.type == DEVICE.type
    assert all(g.dtype == torch.float32 for g in grads), "adapter gradients must stay fp32"
    assert rel_err(out, ref_out) < FWD_TOL
    assert rel_err(gx, ref_gx) < GRAD_TOL
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got, ref) < GRAD_TOL

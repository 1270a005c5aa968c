"""Skeleton selection with the SVDs on the GPU: one batched SVD per stack of equal shapes gives
each matrix the indices it gets alone there, so one process's selection (stacked) and a
distributed one (a matrix per rank) agree on CUDA as they do on CPU."""

from __future__ import annotations

import pytest
import torch

from cudalib import DEVICE, cuda_only

from pmss_dist.adapters.selection import METHODS, select_same_shape, select_skeleton

pytestmark = cuda_only

# A stack of 4 per shape: square (q/o), small enough for cuSOLVER's batched Jacobi (<= 32), and
# tall and wide (gate/up, down).
SHAPES = [(96, 96), (24, 20), (300, 96), (96, 300)]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("method", METHODS)
def test_a_stack_gives_each_matrix_its_own_indices(method, svd):
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        names = [f"layers.{i}.proj" for i in range(4)]
        weights = [torch.randn(shape, generator=g).to(DEVICE) for _ in names]
        stacked = select_same_shape(weights, names, 8, method, seed=1, svd=svd)
        for name, weight, (rows, cols) in zip(names, weights, stacked):
            alone = select_skeleton(weight, 8, method, seed=1, svd=svd, name=name)
            assert torch.equal(rows, alone[0]) and torch.equal(cols, alone[1]), (shape, name)

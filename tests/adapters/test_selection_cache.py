"""One process's batched SVDs give each matrix the indices it gets alone
(adapters/distributed_selection.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pmss_dist.adapters import distributed_selection
from pmss_dist.adapters.distributed_selection import select_skeletons
from pmss_dist.adapters.selection import METHODS, select_skeleton
from pmss_dist.models.builtin import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapted matrices of the built-in model: 4 blocks of q, k, v, o, gate, up, down, in
    four shapes (q/o, k/v, gate/up, down)."""
    weights = load_file(str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")) / "model.safetensors"))
    return {key.removesuffix(".weight"): w for key, w in weights.items() if key.endswith("_proj.weight")}


@pytest.mark.parametrize("stack_bytes", [distributed_selection.STACK_BYTES, 3 * 8 * 128 * 128], ids=["whole", "split"])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_selection_equals_one_matrix_at_a_time(tiny_weights, method, svd, stack_bytes, monkeypatch):
    stacks, batched = [], distributed_selection.select_same_shape

    def recorded(weights, names, *args, **kwargs):
        stacks.append(len(names))
        return batched(weights, names, *args, **kwargs)

    monkeypatch.setattr(distributed_selection, "select_same_shape", recorded)
    monkeypatch.setattr(distributed_selection, "STACK_BYTES", stack_bytes)
    got = select_skeletons(tiny_weights, {n: 8 for n in tiny_weights}, method, seed=3, svd=svd, progress=False)
    assert sum(stacks) == len(tiny_weights) == 28 and max(stacks) > 1  # batched, every matrix once
    for name, weight in tiny_weights.items():
        rows, cols = select_skeleton(weight, 8, method, seed=3, svd=svd, name=name)
        assert torch.equal(got[name][0], rows) and torch.equal(got[name][1], cols), name

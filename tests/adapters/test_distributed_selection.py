"""select_skeletons: local path, and real gloo process groups of 4, 2 and 1 ranks on DTensor shards."""
from __future__ import annotations

import json
import os
import socket
import traceback
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmss_dist.adapters.distributed_selection import select_skeletons
from pmss_dist.adapters.selection import METHODS, select_skeleton

# Odd shapes: d_out not divisible by 2 or 4, a 6-row matrix that leaves rank 3 an empty shard
# (chunks of 2, 2, 2, 0), a wide one, and a bf16 one (gloo must carry it bit-exactly).
SHAPES = {"a.q": (37, 29), "a.up": (50, 64), "b.tiny": (6, 40), "b.wide": (13, 70), "c.bf16": (45, 31)}
KS = {"a.q": 5, "a.up": 9, "b.tiny": 3, "b.wide": 6, "c.bf16": 7}


def make_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    out = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    out["c.bf16"] = out["c.bf16"].to(torch.bfloat16)
    return out


def reference(method: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: select_skeleton(w, KS[n], method, seed=4, svd="exact", name=n) for n, w in make_weights().items()}


def as_lists(sel):
    return {n: [r.tolist(), c.tolist()] for n, (r, c) in sorted(sel.items())}


# ---------------------------------------------------------------------------------------------
# Single process


def test_plain_tensors_are_selected_locally_like_select_skeleton(capsys):
    for method in METHODS:
        got = select_skeletons(make_weights(), KS, method, seed=4, svd="exact", progress=False)
        assert as_lists(got) == as_lists(reference(method)), method
    assert capsys.readouterr().err == ""


def test_progress_is_reported_on_stderr(capsys):
    select_skeletons(make_weights(), KS, "norm", progress=True)
    assert "skeleton selection: 5/5 layers" in capsys.readouterr().err


def test_requests_are_checked_before_any_work():
    with pytest.raises(ValueError, match=r"no k given.*a\.q"):
        select_skeletons(make_weights(), {n: k for n, k in KS.items() if n != "a.q"})
    with pytest.raises(ValueError, match=r"b\.tiny: k=7.*\[1, 6\]"):
        select_skeletons(make_weights(), dict(KS, **{"b.tiny": 7}))


# ---------------------------------------------------------------------------------------------
# Real process groups


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    try:
        _run_worker(rank, world, port, Path(out_dir))
    except BaseException:
        # mp.spawn shows only the exception; the traceback is what makes a failure readable.
        traceback.print_exc()
        raise


def _run_worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    full_mesh = init_device_mesh("cpu", (world,))
    # Two independent 2-rank groups ({0,1} and {2,3}), and four 1-rank groups, in the same launch.
    pair_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pair", "member"))["member"]
    solo_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("all", "solo"))["solo"]

    _track_full_matrices()
    fulls = make_weights()
    for label, mesh in (("world4", full_mesh), ("world2", pair_mesh), ("world1", solo_mesh)):
        sharded = {n: distribute_tensor(w, mesh, [Shard(0)]) for n, w in fulls.items()}
        if label == "world4":  # uneven shards really are there
            assert sharded["b.tiny"].to_local().shape[0] == (0 if rank == 3 else 2)
        results = {}
        for method in METHODS:
            got = select_skeletons(sharded, KS, method, seed=4, svd="exact", progress=False)
            assert as_lists(got) == as_lists(reference(method)), (label, method)
            results[method] = as_lists(got)
        # Column shards, replicated and plain (full-copy) weights mixed in one call.
        mixed = {n: distribute_tensor(w, mesh, [Shard(1)]) for n, w in fulls.items()}
        mixed["a.q"] = distribute_tensor(fulls["a.q"], mesh, [Replicate()])
        mixed["b.wide"] = fulls["b.wide"]
        got = select_skeletons(mixed, KS, "deim", seed=4, svd="exact", process_group=mesh.get_group(),
                               progress=False)
        assert as_lists(got) == as_lists(reference("deim")), (label, "mixed placements")
        (out_dir / f"{label}.rank{rank}.json").write_text(json.dumps(results))

    # A bad layer fails on every rank with the owner's message, instead of hanging the others.
    poisoned = dict(fulls, **{"a.up": torch.full(SHAPES["a.up"], float("nan"))})
    sharded = {n: distribute_tensor(w, full_mesh, [Shard(0)]) for n, w in poisoned.items()}
    try:
        select_skeletons(sharded, KS, "deim", progress=False)
    except ValueError as e:
        assert "a.up" in str(e) and "non-finite" in str(e), str(e)
    else:
        raise AssertionError("a NaN weight was accepted")

    dist.barrier()
    dist.destroy_process_group()


def _track_full_matrices() -> None:
    """Fail if a rank is handed a gathered full matrix while it still references an earlier one:
    the design promises one full matrix per rank at a time."""
    import pmss_dist.adapters.distributed_selection as ds

    gather, alive = ds.gather_to_owner, []

    def tracked(w, placement, *args):
        full = gather(w, placement, *args)
        if full is not None and placement != "full":
            assert all(ref() is None for ref in alive), "an earlier full matrix is still alive"
            alive.append(weakref.ref(full))
        return full

    ds.gather_to_owner = tracked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_selection_equals_single_process_on_4_2_and_1_ranks(tmp_path):
    mp.spawn(_worker, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=True)
    expected = {m: as_lists(reference(m)) for m in METHODS}
    for label in ("world4", "world2", "world1"):
        for rank in range(4):
            got = json.loads((tmp_path / f"{label}.rank{rank}.json").read_text())
            assert got == expected, (label, rank)

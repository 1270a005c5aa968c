"""The data-parallel mesh: dp_replicate x dp_shard. Every layout trains the model one process
trains (the same losses, the same cores, bit-identical on every rank), holds 1/dp_shard of the
frozen base per rank, and resumes a checkpoint written on another layout; bad settings fail with
the numbers named."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import FAST, FULL, probe, run_job, summary
from pmss_dist.config import ConfigError, ParallelConfig
from pmss_dist.parallel.mesh import REPLICATE, SHARD, ParallelDims
from pmss_dist.plan.fake import fake_world

GIB = 2**30


@pytest.mark.parametrize("settings,world,local,model_gib,expected", [
    (dict(), 8, 8, 1, (1, 8)),  # one node: shard over it, as before meshes had two dimensions
    (dict(), 64, 8, 1, (8, 8)),  # 8 nodes: shard within each, replicate across (HSDP)
    (dict(), 64, 8, 500, (4, 16)),  # 500 GiB: 62 GiB per rank on one node, 31 on two: 2 nodes a copy
    (dict(), 64, 8, 5000, (1, 64)),  # fits nowhere: shard over every rank
    (dict(dp_shard=1), 8, 8, 1, (8, 1)),  # a replicated base
    (dict(dp_replicate=2), 16, 8, 1, (2, 8)),
    (dict(dp_shard=4, dp_replicate=2), 8, 8, 1, (2, 4)),
])
def test_shape_resolution(settings, world, local, model_gib, expected):
    parallel = ParallelConfig(**settings)
    # 80 GiB per rank, of which SHARD_MEMORY_FRACTION (half) may hold the frozen shard
    dims = ParallelDims.resolve(parallel, world, local, model_gib * GIB, 80 * GIB)
    assert (dims.replicate, dims.shard, dims.world_size) == (*expected, world)
    assert (dims.replicated, dims.sharded) == (expected[0] > 1, expected[1] > 1)


@pytest.mark.parametrize("settings,needle", [
    (dict(dp_shard=4, dp_replicate=4), r"dp_replicate \(4\) x parallel.dp_shard \(4\) = 16.*world size is 8"),
    (dict(dp_shard=5), r"parallel.dp_shard=5 does not divide the world size 12"),
    (dict(dp_shard=6), r"parallel.dp_shard=6 neither divides a node \(4 processes per node\)"),
])
def test_bad_shapes_name_the_numbers(settings, needle):
    world = 8 if "dp_replicate" in settings else 12
    with pytest.raises(ConfigError, match=needle):
        ParallelDims.resolve(ParallelConfig(**settings), world, 4, GIB, 80 * GIB)


@pytest.mark.parametrize("replicate,shard,world", [(2, 2, 8), (3, 1, 2), (1, 4, 2)])
def test_dims_that_do_not_multiply_to_the_world_are_refused_in_one_line(replicate, shard, world):
    with pytest.raises(ConfigError) as err:
        ParallelDims(replicate, shard, world)
    assert str(err.value) == (f"parallel.dp_replicate ({replicate}) x parallel.dp_shard ({shard}) = "
                              f"{replicate * shard}, but the world size is {world}: make their product the "
                              f"number of processes")


def ranks(mesh) -> list:
    return mesh.mesh.tolist()


def test_meshes_are_named_and_cover_the_world():
    with fake_world(8):  # rank 0 of 8, in this process
        hsdp = ParallelDims(2, 4, 8).build_mesh("cpu")
        assert hsdp.mesh_dim_names == (REPLICATE, SHARD) and ranks(hsdp) == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert ranks(hsdp[SHARD]) == [0, 1, 2, 3] and ranks(hsdp[REPLICATE]) == [0, 4]
        # one copy: FSDP over a 1-D mesh, no replicate dimension for HSDP to reduce over
        fsdp = ParallelDims(1, 8, 8).build_mesh("cpu")
        assert fsdp.mesh_dim_names == (SHARD,) and ranks(fsdp[SHARD]) == list(range(8))
        # selection's and evaluation's flat view: every rank in one shard group
        flat = ParallelDims.flat(8)
        assert (flat.replicate, flat.shard, flat.world_size) == (1, 8, 8)
        assert flat.build_mesh("cpu").mesh_dim_names == (SHARD,) and ranks(flat.build_mesh("cpu")) == list(range(8))


def test_training_shards_nothing_on_a_replicated_frozen_base():
    with fake_world(4):
        replicated = ParallelDims(4, 1, 4)
        assert replicated.training_mesh("cpu", full_finetune=False) is None
        full = replicated.training_mesh("cpu", full_finetune=True)  # FSDP2 reduces the trained weights' grads
        assert full.mesh_dim_names == (REPLICATE, SHARD) and full.shape == (4, 1)
        assert ParallelDims(2, 2, 4).training_mesh("cpu", full_finetune=False).shape == (2, 2)


# -- real processes ------------------------------------------------------------------------------

# The 4-rank runs besides the session's four_rank_probe, which is the 1x4 mesh (dp_shard=auto on one
# node of 4). 2x2 also writes the step-4 checkpoint that the resume test below starts from.
MESHES = {"2x2": ["parallel.dp_shard=2", "checkpoint.every_steps=4"], "4x1": ["parallel.dp_shard=1"]}


@pytest.fixture(scope="module")
def mesh_runs(four_rank_probe, tmp_path_factory):
    """Each mesh's run, made once: ``mesh_runs("2x2")``."""
    root, runs = tmp_path_factory.mktemp("mesh"), {"1x4": four_rank_probe}

    def run(mesh: str) -> dict:
        if mesh not in runs:
            # data.micro_batch_size=2: two micro-batches of accumulation on each of the 4 ranks.
            runs[mesh] = probe(4, root / mesh, "data.micro_batch_size=2", *MESHES[mesh])
        return runs[mesh]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x4", "2x2", "4x1"])
def test_every_mesh_trains_the_one_process_model(one_process_probe, mesh_runs, mesh):
    result = mesh_runs(mesh)
    torch.testing.assert_close(torch.tensor(result["summary"]["losses"]),
                               torch.tensor(one_process_probe["summary"]["losses"]), rtol=1e-5, atol=1e-5)
    reference = one_process_probe["ranks"][0]["tensors"]
    for rank in result["ranks"]:
        for name, core in rank["tensors"].items():
            assert torch.equal(core, result["ranks"][0]["tensors"][name]), name  # replicated over the world
            torch.testing.assert_close(core, reference[name], rtol=1e-4, atol=1e-6)
    total = int(one_process_probe["ranks"][0]["meta"]["frozen_bytes"])
    dp_shard = int(mesh.split("x")[1])
    per_rank = [int(r["meta"]["frozen_bytes"]) for r in result["ranks"]]
    assert sum(per_rank) == total * 4 // dp_shard  # dp_replicate copies of the base in all
    assert max(per_rank) <= total / dp_shard * 1.05  # each rank: its shard, up to odd dimensions


@pytest.mark.slow
def test_full_finetuning_on_a_2x2_mesh_trains_the_one_process_model(full_one_process, tmp_path):
    run_job(4, [*FULL, f"output_dir={tmp_path}", "data.micro_batch_size=2", "parallel.dp_shard=2"])
    torch.testing.assert_close(torch.tensor(summary(tmp_path)["losses"]),
                               torch.tensor(summary(full_one_process)["losses"]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_of_a_2x2_mesh_resumes_on_1x4_and_on_one_process(mesh_runs, tmp_path):
    whole = mesh_runs("2x2")
    for nproc, mesh in ((4, "parallel.dp_shard=4"), (1, "parallel.dp_shard=auto")):
        out = tmp_path / f"resumed-{nproc}"
        out.mkdir()
        shutil.copytree(whole["out"] / "checkpoints" / "step_000004", out / "checkpoints" / "step_000004")
        proc = run_job(nproc, [*FAST, "data.micro_batch_size=2", "checkpoint.every_steps=4", f"output_dir={out}", mesh])
        assert "at step 4" in proc.stderr
        torch.testing.assert_close(torch.tensor(summary(out)["losses"]), torch.tensor(whole["summary"]["losses"]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bad_mesh_fails_before_training_with_the_numbers(tmp_path):
    proc = run_job(2, [*FAST, f"output_dir={tmp_path}", "parallel.dp_shard=2", "parallel.dp_replicate=2"],
                   check=False, timeout=120)
    assert proc.returncode != 0
    assert "parallel.dp_replicate (2) x parallel.dp_shard (2) = 4, but the world size is 2" in proc.stderr

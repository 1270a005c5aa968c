"""The trainer on 1, 2 and 4 real processes (gloo): parity, replicated cores, sharded base,
fail-fast configs, TensorBoard output."""

import json
import subprocess

import pytest
import torch

from conftest import FAST, REPO, job_env, probe, run_direct, run_job, torchrun_cmd

pytestmark = pytest.mark.slow  # torchrun jobs


def assert_trains_the_one_process_model(result: dict, one_process: dict, nproc: int) -> None:
    ref_losses = one_process["summary"]["losses"]
    assert result["summary"]["world_size"] == nproc
    torch.testing.assert_close(torch.tensor(result["summary"]["losses"]), torch.tensor(ref_losses),
                               rtol=1e-5, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    ref_cores = one_process["ranks"][0]["tensors"]
    for rank in result["ranks"]:
        assert set(rank["tensors"]) == set(ref_cores)
        for name, core in rank["tensors"].items():
            # replicated: bit-identical on every rank, and equal to the 1-process result
            assert torch.equal(core, result["ranks"][0]["tensors"][name]), name
            torch.testing.assert_close(core, ref_cores[name], rtol=1e-4, atol=1e-6)
        assert rank["meta"]["frozen_changed"] == "0"
    assert any(c.abs().sum() > 0 for c in ref_cores.values())  # training moved the cores


@pytest.mark.parametrize("extra", [
    ["data.micro_batch_size=8", "parallel.reshard_after_forward=true"],  # no accumulation
    ["data.micro_batch_size=4", "parallel.compile=true", "parallel.activation_checkpointing=selective"],
    ["data.micro_batch_size=4", "parallel.activation_checkpointing=full"],
], ids=["n2", "n2-compile-selectiveac", "n2-fullac"])
def test_parity_with_single_process(one_process_probe, session_tmp, extra):
    result = probe(2, session_tmp / f"n2-{'-'.join(extra)}".replace("=", "_"), *extra)
    assert_trains_the_one_process_model(result, one_process_probe, 2)


def test_parity_with_single_process_on_4_ranks_with_accumulation(one_process_probe, four_rank_probe):
    assert_trains_the_one_process_model(four_rank_probe, one_process_probe, 4)


def test_frozen_base_bytes_fall_as_one_over_n(one_process_probe, four_rank_probe):
    # The 4-rank run above: what a rank holds of the frozen base does not depend on micro-batching.
    total = int(one_process_probe["ranks"][0]["meta"]["frozen_bytes"])
    per_rank = [int(r["meta"]["frozen_bytes"]) for r in four_rank_probe["ranks"]]
    assert sum(per_rank) == total
    assert max(per_rank) <= total / 4 * 1.05  # even shards up to rounding of odd dims


@pytest.mark.parametrize("override,needle", [
    ("adapter.rnk=3", "unknown config key adapter.rnk"),
    ("optim.lr=fast", "optim.lr must be float"),
    ("adapter.rank=1000", "adapter.rank=1000 is larger than layer"),
    ("data.micro_batch_size=16", "not divisible by data.micro_batch_size (16) x world size (2)"),
])
def test_bad_config_fails_fast_on_every_rank(session_tmp, override, needle):
    proc = run_job(2, [*FAST, f"output_dir={session_tmp / 'bad'}", override], timeout=120, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr


def test_tensorboard_scalars_written(one_process_probe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(one_process_probe["out"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s",
            "perf/tokens_per_s_per_device"} <= tags
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    losses = one_process_probe["summary"]["losses"]
    assert sorted(logged) == [4, 8]
    for step, value in logged.items():
        assert value == pytest.approx(losses[step - 1], rel=1e-6)


def test_summary_and_outputs(one_process_probe):
    out = one_process_probe["out"]
    s = one_process_probe["summary"]
    assert {"initial_loss", "final_loss", "steps", "trainable_params", "total_params", "world_size"} <= set(s)
    assert s["steps"] == 8 and s["completed"]
    assert s["trainable_params"] == 28 * 8 * 8  # 4 layers x 7 projections x k^2
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["max_steps"] == 8 and resolved["adapter"]["rank"] == 8
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert (out / "selection.json").is_file()
    manifest = json.loads((out / "checkpoints" / "step_000008" / "manifest.json").read_text())
    assert manifest["extra"]["config"] == resolved
    assert manifest["extra"]["selection"] == json.loads((out / "selection.json").read_text())


def test_selection_tool_on_two_ranks_writes_the_runs_selection(one_process_probe, session_tmp):
    # The standalone tool (2 ranks) and the 1-process training run select the same skeletons,
    # and the run accepts the tool's file as adapter.selection_file.
    out = one_process_probe["out"]
    sel = session_tmp / "tool-selection.json"
    proc = subprocess.run(torchrun_cmd(2, "-m", "pmss_dist.cli.select")
                          + ["--hf", str(out / "base_model"), "--k", "8", "--dtype", "float32", "--out", str(sel)],
                          capture_output=True, text=True, timeout=300, env=job_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tool, run = json.loads(sel.read_text()), json.loads((out / "selection.json").read_text())
    assert tool == run
    reuse = run_direct([*FAST, f"output_dir={session_tmp / 'reuse'}", f"adapter.selection_file={sel}", "max_steps=1"],
                       check=True)
    assert "reusing skeleton selection" in reuse.stderr

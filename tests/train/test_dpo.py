"""objective.kind=dpo on the trainer: the step against TRL and a brute-force DPO, the reference
model equal to the base bit for bit, the same losses on 1, 2 and 4 processes, resume, the metrics
TRL users know, and what a dpo run refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, TINY_CONFIG, job_env, probe, run_direct, run_job, summary
from pmss_dist.adapters.layers import adapters_off, assign_skeletons
from pmss_dist.build import build_model
from pmss_dist.config import adapter_spec, load_config
from pmss_dist.eval.preference import PreferenceLoss
from pmss_dist.hf.export import export_peft
from pmss_dist.hf.load import original_weights, read_model_spec
from pmss_dist.models.builtin import write_tiny_checkpoint

WORKER = REPO / "tests" / "train" / "dpo_worker.py"
TRL_CHECK = REPO / "tests" / "trl_dpo_check.py"
# FAST on one global batch of pairs, seen every step: the loss on it must fall at every step.
DPO = [*FAST, "objective.kind=dpo", "optim.lr=3e-2", "optim.warmup_steps=0", "data.num_samples=16"]


def dpo_step(tmp_path, *overrides: str) -> dict:
    """tests/train/dpo_worker.py's step and its brute force, with the files it wrote."""
    out = tmp_path / "worker"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(WORKER), "--config", str(TINY_CONFIG), str(out),
                           *DPO, f"output_dir={out / 'run'}", *overrides],
                          capture_output=True, text=True, timeout=300, env=job_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, **load_file(str(out / "step.safetensors"))}


def grads(step: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in step.items() if k.startswith(prefix)}


@pytest.mark.parametrize("overrides", [
    [],
    ["objective.loss=ipo", "objective.beta=0.5"],
    ["objective.label_smoothing=0.2"],
    ["adapter.kind=lora"],
], ids=["pmss-sigmoid", "pmss-ipo", "pmss-smoothed", "lora"])
def test_the_step_equals_a_brute_force_dpo(tmp_path, overrides):
    # The brute force scores the reference with a second model built from the base's files with no
    # adapter at all, and writes the loss out; the trainer's step switches its adapters off.
    step = dpo_step(tmp_path, *overrides)
    torch.testing.assert_close(step["sums"], step["brute.sums"], rtol=1e-5, atol=1e-5)  # fp32 against fp64
    ours, brute = grads(step, "grad."), grads(step, "brute.grad.")
    assert ours.keys() == brute.keys() and ours
    for name, g in ours.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, brute[name], rtol=1e-4, atol=1e-4 * float(brute[name].abs().max()), msg=name)


@pytest.fixture(scope="module")
def trl_python():
    python = os.environ.get("PMSS_PEFT_PYTHON")
    if not python or subprocess.run([python, "-c", "import trl"], capture_output=True).returncode:
        pytest.skip("PMSS_PEFT_PYTHON is unset or has no trl: tools/run_tests.sh creates the venv with trl")
    return python


def trl_step(python: str, step: dict, loss: str, beta: float) -> dict:
    out = step["out"]
    base = out / "run" / "base_model"
    export_peft(out / "adapter", base, out / "peft")
    proc = subprocess.run([python, str(TRL_CHECK), "--base", str(base), "--adapter", str(out / "peft"),
                           "--batch", str(out / "step.safetensors"), "--loss", loss, "--beta", str(beta),
                           "--out", str(out / "trl.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "trl.safetensors"))


def assert_metrics_match(trl: dict, step: dict) -> None:
    means = (step["sums"] / step["targets"]).tolist()
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"]
    ours = dict(zip(names, means)) | {"rewards/margins": means[1] - means[2]}
    theirs = {"loss": float(trl["loss"])} | {k.removeprefix("metric."): float(v) for k, v in trl.items()
                                              if k.startswith("metric.")}
    for name, value in ours.items():
        assert theirs[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert abs(ours["rewards/chosen"]) + abs(ours["rewards/rejected"]) > 1e-4  # the adapter is not at its start


@pytest.mark.parametrize("loss,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_lora_matches_trl_with_peft(tmp_path, trl_python, loss, beta):
    # adapter.alpha = adapter.rank: the PEFT export's scale folding is then the identity, so the
    # PEFT export of our gradients is what TRL's gradients must be.
    step = dpo_step(tmp_path, "adapter.kind=lora", "adapter.alpha=8.0", f"objective.loss={loss}",
                    f"objective.beta={beta}")
    trl = trl_step(trl_python, step, loss, beta)
    assert_metrics_match(trl, step)
    out = step["out"]
    export_peft(out / "grads_adapter", out / "run" / "base_model", out / "peft_grads")
    expected = load_file(str(out / "peft_grads" / "adapter_model.safetensors"))
    theirs = {k.removeprefix("grad."): v for k, v in trl.items() if k.startswith("grad.")}
    assert theirs.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(theirs[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()), msg=name)


def test_pmss_matches_trl_on_its_peft_export(tmp_path, trl_python):
    # TRL scores our PMSS update expressed as a LoRA (pmss-export --peft): loss and metrics. Its
    # gradients are the LoRA factors', not the core's: the core's are checked by the brute force.
    step = dpo_step(tmp_path)
    assert_metrics_match(trl_step(trl_python, step, "sigmoid", 0.1), step)


def test_label_smoothing_is_torchtunes_conservative_dpo():
    tt = pytest.importorskip("torchtune.rlhf.loss")
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(32, generator=gen) * 3 for _ in range(4))
    for smoothing in (0.0, 0.1, 0.3):
        expected, _, _ = tt.DPOLoss(beta=0.2, label_smoothing=smoothing)(pc, pr, rc, rr)
        ours = PreferenceLoss("sigmoid", 0.2, smoothing).per_pair(pc - rc, pr - rr, torch.ones(32), torch.ones(32))
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("kind,quantize", [("pmss", "none"), ("lora", "none"), ("pmss", "nf4"), ("lora", "int8")])
def test_the_reference_is_the_base_bit_for_bit(tmp_path, kind, quantize):
    # A quantized run's reference is its base as stored (quantized), as TRL's with a QLoRA model.
    base = write_tiny_checkpoint(tmp_path / "base", seed=0)
    spec = read_model_spec(base)
    cfg = load_config(TINY_CONFIG, [f"adapter.kind={kind}", "model.dtype=float32", f"model.quantize={quantize}"])
    tokens = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))

    def model(adapter):
        built = build_model(spec, adapter=adapter, mesh=None, device=torch.device("cpu"), dtype=torch.float32,
                            weights=base, max_seq_len=32)
        if adapter is not None and kind == "pmss":  # a quantized base is selected on its original weights
            assign_skeletons(built, "deim", original=original_weights(built, base, spec) if quantize != "none" else None)
        return built.eval()

    plain, adapted = model(None), model(adapter_spec(cfg))
    with torch.no_grad():
        untrained = adapted(tokens)
        gen = torch.Generator().manual_seed(1)
        for p in adapted.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
        trained = adapted(tokens)
        with adapters_off(adapted):
            off = adapted(tokens)
        again = adapted(tokens)
        no_adapter = plain(tokens)
    assert not torch.equal(trained, untrained)
    assert torch.equal(off, untrained)
    assert torch.equal(off, no_adapter) == (quantize == "none")
    assert torch.equal(again, trained)  # switched back on


@pytest.fixture(scope="module")
def dpo_one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dpo") / "n1"
    return probe(1, out, overrides=[*DPO, "log.log_every=1"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc,extra", [
    (2, ["data.micro_batch_size=4", "parallel.compile=true", "parallel.activation_checkpointing=selective"]),
    (2, ["data.micro_batch_size=2", "parallel.activation_checkpointing=full", "parallel.reshard_after_forward=true"]),
    (4, ["data.micro_batch_size=2", "parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    (4, ["data.micro_batch_size=4", "parallel.dp_shard=4", "adapter.kind=lora"]),
    (2, ["data.micro_batch_size=2", "objective.precompute_reference=true"]),
], ids=["n2-compile-selectiveac", "n2-fullac", "n4-2x2", "n4-1x4-lora", "n2-precomputed"])
def test_losses_do_not_depend_on_the_process_count(tmp_path, dpo_one_process, nproc, extra):
    reference = dpo_one_process
    if "adapter.kind=lora" in extra:
        reference = probe(1, tmp_path / "n1-lora", overrides=[*DPO, "log.log_every=1", "adapter.kind=lora"])
    result = probe(nproc, tmp_path / "n", overrides=[*DPO, "log.log_every=1", *extra])
    torch.testing.assert_close(torch.tensor(result["summary"]["losses"]), torch.tensor(reference["summary"]["losses"]),
                               rtol=1e-5, atol=1e-6)
    for name, t in result["ranks"][0]["tensors"].items():  # Adam's first steps magnify rounding near 0
        ref = reference["ranks"][0]["tensors"][name]
        torch.testing.assert_close(t, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()), msg=lambda m: f"{name}: {m}")
    assert all(r["meta"]["frozen_changed"] == "0" for r in result["ranks"])


def test_a_run_learns_the_pairs_and_logs_trls_metrics(dpo_one_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = dpo_one_process["summary"]
    assert s["objective"] == "dpo" and s["losses"][0] == pytest.approx(0.693147, abs=1e-5)  # ln 2: policy = reference
    assert all(b < a for a, b in zip(s["losses"], s["losses"][1:])) and s["losses"][-1] < s["losses"][0] - 0.01
    acc = EventAccumulator(str(dpo_one_process["out"] / "tensorboard"))
    acc.Reload()
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
    assert {f"train/{n}" for n in names} <= set(acc.Tags()["scalars"])
    last = {n: acc.Scalars(f"train/{n}")[-1].value for n in names}
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], rel=1e-4)
    assert last["rewards/accuracies"] > 0.5 and last["rewards/margins"] > 0


def test_a_precomputed_reference_gives_the_same_run(tmp_path, dpo_one_process):
    # The reference scores of a start-up pass over the pairs, against those the steps compute.
    result = probe(1, tmp_path / "pre", overrides=[*DPO, "log.log_every=1", "objective.precompute_reference=true"])
    assert result["summary"]["losses"] == dpo_one_process["summary"]["losses"]
    for name, t in result["ranks"][0]["tensors"].items():
        assert torch.equal(t, dpo_one_process["ranks"][0]["tensors"][name]), name


def test_precompute_reference_on_an_sft_run_ends_in_one_line(tmp_path):
    proc = run_direct([*FAST, "objective.precompute_reference=true", f"output_dir={tmp_path / 'sft'}"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "objective.precompute_reference" in line]
    assert len(lines) == 1 and "objective.kind=dpo only" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["objective.precompute_reference=true"]], ids=["", "precomputed"])
def test_a_run_killed_mid_run_resumes_to_the_same_run(tmp_path, dpo_one_process, extra):
    out = tmp_path / "resumed"
    overrides = [*DPO, "log.log_every=1", f"output_dir={out}", "checkpoint.every_steps=3", *extra]
    kill = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "faults"), str(REPO / "src")]),
            "PMSS_KILL_AT": "pmss_dist.train.trainer:train_step:6", "PMSS_KILL_RANK": "0"}
    assert run_job(1, overrides, check=False, **kill).returncode != 0
    assert not (out / "summary.json").exists() and (out / "checkpoints").is_dir()
    run_job(1, overrides)
    assert summary(out)["losses"] == pytest.approx(dpo_one_process["summary"]["losses"], rel=1e-6, abs=1e-7)
    ours = load_file(str(out / "adapter" / "adapter.safetensors"))
    theirs = load_file(str(dpo_one_process["out"] / "adapter" / "adapter.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=1e-5, atol=1e-7)


def test_dpo_on_full_fine_tuning_ends_in_one_line(tmp_path):
    proc = run_direct([*DPO, "adapter.kind=full", f"output_dir={tmp_path / 'full'}"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "adapter.kind=full" in line]
    assert len(lines) == 1 and "use adapter.kind pmss or lora" in lines[0]
    assert not (tmp_path / "full").exists()


def test_bad_pairs_stop_the_run_naming_the_row(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n"
                    + json.dumps({"prompt": "1+2=", "chosen": "3", "rejected": "3"}) + "\n")
    proc = run_direct([*DPO, f"data.source={data}", f"output_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert f"{data}:2" in proc.stderr and "chosen and rejected are the same response" in proc.stderr

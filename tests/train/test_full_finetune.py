"""Full fine-tuning (``adapter.kind: full``), the ceiling the adapters are compared with: the
sharded weights themselves train. Parity across world sizes, every weight moves, resume, and the
exported HF checkpoint is the trained model as transformers sees it."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors.torch import load_file, save_file

from conftest import FULL, run_direct, run_job, summary
from pmss_dist.models.builtin import write_tiny_checkpoint
from pmss_dist.hf.load import read_model_spec
from pmss_dist.hf.export import ExportError, export_full
from pmss_dist.models import build_decoder

pytestmark = pytest.mark.slow  # torchrun jobs

# The one-process reference is conftest.py's full_one_process, which tests/parallel/test_mesh.py
# compares a 2x2 mesh with too.


@pytest.fixture(scope="module")
def sharded(session_tmp) -> Path:
    # 2 ranks, 2 micro-batches each, blocks resharded after forward and fully recomputed in backward.
    out = session_tmp / "full-n2"
    run_job(2, [*FULL, f"output_dir={out}", "data.micro_batch_size=4", "parallel.reshard_after_forward=true",
                "parallel.activation_checkpointing=full"])
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "merged" / "model.safetensors"))


def grad_norms(run: Path) -> torch.Tensor:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return torch.tensor([e.value for e in acc.Scalars("train/grad_norm")])


def test_two_ranks_train_the_same_model_as_one(full_one_process, sharded):
    torch.testing.assert_close(torch.tensor(summary(sharded)["losses"]),
                               torch.tensor(summary(full_one_process)["losses"]), rtol=1e-5, atol=1e-5)
    # Adam and clipping hide a gradient off by a constant factor; the logged norm does not.
    # FSDP2 averages sharded gradients by default, which would halve it on 2 ranks.
    torch.testing.assert_close(grad_norms(sharded), grad_norms(full_one_process), rtol=1e-5, atol=1e-6)
    ref = weights(full_one_process)
    for key, value in weights(sharded).items():
        torch.testing.assert_close(value, ref[key], rtol=1e-4, atol=1e-6, msg=key)


def test_every_weight_trains(full_one_process):
    s = summary(full_one_process)
    assert s["trainable_params"] == s["total_params"] and s["adapter"] == "full"
    assert s["final_loss"] < s["initial_loss"]
    assert not (full_one_process / "adapter").exists()
    base = load_file(str(full_one_process / "base_model" / "model.safetensors"))
    trained = weights(full_one_process)
    assert set(trained) == set(base)
    for key, value in trained.items():  # norms and embeddings included
        assert value.dtype == base[key].dtype and value.shape == base[key].shape
        assert not torch.equal(value, base[key]), f"{key} did not change"


def test_export_is_the_trained_model_in_transformers(full_one_process):
    # The reference: our torchtune model holding the final checkpoint's tensors as they were
    # trained (torchtune layout, read straight from DCP); transformers loads the export.
    ckpt = full_one_process / "checkpoints" / "step_000008"
    model = build_decoder(read_model_spec(full_one_process / "base_model"))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    toks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(toks)
        hf = transformers.AutoModelForCausalLM.from_pretrained(full_one_process / "merged", dtype=torch.float32).eval()
        theirs = hf(toks).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_resume_from_the_middle_reproduces_the_run(sharded, session_tmp):
    out = session_tmp / "full-resumed"
    shutil.copytree(sharded, out)
    for name in ("merged", "checkpoints/step_000008", "summary.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "checkpoints" / "latest").write_text("step_000004")
    proc = run_job(2, [*FULL, f"output_dir={out}", "data.micro_batch_size=4", "parallel.reshard_after_forward=true",
                       "parallel.activation_checkpointing=full"])
    assert "resumed from" in proc.stderr and "step_000004" in proc.stderr
    torch.testing.assert_close(torch.tensor(summary(out)["losses"]), torch.tensor(summary(sharded)["losses"]),
                               rtol=1e-6, atol=1e-6)
    ref = weights(sharded)
    for key, value in weights(out).items():
        torch.testing.assert_close(value, ref[key], rtol=1e-6, atol=1e-7, msg=key)


def test_export_tool_on_an_unfinished_full_run(full_one_process, session_tmp, capsys):
    from pmss_dist.cli.export import main as export  # the tool, in this process

    out = session_tmp / "full-unfinished"
    shutil.copytree(full_one_process, out)
    shutil.rmtree(out / "merged")
    (out / "summary.json").unlink()
    (out / "config.json").unlink()
    exported = session_tmp / "full-unfinished-exported"  # outside the run: an export never writes into its input
    assert export(["--run", str(out), "--out", str(exported)]) == 0
    assert "exporting its checkpoint step_000008" in capsys.readouterr().err
    assert (exported / "model.safetensors").read_bytes() == \
        (full_one_process / "merged" / "model.safetensors").read_bytes()
    assert export(["--run", str(full_one_process), "--out", str(session_tmp / "full-peft"), "--peft"]) == 2
    assert "is a full fine-tuning run (adapter.kind: full): it has no adapter" in capsys.readouterr().err


def test_export_full_refuses_what_is_not_its_checkpoint(full_one_process, one_process_probe, session_tmp):
    adapter_run = one_process_probe["out"]  # a PMSS run of the session, its final checkpoint
    with pytest.raises(ExportError, match="is a checkpoint of a pmss run, not of full fine-tuning"):
        export_full(adapter_run / "checkpoints" / "step_000008", adapter_run / "base_model", session_tmp / "x")
    ckpt = full_one_process / "checkpoints" / "step_000008"
    # A base it was not trained on: refused by fingerprint, and (check skipped) by its tensors.
    other = session_tmp / "full-other-base"
    shutil.copytree(full_one_process / "base_model", other)
    base = load_file(str(other / "model.safetensors"))
    save_file({**base, "model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}, str(other / "model.safetensors"))
    with pytest.raises(ExportError, match="was trained on a base with fingerprint"):
        export_full(ckpt, other, session_tmp / "y")
    with pytest.raises(ExportError, match=r"does not hold the weights of .*\['model.layers.0.self_attn.q_proj.bias'\] "
                                          "have no place"):
        export_full(ckpt, other, session_tmp / "y", check_base=False)
    assert not (session_tmp / "y").exists()  # refused before anything was written


def test_tied_base_keeps_its_lm_head_copy_and_derived_tensors(session_tmp):
    # Some tied checkpoints carry lm_head.weight (a copy of the embedding) and old Llama saves carry
    # RoPE inv_freq: the export must keep the copy equal to the trained embedding and leave the
    # derived tensor as it was.
    base = write_tiny_checkpoint(session_tmp / "tied-base", seed=1, tie_word_embeddings=True)
    tensors = load_file(str(base / "model.safetensors"))
    inv_freq = torch.arange(16, dtype=torch.float32)
    tensors.update({"lm_head.weight": tensors["model.embed_tokens.weight"].clone(),
                    "model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq})
    save_file(tensors, str(base / "model.safetensors"))
    out = session_tmp / "full-tied"
    run_direct([*FULL, "max_steps=2", f"model.path={base}", f"output_dir={out}"], check=True)
    exported = weights(out)
    assert not torch.equal(exported["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])
    assert torch.equal(exported["model.layers.0.self_attn.rotary_emb.inv_freq"], inv_freq)

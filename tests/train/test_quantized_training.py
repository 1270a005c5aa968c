"""Training on a quantized frozen base (``model.quantize: nf4 | int8``): every mesh trains the
one-process model, each rank holds its share of the quantized bytes, the skeletons are those of
the unquantized model, the merged export folds the cores into the weights as the run stored
them (the trained model itself; with ``--into-original-weights``, into the original weights), and
a resume across formats is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models.convert_weights import tune_to_hf

from conftest import FAST, probe, run_direct, run_job
from pmss_dist.adapters.io import load_adapter_state, read_adapter
from pmss_dist.adapters.layers import AdapterSpec, merge_adapters
from pmss_dist.build import build_model
from pmss_dist.cli.export import main as export_main
from pmss_dist.eval.model import load_eval_model
from pmss_dist.hf.export import EXPORT_RECORD, ORIGINAL_WEIGHTS
from pmss_dist.hf.load import read_model_spec
from pmss_dist.models.builtin import write_tiny_checkpoint
from pmss_dist.train.run_dir import RunDir

pytestmark = pytest.mark.slow

# Wide enough that NF4 splits every projection over two ranks in whole double-quantization blocks.
BASE_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2)
# format, mesh -> (processes, settings). 2x2 accumulates too (two micro-batches a rank); 2x1 is a
# replicated quantized base; "1x2+compile" adds torch.compile and selective AC.
CASES = {
    ("nf4", "1x2"): (2, ["parallel.dp_shard=2"]),
    ("nf4", "2x2"): (4, ["parallel.dp_shard=2", "data.micro_batch_size=2"]),
    ("nf4", "2x1"): (2, ["parallel.dp_shard=1"]),
    ("nf4", "1x2+compile"): (2, ["parallel.dp_shard=2", "parallel.compile=true",
                                 "parallel.activation_checkpointing=selective"]),
    ("int8", "1x2"): (2, ["parallel.dp_shard=2"]),
    ("int8", "2x2"): (4, ["parallel.dp_shard=2", "data.micro_batch_size=2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    base = write_tiny_checkpoint(root / "base", seed=0, **BASE_SHAPE)
    overrides = [*FAST, f"model.path={base}"]
    out = {"root": root, "base": base, "overrides": overrides,
           "none": probe(1, root / "none", overrides=overrides)}
    for fmt in ("nf4", "int8"):
        out[fmt] = probe(1, root / fmt, f"model.quantize={fmt}", overrides=overrides)
    return out


@pytest.mark.parametrize("fmt,mesh", list(CASES), ids=[f"{f}-{m}" for f, m in CASES])
def test_every_mesh_trains_the_one_process_quantized_model(runs, tmp_path, fmt, mesh):
    nproc, settings = CASES[fmt, mesh]
    out = tmp_path / "run"
    result = probe(nproc, out, f"model.quantize={fmt}", *settings, overrides=runs["overrides"])
    single = runs[fmt]
    compiled = "parallel.compile=true" in settings  # inductor's fused kernels round differently
    tol = dict(rtol=1e-4, atol=1e-4) if compiled else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result["summary"]["losses"]), torch.tensor(single["summary"]["losses"]),
                               **tol)
    for rank in result["ranks"]:
        for name, core in rank["tensors"].items():
            assert torch.equal(core, result["ranks"][0]["tensors"][name]), name
            torch.testing.assert_close(core, single["ranks"][0]["tensors"][name], rtol=1e-3 if compiled else 1e-4,
                                       atol=1e-5 if compiled else 1e-6)
    # each rank holds 1/dp_shard of the quantized base, and nothing frozen moved
    dp_shard = 1 if "parallel.dp_shard=1" in settings else 2
    total = int(single["ranks"][0]["meta"]["frozen_bytes"])
    per_rank = [int(r["meta"]["frozen_bytes"]) for r in result["ranks"]]
    # (NF4's two constants, 68 bytes a weight, are on every rank)
    assert total * nproc // dp_shard <= sum(per_rank) and max(per_rank) <= total / dp_shard * 1.01
    assert all(int(r["meta"]["frozen_changed"]) == 0 for r in result["ranks"])
    # skeletons of the original weights: the unquantized run's, whatever the mesh
    selection = json.loads(RunDir(out).selection.read_text())
    assert selection == json.loads(RunDir(runs["root"] / "none").selection.read_text())


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_run_trains_near_the_unquantized_one(runs, fmt):
    losses, reference = runs[fmt]["summary"]["losses"], runs["none"]["summary"]["losses"]
    assert losses[-1] < 0.97 * losses[0]  # 8 steps: falling
    # The base's quantization error shifts the losses a little, not the run.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=0.05, atol=0)
    assert losses != reference


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_merged_export_is_the_model_the_run_trained(runs, fmt):
    run, base = RunDir(runs["root"] / fmt), runs["base"]
    # The reference: the trainer's own model, its base quantized as it loads, the run's cores on it.
    state, meta = read_adapter(run.adapter)
    spec = AdapterSpec(meta["kind"], tuple(meta["targets"]), int(meta["rank"]), float(meta["alpha"]), fmt)
    model = build_model(read_model_spec(base), adapter=spec, mesh=None, device=torch.device("cpu"),
                        dtype=torch.float32, weights=base)
    load_adapter_state(model, state)
    model.eval()
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(run.merged, torch_dtype=torch.float32)
    tokens = torch.randint(0, hf_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)
    # What the update went into is said by the run and by the export itself.
    merged_into = f"the {fmt} base as trained, dequantized to float32"
    assert run.read_summary()["merged_into"] == merged_into
    assert json.loads((run.merged / EXPORT_RECORD).read_text())["merged_into"] == merged_into
    # pmss-export makes the same files from the run
    again = runs["root"] / f"{fmt}-again"
    assert export_main(["--run", str(run.root), "--out", str(again)]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (run.merged / name).read_bytes(), name


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_into_original_weights_folds_the_cores_into_the_original_weights(runs, tmp_path, fmt):
    run, base = RunDir(runs["root"] / fmt), runs["base"]
    out = tmp_path / "original"
    assert export_main(["--run", str(run.root), "--out", str(out), "--into-original-weights"]) == 0
    assert json.loads((out / EXPORT_RECORD).read_text())["merged_into"] == ORIGINAL_WEIGHTS
    # The reference: the unquantized base with the run's adapter, merged in memory, as HF keys.
    model = merge_adapters(load_eval_model(base, run.adapter, device=torch.device("cpu")))
    hf_config = json.loads((base / "config.json").read_text())
    expected = tune_to_hf(model.state_dict(), num_heads=hf_config["num_attention_heads"],
                          num_kv_heads=hf_config["num_key_value_heads"], dim=hf_config["hidden_size"])
    exported = load_file(str(out / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    assert set(exported) == set(expected) == set(original)
    changed = 0
    for key, value in exported.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)
        changed += not torch.equal(value, original[key])
    assert changed == 2 * 7  # every adapted projection, and nothing else
    # Only the adapted weights differ from the default export, which merges into the stored base.
    as_trained = load_file(str(run.merged / "model.safetensors"))
    assert sum(not torch.equal(as_trained[k], exported[k]) for k in exported) == 2 * 7
    # A run on the original weights is merged into them already: the flag is refused, named.
    assert export_main(["--run", str(runs["root"] / "none"), "--out", str(tmp_path / "x"),
                        "--into-original-weights"]) == 2


def test_resuming_a_checkpoint_in_another_format_is_refused_with_the_reason(runs, tmp_path):
    out = runs["root"] / "none"
    proc = run_job(1, [*runs["overrides"], f"output_dir={out}", "model.quantize=nf4", "max_steps=12"], check=False)
    assert proc.returncode != 0
    assert "model.quantize: 'none' -> 'nf4'" in proc.stderr


def test_bad_quantize_value_fails_at_once_by_name(tmp_path):
    proc = run_direct([f"output_dir={tmp_path}", "model.quantize=nf3"], timeout=120)
    assert proc.returncode == 2
    assert "model.quantize='nf3' is not one of ['none', 'nf4', 'int8']" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()

"""pmss-eval on a tiny model trained here on single-digit addition: accuracy far above
chance, the same per-row records on 1 and 2 processes (FSDP-sharded), an adapter on its base
scores like its merged export, and the held-out loss the training loop calls."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf

from pmss_dist.data import batches
from pmss_dist.data import tokenizers
from pmss_dist.data import packing
from pmss_dist.data import examples as D
from pmss_dist.adapters.io import save_adapter
from pmss_dist.adapters.layers import AdapterSpec, adapter_layers, apply_adapters, merge_adapters
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE, write_tiny_checkpoint
from pmss_dist.eval.loss import evaluate_loss
from pmss_dist.eval.model import load_eval_model

pytestmark = pytest.mark.slow  # trains a model, torchrun jobs

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
PAIRS = [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
TRAIN = random.Random(0).sample(PAIRS, 80)  # 20 problems are never seen: some answers are wrong


def _load_cli():
    from pmss_dist.cli import evaluate

    return evaluate


def _export(model, config_dir: Path, out: Path) -> Path:
    """Write ``model`` as an HF checkpoint with the config and tokenizer of ``config_dir``."""
    config = json.loads((config_dir / "config.json").read_text())
    state = tune_to_hf({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                       num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
                       dim=config["hidden_size"])
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", BYTE_TOKENIZER_FILE):
        (out / name).write_text((config_dir / name).read_text())
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer model fully fine-tuned on 80 of the 100 single-digit additions (~5 s)."""
    root = tmp_path_factory.mktemp("eval")
    base = write_tiny_checkpoint(root / "base", seed=0, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, max_position_embeddings=64)
    model = load_eval_model(base, None, device=CPU)
    model.requires_grad_(True).train()
    tok = tokenizers.load_tokenizer(base)
    batch = batches.collate([D.tokenize_pair(tok, p, r) for p, r in TRAIN], 8, tok.pad_id)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(130):
        loss = F.cross_entropy(model(batch["tokens"]).flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model_dir = _export(model, base, root / "trained")

    qa = root / "addition.jsonl"
    qa.write_text("".join(json.dumps({"question": p, "answer": r}) + "\n" for p, r in PAIRS))
    rng = random.Random(1)
    choice_rows = []
    for p, r in PAIRS[::2]:
        wrong = rng.sample([str(v) for v in range(19) if str(v) != r], 2)
        choices = [r] + wrong
        rng.shuffle(choices)
        choice_rows.append({"question": p, "choices": choices, "answer": choices.index(r)})
    choice = root / "choice.jsonl"
    choice.write_text("".join(json.dumps(row) + "\n" for row in choice_rows))
    return {"root": root, "base": base, "model": model_dir, "qa": qa, "choice": choice}


def _args(t, task: str, out: Path, model=None, adapter=None) -> list[str]:
    args = ["--model", str(model or t["model"]), "--task", task,
            "--data", str(t["qa" if task == "gsm8k" else "choice"]), "--out", str(out),
            "--prompt-template", "{question}", "--batch-size", "16", "--max-new-tokens", "4"]
    return args + (["--adapter", str(adapter)] if adapter else [])


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_in_process(cli, argv, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", _free_port())
    return cli.run(cli.parse_args(argv))


def test_accuracy_above_chance_and_equal_on_two_processes(trained, tmp_path, monkeypatch):
    cli = _load_cli()
    qa_args = _args(trained, "gsm8k", tmp_path / "qa1.json") + ["--tensorboard", str(tmp_path / "tb")]
    one_qa = _run_in_process(cli, qa_args, monkeypatch)
    one_mc = _run_in_process(cli, _args(trained, "choice", tmp_path / "mc1.json"), monkeypatch)
    assert one_qa["summary"]["n"] == 100
    # Chance is about 1/19 for a sum 0..18 and 1/3 for three choices.
    assert 0.6 <= one_qa["summary"]["accuracy"] < 1.0, one_qa["summary"]  # errors exist: a real comparison below
    assert one_mc["summary"]["accuracy"] >= 0.8 and one_mc["summary"]["chance"] == pytest.approx(1 / 3)
    seen = {p for p, _ in TRAIN}
    wrong_seen = [r for r in one_qa["records"] if not r["correct"] and PAIRS[r["index"]][0] in seen]
    assert len(wrong_seen) <= 2  # the training problems are learnt: the scorer reads answers right
    assert json.loads((tmp_path / "qa1.json").read_text())["summary"] == one_qa["summary"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        "from pmss_dist.cli import evaluate as cli\n"
        "import torch.distributed as dist; dist.init_process_group('gloo')  # one group for both runs\n"
        f"assert cli.main({_args(trained, 'gsm8k', tmp_path / 'qa2.json')!r}) == 0\n"
        f"assert cli.main({_args(trained, 'choice', tmp_path / 'mc2.json') + ['--replicate']!r}) == 0\n"
        # gloo's teardown aborts now and then ("terminate called without an active exception", about
        # 1 run in 10 at 4 processes) after every result is written: this driver leaves without it.
        "dist.barrier(); import os; sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", _free_port(), str(driver)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_qa, two_mc = (json.loads((tmp_path / name).read_text()) for name in ("qa2.json", "mc2.json"))
    assert two_qa["world_size"] == 2
    assert two_qa["records"] == one_qa["records"] and two_qa["summary"] == one_qa["summary"]
    assert [r["predicted"] for r in two_mc["records"]] == [r["predicted"] for r in one_mc["records"]]
    for a, b in zip(two_mc["records"], one_mc["records"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


def test_adapter_on_base_scores_like_merged_export(trained, tmp_path, monkeypatch):
    model = load_eval_model(trained["model"], None, device=CPU)
    apply_adapters(model, AdapterSpec("pmss", ("q_proj", "v_proj", "down_proj"), size=4, alpha=8.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():  # a non-trivial update: random skeleton and core
            layer.row_idx.copy_(torch.randperm(layer.out_features, generator=gen)[:4])
            layer.col_idx.copy_(torch.randperm(layer.in_features, generator=gen)[:4])
            layer.core.copy_(torch.randn(4, 4, generator=gen) * 2)
    adapter = save_adapter(model, tmp_path / "adapter", {"kind": "pmss", "rank": 4, "alpha": 8.0,
                                                         "targets": ["q_proj", "v_proj", "down_proj"]})
    merged = _export(merge_adapters(model), trained["model"], tmp_path / "merged")
    cli = _load_cli()
    with_adapter = _run_in_process(cli, _args(trained, "choice", tmp_path / "a.json", adapter=adapter), monkeypatch)
    export = _run_in_process(cli, _args(trained, "choice", tmp_path / "m.json", model=merged), monkeypatch)
    plain = _run_in_process(cli, _args(trained, "choice", tmp_path / "p.json"), monkeypatch)
    for a, m in zip(with_adapter["records"], export["records"]):
        assert a["logprobs"] == pytest.approx(m["logprobs"], abs=1e-4)
    assert any(a["logprobs"] != pytest.approx(p["logprobs"], abs=1e-2)  # the adapter did change the model
               for a, p in zip(with_adapter["records"], plain["records"]))


def test_evaluate_loss_matches_direct_cross_entropy(trained):
    model = load_eval_model(trained["model"], None, device=CPU)
    tok = tokenizers.load_tokenizer(trained["model"])
    samples = [D.tokenize_pair(tok, p, r) for p, r in PAIRS[:13]]
    eval_batches = batches.eval_micro_batches(samples, rank=0, world_size=1, micro_batch_size=4, seq_len=8,
                                              pad_id=tok.pad_id)
    whole = batches.collate(samples, 8, tok.pad_id)
    with torch.no_grad():
        reference = F.cross_entropy(model(whole["tokens"]).flatten(0, 1), whole["labels"].flatten(), ignore_index=-100)
    assert evaluate_loss(model, eval_batches, CPU) == pytest.approx(float(reference), rel=1e-5)
    packed = [batches.collate(packing.pack_samples(samples, 32, seed=0), 32, tok.pad_id)]
    assert evaluate_loss(model, packed, CPU) == pytest.approx(float(reference), rel=1e-5)

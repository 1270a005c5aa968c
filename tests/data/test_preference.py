"""Preference pairs (objective.kind=dpo): the three row forms public sets ship, detected without
being told; malformed pairs named by file and line; tokenized with one prompt and the loss on the
response only; collated chosen rows first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pmss_dist.config import ConfigError, DataConfig, load_config
from pmss_dist.data import examples as D
from pmss_dist.data import rows as datasets
from pmss_dist.data.batches import collate_samples, eval_micro_batches
from pmss_dist.data.chat_template import render_chat
from pmss_dist.data.tokenizers import load_tokenizer
from pmss_dist.errors import DataError
from pmss_dist.eval.preference import trained_pairs
from pmss_dist.models.builtin import write_tiny_checkpoint

from conftest import TINY_CONFIG

USER = {"role": "user", "content": "What is 2+2?"}
GOOD, BAD = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def trained_ids(sample: dict) -> list[int]:
    return [t for t in sample["labels"] if t != D.IGNORE_INDEX]


def test_the_three_row_forms_are_detected_and_read(tmp_path):
    rows = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},  # texts
        {"prompt": "ignored: the lists hold it", "chosen": [USER, GOOD], "rejected": [USER, BAD],
         "messages": [USER, GOOD]},  # UltraFeedback-binarized: whole conversations (and a messages column)
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # TRL's conversational form
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: It is 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: It is 5"},
    ]
    got = datasets.load_examples(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert [{k: v for k, v in e.items() if k != "where"} for e in got] == [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"chosen_messages": [USER, GOOD], "rejected_messages": [USER, BAD]},
        {"chosen_messages": [USER, GOOD], "rejected_messages": [USER, BAD]},
        # HH-RLHF: the shared beginning up to its last whitespace is the prompt (as TRL's extract_prompt)
        {"prompt": "\n\nHuman: 2+2?\n\nAssistant: It is", "chosen": " 4", "rejected": " 5"},
    ]
    assert [e["where"] for e in got] == [f"{tmp_path / 'pairs.jsonl'}:{i}" for i in range(1, 5)]


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "2+2=", "chosen": "4", "rejected": "4"}, "chosen and rejected are the same response"),
    ({"prompt": "2+2=", "chosen": "4", "rejected": ""}, "field 'rejected' is empty"),
    ({"chosen": [USER, GOOD], "rejected": [USER, {"role": "assistant", "content": " "}]},
     "the rejected response is empty"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "What is 3+3?"}, BAD]},
     "chosen and rejected differ before their last message"),
    ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "chosen and rejected are the same response"),
    ({"chosen": [USER, GOOD, USER], "rejected": [USER, BAD, USER]}, "the last message of chosen is not the assistant"),
    ({"chosen": [GOOD], "rejected": [BAD]}, "no prompt before it"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no beginning"),
    ({"prompt": "2+2=", "chosen": 4, "rejected": "5"}, "must be a non-empty list of messages"),
])
def test_a_malformed_pair_is_named_by_file_and_line(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, row])
    with pytest.raises(DataError) as err:
        datasets.load_examples(path)
    assert f"{path}:2" in str(err.value) and reason in str(err.value)
    bad = datasets.BadRows("skip")
    assert len(datasets.load_examples(path, bad=bad)) == 1 and bad.skipped == 1


def test_a_pair_shares_its_prompt_tokens_and_trains_each_response(tok):
    pair = D.tokenize_example(tok, {"prompt": "2+2=", "chosen": "4", "rejected": "15"})
    alone = {side: D.tokenize_pair(tok, "2+2=", text) for side, text in (("chosen", "4"), ("rejected", "15"))}
    assert pair == alone
    prompt = tok.encode("2+2=", add_bos=True, add_eos=False)
    for side, text in (("chosen", "4"), ("rejected", "15")):
        assert pair[side]["tokens"][:len(prompt)] == prompt
        assert trained_ids(pair[side]) == tok.encode_continuation(text) + [tok.eos_id]


def test_a_chat_pair_trains_only_the_last_assistant_turn(tok):
    history = [USER, {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 2+3?"}]
    pair = D.tokenize_example(tok, {"chosen_messages": history + [GOOD], "rejected_messages": history + [BAD]})
    for side, last in (("chosen", GOOD), ("rejected", BAD)):
        whole = render_chat(tok, history + [last])
        before = render_chat(tok, history, add_generation_prompt=True)
        # The trained text is what the last turn adds to the conversation, and nothing of "Four."
        assert tok.decode(trained_ids(pair[side])) == whole[len(before):].removesuffix("<|eos|>")
    assert pair["chosen"]["tokens"][:-3] == pair["rejected"]["tokens"][:-3]


def test_pairs_collate_chosen_rows_first_and_count_only_whole_pairs(tok):
    pairs = [D.tokenize_example(tok, {"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)})
             for i in range(3)]
    batch = collate_samples(pairs, seq_len=16, pad_id=tok.pad_id)
    assert batch["tokens"].shape == (6, 16)
    for i, p in enumerate(pairs):
        assert batch["tokens"][i, :len(p["chosen"]["tokens"])].tolist() == p["chosen"]["tokens"]
        assert batch["tokens"][3 + i, :len(p["rejected"]["tokens"])].tolist() == p["rejected"]["tokens"]
    assert trained_pairs(batch) == 3
    # seq_len cuts the responses of every pair: none is counted
    assert trained_pairs(collate_samples(pairs, seq_len=4, pad_id=tok.pad_id)) == 0
    # the eval's filler pairs take no loss and are not counted
    filled = eval_micro_batches(pairs, rank=0, world_size=1, micro_batch_size=2, seq_len=16, pad_id=tok.pad_id)
    assert [trained_pairs(b) for b in filled] == [2, 1]


def test_builtin_task_as_pairs(tok):
    pairs = D.build_dataset(DataConfig(num_samples=64), tok, seed=5, pairs=True)
    rows = D.arithmetic_rows(64, seed=5)
    assert len(pairs) == 64
    for row, pair in zip(rows, pairs):
        a, b = map(int, row["question"].rstrip("=").split("+"))
        assert tok.decode(trained_ids(pair["chosen"])) == str(a + b)
        wrong = int(tok.decode(trained_ids(pair["rejected"])))
        assert wrong != a + b and abs(wrong - (a + b)) <= 10 and wrong >= 0
    assert pairs == D.build_dataset(DataConfig(num_samples=64), tok, seed=5, pairs=True)  # deterministic


def test_a_file_of_the_other_kind_is_refused_in_one_line(tmp_path, tok):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(DataError, match="holds preference pairs .* set objective.kind=dpo"):
        D.build_dataset(DataConfig(source=str(pairs), seq_len=16, batch_size=1, micro_batch_size=1), tok, seed=0)
    with pytest.raises(DataError, match="holds no preference pairs"):
        D.build_dataset(DataConfig(source=str(qa), seq_len=16, batch_size=1, micro_batch_size=1), tok, seed=0,
                        pairs=True)


@pytest.mark.parametrize("overrides,needle", [
    (["adapter.kind=full"], "adapter.kind=full has no frozen base to switch back to"),
    (["data.packed=true"], "data.packed does not apply to objective.kind=dpo"),
    (["data.train_on_prompt=true"], "data.train_on_prompt does not apply"),
    (["data.format=chat"], "not data.format=chat"),
    (["objective.loss=ipo", "objective.label_smoothing=0.1"], "applies to objective.loss=sigmoid only"),
    (["objective.beta=0"], "objective.beta must be a finite number in (0"),
    (["objective.label_smoothing=0.5"], "objective.label_smoothing must be a finite number in [0, 0.5)"),
    (["objective.loss=hinge"], "objective.loss='hinge' is not one of"),
])
def test_dpo_settings_that_cannot_work_are_refused(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, ["objective.kind=dpo", *overrides])
    assert needle in str(err.value)


def test_sft_on_preference_format_is_refused():
    with pytest.raises(ConfigError, match="objective.kind=sft does not train on"):
        load_config(TINY_CONFIG, ["data.format=preference"])



def test_pmss_eval_refuses_pairs_in_one_line(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "base")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    proc = subprocess.run([sys.executable, "-m", "pmss_dist.cli.evaluate", "--model", str(base), "--data", str(pairs),
                           "--out", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if "holds preference pairs" in line] == [
        f"evaluate: {pairs} holds preference pairs (chosen/rejected): pmss-eval generates answers to prompts; a dpo "
        "run's eval (data.eval_source) reports the pairs' rewards/accuracies"]
    assert not (tmp_path / "out.json").exists()


def test_the_run_identity_sees_a_changed_pair(tok):
    from pmss_dist.data.fingerprint import samples_fingerprint

    pairs = [D.tokenize_example(tok, {"prompt": "1+1=", "chosen": "2", "rejected": r}) for r in ("3", "4")]
    changed = [pairs[0], D.tokenize_example(tok, {"prompt": "1+1=", "chosen": "2", "rejected": "5"})]
    swapped = [{"chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    prints = {samples_fingerprint(x) for x in (pairs, changed, swapped, pairs[:1])}
    assert len(prints) == 4

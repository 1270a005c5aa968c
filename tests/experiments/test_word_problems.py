"""GSM8K-style word problem generator: determinism, self-consistency, splits, answer parsing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pmss_dist.data.rows import QA_TEMPLATE, load_examples
from pmss_dist.eval.scoring import extract_final_number

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "experiments" / "pmss_vs_lora"
sys.path.insert(0, str(EXPERIMENT))  # the experiment's modules sit beside its scripts, not in the library
from word_problems import (TEMPLATES, _CALCULATION, _Work, check_calculations, evaluate_expression,  # noqa: E402
                           make_dataset, make_pairs, make_problem, make_split)


def test_deterministic_by_seed():
    assert make_split(50, seed=3) == make_split(50, seed=3)
    assert make_split(50, seed=3) != make_split(50, seed=4)
    assert make_dataset(40, 30, seed=1) == make_dataset(40, 30, seed=1)
    assert make_problem(random.Random(7)) == make_problem(random.Random(7))


def test_answers_are_consistent():
    problems = make_split(600, seed=0)
    for p in problems:
        assert set(p) == {"question", "answer", "final", "expression"}
        assert isinstance(p["final"], int) and p["final"] > 0
        assert evaluate_expression(p["expression"]) == p["final"], p
        assert extract_final_number(p["answer"]) == str(p["final"]), p
        assert p["answer"].splitlines()[-1] == f"#### {p['final']}"
        steps = p["answer"].count("<<")
        assert 2 <= steps <= 4, p["answer"]
        assert check_calculations(p["answer"]) == (steps, steps), p["answer"]
    assert len({p["question"] for p in problems}) == len(problems)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_template_is_exact(name):

    assert len(TEMPLATES) >= 6
    rng = random.Random(name)
    for _ in range(200):
        work = _Work()
        question, expression, final = TEMPLATES[name](rng, work)
        assert question.endswith("?") and final > 0
        assert evaluate_expression(expression) == final, (name, expression)
        assert 2 <= len(work.lines) <= 4


def test_test_set_disjoint_and_fixed_by_seed():
    train, test = make_dataset(2000, 500, seed=0)
    assert len(train) == 2000 and len(test) == 500
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    # The test set does not depend on how much training data is asked for.
    assert make_dataset(10, 500, seed=0)[1] == test
    assert make_dataset(10, 500, seed=1)[1] != test


@pytest.mark.parametrize("text, expected", [
    ("He has 5 + 3 = <<5+3=8>>8.\n#### 1,234", "1234"),
    ("The answer is -3.", "-3"),
    ("It costs $12.50", "12.5"),
    ("12.0", "12"),
    ("so the total is $1,000.00.", "1000"),
    ("no digits here", None),
    ("", None),
    ("#### 5\nwait, actually\n#### 7", "7"),
    ("#### 42 apples, not 3", "42"),
    ("pages 3-4, then 10 more", "10"),
    ("first 7 then -0", "0"),
    ("We get 18 eggs.\n#### $18.", "18"),
    ("####", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize("bad", ["__import__('os')", "2 ** 10", "1.5 + 2", "abs(-3)", "x + 1",
                                 "[1, 2]", "1 if 1 else 2"])
def test_evaluator_rejects_non_arithmetic(bad):
    with pytest.raises((ValueError, SyntaxError)):
        evaluate_expression(bad)


def test_evaluator_is_exact():
    assert evaluate_expression("(7 - 1) / 4 * 2") == 3
    assert evaluate_expression("-(2 + 3) * 4") == -20


@pytest.mark.slow
def test_cli_writes_jsonl(tmp_path):
    result = subprocess.run([sys.executable, str(EXPERIMENT / "make_word_problems.py"),
                             "--out", str(tmp_path), "--train", "30", "--test", "20", "--seed", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {split: [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "test")}
    assert len(rows["train"]) == 30 and len(rows["test"]) == 20
    assert all(set(r) == {"question", "answer"} for r in rows["train"] + rows["test"])
    train, test = make_dataset(30, 20, seed=2)
    assert rows["test"] == [{"question": p["question"], "answer": p["answer"]} for p in test]


@pytest.mark.parametrize("text,expected", [
    ("It is 3 * 4 = <<3*4=12>>12. Then <<12-5=7>>7.\n#### 7", (2, 2)),
    ("<<3*4=13>>13 and <<10/4=2.5>>2.5", (1, 2)),          # a wrong product; an exact fraction
    ("<<3*4=12>> <<2+=4>> <<x*2=4>> <<5/0=1>> <<1+1=two>> <<3-3=>>", (1, 6)),  # malformed ones count as wrong
    ("The answer is 4.", (0, 0)),
])
def test_check_calculations(text, expected):
    assert check_calculations(text) == expected


def test_pairs_have_one_wrong_calculation_and_a_wrong_answer():
    train, held_out = make_pairs(400, 100, 500, seed=0)
    for p in train + held_out:
        right, wrong = p["answer"], p["wrong_answer"]
        steps = right.count("<<")
        assert check_calculations(right) == (steps, steps)
        # Exactly one annotation is false arithmetic; every other step is right on the values it got.
        assert check_calculations(wrong) == (steps - 1, steps), wrong
        assert int(extract_final_number(wrong)) != p["final"], wrong
        assert len(wrong.splitlines()) == len(right.splitlines())
        bad = [i for i, (e, v) in enumerate(_CALCULATION.findall(wrong)) if evaluate_expression(e) != int(v)]
        # Before the wrong step the two solutions are the same text.
        assert _CALCULATION.findall(wrong)[:bad[0]] == _CALCULATION.findall(right)[:bad[0]]
    faulty_steps = {[i for i, (e, v) in enumerate(_CALCULATION.findall(p["wrong_answer"]))
                     if evaluate_expression(e) != int(v)][0] for p in train}
    assert faulty_steps == {0, 1, 2, 3}  # the fault falls on every step position, not just the last


def test_pairs_are_fixed_by_seed_and_disjoint_from_the_test_set():
    train, held_out = make_pairs(300, 50, 500, seed=0)
    assert (train, held_out) == make_pairs(300, 50, 500, seed=0)
    assert make_pairs(300, 50, 500, seed=1)[0] != train
    _, test = make_dataset(0, 500, seed=0)
    assert [p["question"] for p in held_out] == [p["question"] for p in test[:50]]
    assert [p["answer"] for p in held_out] == [p["answer"] for p in test[:50]]
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    # Making pairs leaves the SFT problems as they were (the pair's own draws use their own stream).
    assert make_problem(random.Random(5), random.Random(9))["answer"] == make_problem(random.Random(5))["answer"]


@pytest.mark.slow
def test_cli_writes_pairs_the_trainer_reads(tmp_path):
    result = subprocess.run([sys.executable, str(EXPERIMENT / "make_word_problems.py"), "--out", str(tmp_path),
                             "--pairs", "40", "--test-pairs", "10", "--test", "30", "--seed", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    train, held_out = make_pairs(40, 10, 30, seed=2)
    for name, problems in (("pairs_train.jsonl", train), ("pairs_test.jsonl", held_out)):
        examples = load_examples(tmp_path / name)  # format auto-detected as preference, no row refused
        assert [(e["prompt"], e["chosen"], e["rejected"]) for e in examples] == [
            (QA_TEMPLATE.format(question=p["question"]), p["answer"], p["wrong_answer"]) for p in problems]


@pytest.mark.slow
def test_dpo_experiment_writes_its_pairs_again_when_asked_for_others(tmp_path):
    from argparse import Namespace

    import dpo

    (tmp_path / "logs").mkdir()
    args = Namespace(data=tmp_path / "data", out=tmp_path, pairs=12, test_pairs=4, test=20, data_seed=0)
    train_file, _ = dpo.pairs(args)
    assert len(train_file.read_text().splitlines()) == 12
    args.pairs = 7
    train_file, test_file = dpo.pairs(args)
    assert len(train_file.read_text().splitlines()) == 7 and len(test_file.read_text().splitlines()) == 4
    written = train_file.stat().st_mtime_ns
    dpo.pairs(args)  # the same settings: the files on disk are kept
    assert train_file.stat().st_mtime_ns == written

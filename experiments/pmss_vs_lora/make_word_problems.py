#!/usr/bin/env python
"""Write GSM8K-style arithmetic word problems as JSONL (GSM8K's ``question``/``answer`` columns).

    python experiments/pmss_vs_lora/make_word_problems.py --out data/word_problems --train 5000 --test 500 --seed 0
    python experiments/pmss_vs_lora/make_word_problems.py --out data/word_problems --pairs 2000 --test-pairs 200

Produces ``train.jsonl`` and ``test.jsonl``; the test set depends only on --seed and --test and
shares no question with the training set. With ``--pairs N``, instead: preference pairs for DPO
(``prompt``, ``chosen``, ``rejected``; the prompt as the ``qa`` format writes it), chosen the
correct worked solution, rejected the same solution with one calculation wrong and so a wrong
final answer: ``pairs_train.jsonl`` (N pairs on questions outside the --test test problems) and
``pairs_test.jsonl`` (the first --test-pairs test problems).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pmss_dist.data.rows import QA_TEMPLATE
from word_problems import make_dataset, make_pairs


def write_jsonl(path: Path, problems: list[dict]) -> None:
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n")


def write_pairs(path: Path, problems: list[dict]) -> None:
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": QA_TEMPLATE.format(question=p["question"]), "chosen": p["answer"],
                                "rejected": p["wrong_answer"]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate GSM8K-style word problems as JSONL.")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--train", type=int, default=5000, help="training problems (default 5000)")
    parser.add_argument("--test", type=int, default=500, help="test problems (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--pairs", type=int, default=0, help="instead: this many training preference pairs")
    parser.add_argument("--test-pairs", type=int, default=200, help="held-out pairs with --pairs (default 200)")
    args = parser.parse_args(argv)
    if min(args.train, args.test, args.pairs, args.test_pairs) < 0:
        parser.error("--train, --test, --pairs and --test-pairs must be >= 0")
    if args.pairs and args.test_pairs > args.test:
        parser.error("--test-pairs must be <= --test: held-out pairs are made from test problems")

    args.out.mkdir(parents=True, exist_ok=True)
    if args.pairs:
        train, test = make_pairs(args.pairs, args.test_pairs, args.test, args.seed)
        write_pairs(args.out / "pairs_train.jsonl", train)
        write_pairs(args.out / "pairs_test.jsonl", test)
        print(f"wrote {len(train)} train and {len(test)} held-out preference pairs to {args.out}")
        return 0

    train, test = make_dataset(args.train, args.test, args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test problems to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Write GSM8K-style arithmetic word problems as JSONL (GSM8K's ``question``/``answer`` columns).

    python experiments/pmss_vs_lora/make_word_problems.py --out data/word_problems --train 5000 --test 500 --seed 0

Produces ``train.jsonl`` and ``test.jsonl``; the test set depends only on --seed and --test and
shares no question with the training set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from word_problems import make_dataset


def write_jsonl(path: Path, problems: list[dict]) -> None:
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate GSM8K-style word problems as JSONL.")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--train", type=int, default=5000, help="training problems (default 5000)")
    parser.add_argument("--test", type=int, default=500, help="test problems (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args(argv)
    if args.train < 0 or args.test < 0:
        parser.error("--train and --test must be >= 0")

    train, test = make_dataset(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test problems to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hostile data files: every row a reader cannot use is one malformed row named by file:line
(``on_bad_row=skip`` counts it and goes on, ``error`` stops at the first), and what a common tool
writes (a BOM, long CSV fields) is read."""

from __future__ import annotations

import csv
import json

import pytest

from pmss_dist.data import examples as D
from pmss_dist.data import rows as datasets
from pmss_dist.config import DataConfig
from pmss_dist.data.tokenizers import ByteTokenizer

ANSWER = {"role": "assistant", "content": "four"}
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raised RecursionError
HUGE_INT = "1" * 5000  # json.loads raised ValueError: Exceeds the limit (4300 digits)
SURROGATE = '"\\ud800"'  # a lone surrogate: not text, failed later in the tokenizer


def _chat_line(first_message: str) -> str:
    return '{"messages": [' + first_message + ", " + json.dumps(ANSWER) + "]}"


# (JSONL line, the reason its row is malformed); None: a good row
CHAT_ROWS = [
    (_chat_line('{"role": "user", "content": "hi"}'), None),
    (_chat_line('{"role": ["user"], "content": "hi"}'), "message 0 has role ['user']; expected one of"),
    (_chat_line('{"role": {"name": "user"}, "content": "hi"}'), "message 0 has role {'name': 'user'}"),
    (_chat_line('{"role": 7, "content": "hi"}'), "message 0 has role 7"),
    (_chat_line('"hi"'), "message 0 must be an object with 'role' and 'content'"),
    ('{"messages": ' + DEEP + "}", "not valid JSON (nested too deeply)"),
    ('{"messages": ' + HUGE_INT + "}", "not valid JSON (a number of more than 4300 digits"),
    (_chat_line('{"role": "user", "content": ' + SURROGATE + "}"),
     "message 0 content holds a lone surrogate (\\ud800) at character 1"),
    (_chat_line('{"role": "user", "content": "bye"}'), None),
]


def test_unusable_chat_rows_are_malformed_rows_at_their_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(line for line, _ in CHAT_ROWS) + "\n")
    with pytest.raises(datasets.DataError) as err:  # error: the first one stops the load, in one line
        datasets.load_examples(path)
    assert str(err.value).startswith(f"malformed row {path}:2: {CHAT_ROWS[1][1]}") and "\n" not in str(err.value)
    bad = datasets.BadRows("skip")
    examples = datasets.load_examples(path, bad=bad)
    assert [e["where"] for e in examples] == [f"{path}:1", f"{path}:{len(CHAT_ROWS)}"]
    assert (bad.total, bad.skipped) == (len(CHAT_ROWS), len(CHAT_ROWS) - 2)
    for line_no, (_, reason) in enumerate(CHAT_ROWS, start=1):
        if reason is not None and line_no <= 6:  # the report keeps the first five
            assert any(e.startswith(f"{path}:{line_no}: {reason}") for e in bad.examples), (reason, bad.examples)
    for line_no, (line, reason) in enumerate(CHAT_ROWS, start=1):  # each alone, in error mode
        if reason is not None:
            one = tmp_path / f"row{line_no}.jsonl"
            one.write_text(line + "\n")
            with pytest.raises(datasets.DataError, match=None) as err:
                datasets.load_examples(one)
            assert f"{one}:1: {reason}" in str(err.value) and len(str(err.value)) < 600


def test_a_lone_surrogate_in_a_text_field_is_a_malformed_row_and_training_goes_on(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2=\\udfff", "answer": "4"}\n'
                    '{"question": "3+3=", "answer": "6"}\n')
    cfg = DataConfig(source=str(path), seq_len=32)
    with pytest.raises(datasets.DataError,
                       match=rf"{path}:2: field 'question' holds a lone surrogate \(\\udfff\) at character 5"):
        D.build_dataset(cfg, ByteTokenizer(256, 257, 258), seed=0)
    cfg.on_bad_row = "skip"
    assert len(D.build_dataset(cfg, ByteTokenizer(256, 257, 258), seed=0)) == 2
    assert "skipped 1 malformed rows of 3" in capsys.readouterr().err
    # a surrogate pair is one character (an emoji here), not an error
    path.write_text('{"question": "\\ud83d\\ude00=", "answer": "2"}\n')
    assert datasets.load_examples(path)[0]["prompt"] == "Question: \U0001F600=\nAnswer:\n"


@pytest.mark.parametrize("element,reason", [(DEEP, "nested too deeply"), (HUGE_INT, "more than 4300 digits")])
def test_an_unreadable_element_of_a_json_array_stops_the_load_at_its_line(tmp_path, element, reason):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"question": "a?", "answer": "1"},\n' + element + "\n]\n")
    with pytest.raises(datasets.DataError, match=rf"{path}:3: not valid JSON \(.*{reason}.*\); fix the file"):
        datasets.load_examples(path, bad=datasets.BadRows("skip"))


def test_a_csv_field_longer_than_the_csv_modules_limit_is_read(tmp_path):
    # the csv module refuses fields over 131072 characters by default (a traceback before); pandas
    # and datasets read them, and the file is in memory anyway
    long_answer = "x" * 300_000
    path = tmp_path / "long.csv"
    path.write_text(f'question,answer\nq1,"{long_answer}"\nq2,short\n')
    examples = datasets.load_examples(path)
    assert [len(e["response"]) for e in examples] == [300_000, 5]
    assert [e["where"] for e in examples] == [f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("suffix,body", [
    (".csv", "question,answer\n1+1=,2\n"),
    (".jsonl", '{"question": "1+1=", "answer": "2"}\n'),
    (".json", '[{"question": "1+1=", "answer": "2"}]'),
])
def test_a_utf8_bom_at_the_start_of_a_file_is_ignored(tmp_path, suffix, body):
    # Excel (and Notepad) write one; the first CSV column was "\ufeffquestion" and not found
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    (example,) = datasets.load_examples(path)
    assert example["prompt"] == "Question: 1+1=\nAnswer:\n"
    assert example["where"] == f"{path}:{2 if suffix == '.csv' else 1}"


def test_a_csv_messages_cell_that_cannot_be_read_is_a_malformed_row(tmp_path):
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["messages"], [DEEP], [json.dumps([ANSWER])]])
    bad = datasets.BadRows("skip")
    assert [e["where"] for e in datasets.load_examples(path, bad=bad)] == [f"{path}:3"]
    assert bad.examples == [f"{path}:2: field 'messages' is text but not a JSON list (nested too deeply)"]


@pytest.mark.parametrize("template,needle", [
    ("{question:>1000000000}", "'{question:>1000000000}' does not fit format 'qa': it formats a field"),  # 1 GB
    ("{question.__class__}", "it uses '{question.__class__}'"),
    ("{question[0]}", "it uses '{question[0]}'"),
    ("{question!r}", "it formats a field"),
])
def test_prompt_templates_take_plain_fields_only(tmp_path, template, needle):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n')
    with pytest.raises(datasets.DataError) as err:
        datasets.load_examples(path, prompt_template=template)
    assert needle in str(err.value) and "plain {question}" in str(err.value), str(err.value)

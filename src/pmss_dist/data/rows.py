"""Rows from local files, checked and turned into examples.

Files: JSON Lines (``.jsonl``; also ``.json`` files that hold one object per line, as
``datasets.to_json`` writes them), JSON arrays (``.json``), Parquet (``.parquet``, via pyarrow) and
CSV (``.csv``). A source is one file or a directory of them (sorted by name).

Formats (``data.format``; ``auto`` looks at the first row's columns):

- ``instruction`` (Alpaca): ``instruction``, optional ``input``, ``output``;
- ``chat``: ``messages``, a list of ``{role, content}`` (roles system/user/assistant; ShareGPT's
  human/gpt are accepted), at least one assistant turn;
- ``qa`` (GSM8K): ``question``, ``answer``;
- ``preference`` (DPO pairs): ``prompt``, ``chosen``, ``rejected`` as texts; or ``chosen`` and
  ``rejected`` as message lists that share every message but the last, the assistant's response
  (UltraFeedback-binarized), with an optional ``prompt`` (text or messages) put before lists that
  start with the response; or, with no ``prompt``, two texts whose shared beginning is the prompt
  (HH-RLHF). A pair whose responses are identical or empty, or whose conversations differ before
  the response, is malformed.

``data.columns`` maps a canonical field to the file's column name (``{question: problem}``).
An example is ``{"prompt", "response", "where"}`` or ``{"messages", "where"}``, a pair
``{"prompt", "chosen", "rejected", "where"}`` or ``{"chosen_messages", "rejected_messages", "where"}``; ``where`` is
``file:line`` (``file:row N`` for Parquet) so every later error can name its row.

A malformed row either stops the load with ``DataError`` naming file and line (``on_bad_row=
"error"``) or is counted in a ``BadRows`` report and left out (``"skip"``): never silently. A row is
malformed when it is not what its format says, and also when Python cannot read it (JSON nested
too deeply, an integer of more than 4300 digits) or its text is not Unicode (a lone surrogate,
which JSON's ``\\ud800`` escapes can write): nothing about a row reaches the tokenizer unchecked.
A UTF-8 byte order mark (Excel writes one) is not part of the data.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pmss_dist.errors import DataError
from pmss_dist.data.quote import quote

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
FORMATS = ("instruction", "chat", "qa", "preference")
PAIR_SIDES = ("chosen", "rejected")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "model": "assistant", "bot": "assistant"}

ALPACA_TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
QA_TEMPLATE = "Question: {question}\nAnswer:\n"


class RowError(ValueError):
    """What is wrong with one row (the caller adds where it is)."""


@dataclass
class BadRows:
    """The ``on_bad_row`` policy and its record: ``error`` raises at the first malformed row,
    ``skip`` counts every one (with the first few locations for the report)."""

    mode: str = "error"
    total: int = 0  # rows seen, good and bad
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in ("error", "skip"):
            raise ValueError(f"on_bad_row={self.mode!r}: choose error or skip")

    def bad(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.mode == "error":
            raise DataError(f"malformed row {message} (data.on_bad_row=skip, or --on-bad-row skip, skips such rows)")
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.total} rows, none malformed"
        return (f"skipped {self.skipped} malformed rows of {self.total}; first: " + "; ".join(self.examples))


def source_files(source: str | Path) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path} holds no {'/'.join(SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"data source {source} not found (a file, a directory of files, or builtin:arithmetic)")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}")
    return [path]


def iter_records(path: Path) -> Iterator[tuple[str, dict | RowError]]:
    """``(where, record)`` for every row of ``path``; a row that cannot be read as an object comes
    back as a ``RowError``. A file that cannot be read at all raises ``DataError``."""
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
        return
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if path.suffix == ".csv":
        yield from _csv_records(path, _decode(path, data))
    elif path.suffix == ".json" and data.lstrip()[:1] == b"[":
        yield from _json_array_records(path, _decode(path, data))
    else:
        yield from _jsonl_records(path, data)


# What json.loads raises besides JSONDecodeError: RecursionError for deep nesting, ValueError for
# an integer of more than sys.get_int_max_str_digits() digits.
JSON_ERRORS = (ValueError, RecursionError)


def json_problem(err: Exception) -> str:
    """Why text is not JSON that Python reads, for a message (``err``: one of `JSON_ERRORS`)."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at column {err.colno}"
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return f"a number of more than {sys.get_int_max_str_digits()} digits"


def _not_utf8(data: bytes, err: UnicodeDecodeError, start: int = 0) -> str:
    """What is wrong, for a message: the byte and its column on its line."""
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1 + start
    return f"not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column})"


def _decode(path: Path, data: bytes) -> str:
    """A whole file as UTF-8 text, or a DataError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: {_not_utf8(data, err)}; re-save the file as UTF-8") from None


def _jsonl_records(path: Path, data: bytes):
    """One row per line; a line that is not UTF-8 or not JSON is a malformed row (``on_bad_row``)."""
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield f"{path}:{line_no}", RowError(_not_utf8(raw, err))
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except JSON_ERRORS as err:
            yield f"{path}:{line_no}", RowError(f"not valid JSON ({json_problem(err)})")
            continue
        yield f"{path}:{line_no}", record if isinstance(record, dict) else RowError(
            f"expected a JSON object, got {type(record).__name__}")


def _json_array_records(path: Path, text: str):
    """Elements of a top-level JSON array, each with the line it starts on. An element that cannot
    be read leaves the rest of the array unreadable, so it stops the load whatever ``on_bad_row``
    says."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(index: int) -> int:  # incremental: files can be large
        nonlocal line, counted
        line += text.count("\n", counted, index)
        counted = index
        return line

    def skip_space(index: int) -> int:
        while index < len(text) and text[index].isspace():
            index += 1
        return index

    pos = skip_space(text.index("[") + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            record, end = decoder.raw_decode(text, pos)
        except JSON_ERRORS as err:
            line_no = err.lineno if isinstance(err, json.JSONDecodeError) else line_at(pos)
            raise DataError(f"{path}:{line_no}: not valid JSON ({json_problem(err)}); fix the file") from None
        yield f"{path}:{line_at(pos)}", record if isinstance(record, dict) else RowError(
            f"expected a JSON object, got {type(record).__name__}")
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise DataError(f"{path}:{line_at(pos)}: expected ',' or ']' after an array element")
    if pos >= len(text):
        raise DataError(f"{path}: the JSON array is not closed")


def _parquet_records(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for non-Parquet files
        raise DataError(f"cannot read {path} as Parquet: {err}") from err
    row = 0
    for batch in table.iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


def _csv_records(path: Path, text: str):
    # The csv module refuses fields over 128 KiB (a guard for streamed input); this file is in
    # memory already, and pandas and datasets read long fields, so no field is too long here.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        yield from _csv_rows(path, text)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path, text: str):
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file (the first line must name the columns)")
        start = reader.line_num + 1
        for record in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in record:
                yield where, RowError(f"more fields than the {len(reader.fieldnames)} columns of the header")
            elif any(v is None for v in record.values()):
                yield where, RowError(f"fewer fields than the {len(reader.fieldnames)} columns of the header")
            else:
                yield where, record


# ---------------------------------------------------------------------------------------------
# Rows -> examples
# ---------------------------------------------------------------------------------------------

def detect_format(record: dict, columns: dict[str, str]) -> str:
    # Preference sets often carry a "messages" column too (UltraFeedback-binarized): pairs first.
    if all(columns.get(side, side) in record for side in PAIR_SIDES):
        return "preference"
    for fmt, key in (("chat", "messages"), ("instruction", "instruction"), ("qa", "question")):
        if columns.get(key, key) in record:
            return fmt
    raise DataError(f"cannot tell the format from columns {quote(sorted(record))}: set data.format "
                    f"(one of {FORMATS}) and data.columns to map the file's columns")


def _unicode(text: str, what: str) -> str:
    """``text``, refused if it holds a lone surrogate: JSON's ``\\ud800`` escape can write one, and
    it is not Unicode text (no tokenizer, file or terminal takes it)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RowError(f"{what} holds a lone surrogate ({text[err.start].encode('unicode_escape').decode()}) "
                           f"at character {err.start + 1}") from None
    return text


def _text(record: dict, name: str, columns: dict[str, str], optional: bool = False) -> str:
    column = columns.get(name, name)
    value = record.get(column)
    if value is None:
        if optional:
            return ""
        raise RowError(f"missing field {column!r}" + (f" (for {name})" if column != name else ""))
    if not isinstance(value, str):
        raise RowError(f"field {column!r} must be text, got {type(value).__name__}")
    if not optional and not value.strip():
        raise RowError(f"field {column!r} is empty")
    return _unicode(value, f"field {column!r}")


def _json_list(record: dict, column: str):
    """A field that holds a list, which a CSV cell can only hold as JSON text."""
    value = record.get(column)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except JSON_ERRORS as err:
            raise RowError(f"field {column!r} is text but not a JSON list ({json_problem(err)})") from None
    return value


def _messages(record: dict, columns: dict[str, str]) -> list[dict]:
    column = columns.get("messages", "messages")
    messages = _message_list(_json_list(record, column), column, columns)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("conversation has no assistant message: nothing to learn from")
    return messages


def _message_list(value, column: str, columns: dict[str, str]) -> list[dict]:
    """Field ``column``'s ``value`` as checked ``{role, content}`` messages."""
    if not isinstance(value, list) or not value:
        raise RowError(f"field {column!r} must be a non-empty list of messages")
    role_key, content_key = columns.get("role", "role"), columns.get("content", "content")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise RowError(f"message {i} must be an object with {role_key!r} and {content_key!r}")
        role, content = m[role_key], m[content_key]
        if not isinstance(role, str) or role not in ROLE_ALIASES:  # a list or dict is not even hashable
            raise RowError(f"message {i} has role {quote(role)}; expected one of {sorted(ROLE_ALIASES)}")
        if not isinstance(content, str):
            raise RowError(f"message {i} content must be text, got {type(content).__name__}")
        messages.append({"role": ROLE_ALIASES[role], "content": _unicode(content, f"message {i} content")})
    return messages


def _shared_prompt(chosen: str, rejected: str) -> str:
    """The prompt of a pair given as two whole texts (HH-RLHF): their shared beginning, up to the
    last whitespace in it, so that the responses start at a word (TRL's ``extract_prompt`` does
    the same)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:max((i for i in range(shared) if chosen[i].isspace()), default=shared)]


def _pair(record: dict, columns: dict[str, str], use_chat_template: bool) -> dict:
    """A preference row as ``{prompt, chosen, rejected}`` texts or two conversations."""
    values = {side: record.get(columns.get(side, side)) for side in PAIR_SIDES}
    if all(isinstance(v, str) for v in values.values()):
        chosen, rejected = (_text(record, side, columns) for side in PAIR_SIDES)
        prompt = _text(record, "prompt", columns, optional=True)
        if not prompt.strip():
            prompt = _shared_prompt(chosen, rejected)
            if not prompt.strip():
                raise RowError("no prompt field, and chosen and rejected share no beginning to take as the prompt")
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        if chosen == rejected:
            raise RowError("chosen and rejected are the same response: the pair prefers nothing")
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise RowError(f"the {side} response is empty")
        if not use_chat_template:
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        values = {side: [{"role": "assistant", "content": text}] for side, text in (("chosen", chosen),
                                                                                     ("rejected", rejected))}
        prefix = [{"role": "user", "content": prompt}]
    else:
        values = {side: _message_list(_json_list(record, columns.get(side, side)), columns.get(side, side), columns)
                  for side in PAIR_SIDES}
        prompt = record.get(columns.get("prompt", "prompt"))
        prefix = []
        if values["chosen"][0]["role"] == "assistant":  # the conversation before the response is the prompt
            if isinstance(prompt, str) and prompt.strip():
                prefix = [{"role": "user", "content": _text(record, "prompt", columns)}]
            elif isinstance(prompt, list):
                prefix = _message_list(prompt, columns.get("prompt", "prompt"), columns)
            else:
                raise RowError("chosen starts with the assistant's response and there is no prompt before it")
    chosen, rejected = (prefix + values[side] for side in PAIR_SIDES)
    for side, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise RowError(f"the last message of {side} is not the assistant's response")
        if not conversation[-1]["content"].strip():
            raise RowError(f"the {side} response is empty")
        if len(conversation) < 2:
            raise RowError(f"{side} has no prompt before its response")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("chosen and rejected differ before their last message: a pair shares its prompt")
    if chosen[-1] == rejected[-1]:
        raise RowError("chosen and rejected are the same response: the pair prefers nothing")
    return {"chosen_messages": chosen, "rejected_messages": rejected}


def check_template(template: str, fmt: str) -> None:
    """A ``data.prompt_template`` must use only the fields the format has, as plain ``{field}``s:
    a format spec or conversion (``{question:>1000000000}``), an attribute or an index would run
    on every row's text."""
    fields = {"instruction": ("instruction", "input"), "qa": ("question",)}[fmt]
    plain = " and ".join("{" + f + "}" for f in fields)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # a lone brace
        raise DataError(f"data.prompt_template={quote(template)}: {err}; write literal braces as "
                        "{{ and }}") from None
    for _, name, spec, conversion in parsed:
        if name is None:  # literal text only
            continue
        problem = (f"it uses {quote('{' + name + '}')}" if name not in fields
                   else "it formats a field" if spec or conversion else None)
        if problem:
            raise DataError(f"data.prompt_template={quote(template)} does not fit format {fmt!r}: {problem}; "
                            f"use plain {plain}")


def to_example(record: dict, fmt: str, columns: dict[str, str], prompt_template: str | None,
               use_chat_template: bool) -> dict:
    """One row as a prompt/response pair, a conversation or a preference pair; ``RowError`` if it is
    malformed."""
    if fmt == "preference":
        return _pair(record, columns, use_chat_template)
    if fmt == "chat":
        return {"messages": _messages(record, columns)}
    if fmt == "instruction":
        instruction, extra = _text(record, "instruction", columns), _text(record, "input", columns, optional=True)
        response = _text(record, "output", columns)
        if use_chat_template:
            user = instruction + (f"\n\n{extra}" if extra.strip() else "")
            return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}]}
        template = prompt_template or (ALPACA_TEMPLATE if extra.strip() else ALPACA_NO_INPUT_TEMPLATE)
        return {"prompt": template.format_map({"instruction": instruction, "input": extra}), "response": response}
    question, answer = _text(record, "question", columns), _text(record, "answer", columns)
    if use_chat_template:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return {"prompt": (prompt_template or QA_TEMPLATE).format_map({"question": question}), "response": answer}


def load_examples(source: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                  prompt_template: str | None = None, use_chat_template: bool = False,
                  bad: BadRows | None = None) -> list[dict]:
    """Every good row of ``source`` as an example, in file order; malformed rows go to ``bad``."""
    columns, bad = columns or {}, bad if bad is not None else BadRows()
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r}: choose auto or one of {FORMATS}")
    examples = []
    for path in source_files(source):
        for where, record in iter_records(path):
            bad.total += 1
            if isinstance(record, RowError):
                bad.bad(where, str(record))
                continue
            if fmt == "auto":
                fmt = detect_format(record, columns)
            if prompt_template is not None and fmt not in ("chat", "preference") and not examples:
                check_template(prompt_template, fmt)
            try:
                examples.append({**to_example(record, fmt, columns, prompt_template, use_chat_template),
                                 "where": where})
            except RowError as err:
                bad.bad(where, str(err))
    if not examples:
        raise DataError(f"no usable rows in {source} ({bad.summary()})")
    return examples


# ---------------------------------------------------------------------------------------------
# Multiple choice (evaluation only)
# ---------------------------------------------------------------------------------------------

def _choice_row(record: dict, columns: dict[str, str]) -> dict:
    question = _text(record, "question", columns)
    column = columns.get("choices", "choices")
    choices = _json_list(record, column)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise RowError(f"field {column!r} must be a list of at least two non-empty texts")
    for i, choice in enumerate(choices):
        _unicode(choice, f"field {column!r}[{i}]")
    answer_column = columns.get("answer", "answer")
    answer = record.get(answer_column)
    if isinstance(answer, str) and answer.strip().isdecimal() and len(answer.strip()) < 10:  # CSV: the index as text
        answer = int(answer)
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        answer = ord(answer.strip().upper()) - ord("A")  # "B" -> 1
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise RowError(f"field {answer_column!r} must be the index of the right choice (0..{len(choices) - 1} "
                       f"or a letter), got {quote(record.get(answer_column))}")
    return {"question": question, "choices": choices, "answer": answer}


def load_choice_rows(source: str | Path, columns: dict[str, str] | None = None,
                     bad: BadRows | None = None) -> list[dict]:
    """Multiple-choice rows ``{question, choices, answer (index), where}`` from files."""
    columns, bad = columns or {}, bad if bad is not None else BadRows()
    rows = []
    for path in source_files(source):
        for where, record in iter_records(path):
            bad.total += 1
            try:
                if isinstance(record, RowError):
                    raise record
                rows.append({**_choice_row(record, columns), "where": where})
            except RowError as err:
                bad.bad(where, str(err))
    if not rows:
        raise DataError(f"no usable rows in {source} ({bad.summary()})")
    return rows

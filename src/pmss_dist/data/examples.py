"""Examples and samples: rows become examples, examples become token ids with labels.

A sample is ``{"tokens": [...], "labels": [...]}`` with ``labels[t]`` the target of position ``t``
(``IGNORE_INDEX`` where no loss is taken); a packed sample adds ``seq_lens`` (its documents'
lengths).

Every source goes through one path: rows (files, or the built-in arithmetic task as question/
answer rows in memory) -> examples (``datasets``) -> token ids with the loss on responses only
(unless ``train_on_prompt``) -> optional packing (``packing``).
"""

from __future__ import annotations

import random

from pmss_dist.data import rows as datasets
from pmss_dist.data.rows import PAIR_SIDES
from pmss_dist.data.packing import pack_samples
from pmss_dist.data.chat_template import render_chat
from pmss_dist.data.tokenizers import TokenizerError
from pmss_dist.console import print_main

IGNORE_INDEX = -100
BUILTIN_ARITHMETIC = "builtin:arithmetic"
# The built-in task's rows are "23+45=" -> "68": the question is the whole prompt.
ARITHMETIC_TEMPLATE = "{question}"
ARITHMETIC_EVAL_SIZE = 512


def _shift(tokens: list[int], trained: list[bool]) -> list[int]:
    """Labels from tokens: position t predicts token t+1 where that token is trained."""
    return [tokens[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(tokens) - 1)] + [IGNORE_INDEX]


def tokenize_pair(tokenizer, prompt: str, response: str, train_on_prompt: bool = False) -> dict:
    """BOS + prompt + response + EOS, with the loss on the response (and EOS) only by default.
    The prompt is tokenised alone, as it will be at inference; the response as its continuation."""
    prompt_ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    response_ids = tokenizer.encode_continuation(response) + [tokenizer.eos_id]
    tokens = prompt_ids + response_ids
    trained = [train_on_prompt] * len(prompt_ids) + [True] * len(response_ids)
    return {"tokens": tokens, "labels": _shift(tokens, trained)}


def tokenize_chat(tokenizer, messages: list[dict], train_on_prompt: bool = False, last_turn_only: bool = False) -> dict:
    """A conversation through the tokenizer's chat template, with the loss on assistant turns
    (their text and end-of-turn marker) only by default; ``last_turn_only``: on the last one.

    The template is rendered for growing prefixes of the conversation: the text an assistant turn
    adds is what ``render(messages[:i+1])`` has beyond ``render(messages[:i], generation prompt)``.
    Templates that rewrite earlier turns (some drop past reasoning) break this and are refused."""
    segments: list[tuple[str, bool]] = []
    done = ""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_turn_only and i != last):
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        after = render_chat(tokenizer, messages[:i + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise TokenizerError("the chat template does not render this conversation as growing prefixes "
                                 "(it rewrites earlier turns), so assistant turns cannot be located")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    rest = render_chat(tokenizer, messages)[len(done):]
    segments.append((rest, False))
    tokens: list[int] = []
    trained: list[bool] = []
    for text, is_response in segments:
        ids = tokenizer.encode_rendered(text, continuation=bool(tokens)) if text else []
        tokens += ids
        trained += [is_response or train_on_prompt] * len(ids)
    bos = tokenizer.encode("", add_bos=True, add_eos=False)
    if bos and tokens[:len(bos)] != bos:  # a template without {{ bos_token }} for a family that uses it
        tokens, trained = bos + tokens, [train_on_prompt] * len(bos) + trained
    return {"tokens": tokens, "labels": _shift(tokens, trained)}


def tokenize_preference(tokenizer, example: dict) -> dict:
    """A preference pair as ``{"chosen": sample, "rejected": sample}``: the same prompt tokens, each
    response trained (the last assistant turn of a conversation)."""
    if "prompt" in example:
        return {side: tokenize_pair(tokenizer, example["prompt"], example[side]) for side in PAIR_SIDES}
    return {side: tokenize_chat(tokenizer, example[f"{side}_messages"], last_turn_only=True) for side in PAIR_SIDES}


def tokenize_example(tokenizer, example: dict, train_on_prompt: bool = False) -> dict:
    if is_pair(example):
        return tokenize_preference(tokenizer, example)
    if "messages" in example:
        return tokenize_chat(tokenizer, example["messages"], train_on_prompt)
    return tokenize_pair(tokenizer, example["prompt"], example["response"], train_on_prompt)


def prompt_tokens(tokenizer, example: dict) -> list[int]:
    """What the model is given at inference for ``example``: the prompt as training tokenised it,
    or the conversation before its last assistant turn plus the template's generation prompt."""
    if "messages" not in example:
        return tokenizer.encode(example["prompt"], add_bos=True, add_eos=False)
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = tokenizer.encode_rendered(render_chat(tokenizer, messages[:last], add_generation_prompt=True))
    bos = tokenizer.encode("", add_bos=True, add_eos=False)
    return ids if not bos or ids[:len(bos)] == bos else bos + ids


def is_pair(example: dict) -> bool:
    """Whether a row-level example (or a tokenized sample) is a preference pair."""
    return "chosen" in example or "chosen_messages" in example


def sample_rows(sample: dict) -> list[dict]:
    """The token rows of a tokenized sample: itself, or a pair's two."""
    return [sample[side] for side in PAIR_SIDES] if "chosen" in sample else [sample]


def reference_response(example: dict) -> str:
    """The response an example trains on (the last assistant turn of a conversation)."""
    if "messages" not in example:
        return example["response"]
    return [m for m in example["messages"] if m["role"] == "assistant"][-1]["content"]


def arithmetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """The built-in task: two-number addition, ``"23+45="`` -> ``"68"``."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        pairs.append((f"{a}+{b}=", str(a + b)))
    return pairs


def arithmetic_rows(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """The built-in task as question/answer rows. ``held_out``: ``n`` distinct problems that the
    training rows of the same seed (``n`` of them: pass the training size) never contain."""
    if not held_out:
        return [{"question": q, "answer": a} for q, a in arithmetic_pairs(n, seed)]
    seen = {q for q, _ in arithmetic_pairs(n, seed)}
    rng, rows = random.Random(f"arithmetic/held-out/{seed}"), []
    while len(rows) < min(ARITHMETIC_EVAL_SIZE, 10_000 - len(seen)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if f"{a}+{b}=" not in seen:
            seen.add(f"{a}+{b}=")
            rows.append({"question": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def arithmetic_preference_examples(rows: list[dict], seed: int) -> list[dict]:
    """The built-in task as preference pairs: the right sum chosen, a sum off by 1 to 10 rejected
    (drawn from ``seed``)."""
    rng = random.Random(f"arithmetic/rejected/{seed}")
    examples = []
    for i, r in enumerate(rows):
        right = int(r["answer"])
        wrong = right + rng.choice([d for d in range(-10, 11) if d and right + d >= 0])
        examples.append({"prompt": ARITHMETIC_TEMPLATE.format_map(r), "chosen": r["answer"], "rejected": str(wrong),
                         "where": f"{BUILTIN_ARITHMETIC}:{i + 1}"})
    return examples


def arithmetic_examples(rows: list[dict], prompt_template: str | None = None) -> list[dict]:
    """Built-in rows through the same question/answer formatting as files."""
    return [{**datasets.to_example(r, "qa", {}, prompt_template or ARITHMETIC_TEMPLATE, False),
             "where": f"{BUILTIN_ARITHMETIC}:{i + 1}"} for i, r in enumerate(rows)]


def _report(message: str) -> None:
    print_main(f"data: {message}")


def _examples(source: str, data_cfg, seed: int, held_out: bool, bad: datasets.BadRows, pairs: bool) -> list[dict]:
    if source == BUILTIN_ARITHMETIC:
        if data_cfg.prompt_template is not None:
            datasets.check_template(data_cfg.prompt_template, "qa")
        rows = arithmetic_rows(data_cfg.num_samples, seed, held_out=held_out)
        bad.total += len(rows)
        return arithmetic_preference_examples(rows, seed) if pairs else arithmetic_examples(rows, data_cfg.prompt_template)
    if source.startswith("builtin:"):
        raise datasets.DataError(f"unknown built-in data source {source!r}; the built-in one is {BUILTIN_ARITHMETIC!r}")
    examples = datasets.load_examples(source, data_cfg.format, data_cfg.columns, data_cfg.prompt_template,
                                      data_cfg.use_chat_template, bad)
    if is_pair(examples[0]) and not pairs:
        raise datasets.DataError(f"{source} holds preference pairs (chosen/rejected), which objective.kind=sft does not "
                                 "train on: set objective.kind=dpo, or data.format to a supervised format")
    if pairs and not is_pair(examples[0]):
        raise datasets.DataError(f"{source} holds no preference pairs, and objective.kind=dpo trains on them: give rows "
                                 "with prompt/chosen/rejected (docs/DATA.md), or set data.format=preference")
    return examples


def _tokenized(source: str, data_cfg, tokenizer, seed: int, held_out: bool, pairs: bool) -> list[dict]:
    bad = datasets.BadRows(data_cfg.on_bad_row)
    samples = []
    for example in _examples(source, data_cfg, seed, held_out, bad, pairs):
        try:
            samples.append(tokenize_example(tokenizer, example, data_cfg.train_on_prompt))
        except TokenizerError as err:
            bad.bad(example["where"], str(err))
    if not samples:
        raise datasets.DataError(f"no usable rows in {source} ({bad.summary()})")
    if bad.skipped:
        _report(f"{source}: {bad.summary()}")
    # A pair is lost when either of its rows is: it takes no loss (eval.preference).
    too_long = [s for s in samples if any(len(r["tokens"]) > data_cfg.seq_len for r in sample_rows(s))]
    if too_long:
        lost = sum(any(all(x == IGNORE_INDEX for x in r["labels"][:data_cfg.seq_len]) for r in sample_rows(s))
                   for s in too_long)
        if lost == len(samples):  # nothing left to train on: a step would divide by zero targets
            need = min(max(next((t for t, x in enumerate(r["labels"]) if x != IGNORE_INDEX), len(r["labels"]))
                           for r in sample_rows(s)) for s in samples) + 1
            raise datasets.DataError(f"data.seq_len={data_cfg.seq_len} cuts every one of the {len(samples)} samples "
                                     f"of {source} before its first trained token: raise data.seq_len to at "
                                     f"least {need}")
        _report(f"{source}: {len(too_long)} of {len(samples)} samples are longer than data.seq_len="
                f"{data_cfg.seq_len} and are cut ({lost} lose every trained token); raise data.seq_len")
    return samples


def build_dataset(data_cfg, tokenizer, seed: int, pairs: bool = False) -> list[dict]:
    """The training samples that ``data_cfg`` (a ``config.DataConfig``) names, tokenised, and
    packed into ``seq_len`` rows when ``data_cfg.packed``; ``pairs``: preference pairs (a dpo
    run), which a file must hold and the built-in task makes."""
    samples = _tokenized(data_cfg.source, data_cfg, tokenizer, seed, held_out=False, pairs=pairs)
    if data_cfg.packed:
        packs = pack_samples(samples, data_cfg.seq_len, seed)
        _report(f"packed {len(samples)} samples into {len(packs)} rows of {data_cfg.seq_len} tokens")
        return packs
    return samples


def build_eval_dataset(data_cfg, tokenizer, seed: int, pairs: bool = False) -> list[dict]:
    """The held-out samples of ``data_cfg.eval_source`` (``builtin:arithmetic``: problems the
    training rows never contain), tokenised and not packed."""
    return _tokenized(data_cfg.eval_source, data_cfg, tokenizer, seed, held_out=True, pairs=pairs)



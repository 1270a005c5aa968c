"""Accuracy: GSM8K-style answers (generation, final-number exact match) and multiple choice
(log-likelihood of each choice).

Accuracy runs are data parallel: each rank scores a contiguous slice of the rows and the
per-row records are all-gathered, so rank 0 sees the same records at any world size. A model
sharded with FSDP makes collectives in every forward, so every rank runs the same number of
batches (short slices run one padding batch whose records are dropped) and generation goes on
until all ranks are done.
"""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist

from pmss_dist.data.examples import prompt_tokens, reference_response
from pmss_dist.eval.generation import generate


# A number: optional minus (not a hyphen inside a word/range like "3-4"), optional $,
# digits with optional thousands commas, optional decimals. "3." leaves the period out.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?\d+(?:,\d{3})*(?:\.\d+)?")


def canonical_number(number: str) -> str:
    number = number.replace("$", "").replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")  # 12.0 -> 12, 12.50 -> 12.5
    return "0" if number in ("-0", "") else number


def extract_final_number(text: str) -> str | None:
    """GSM8K-style final answer: the first number after the last ``####`` when there is one,
    else the last number anywhere. Canonicalised (no ``$`` or commas, no trailing ``.0``)."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
    else:
        found = None
        for found in _NUMBER.finditer(text):
            pass
    return canonical_number(found.group()) if found else None


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank_slice(n: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced share of ``n`` rows (sizes differ by at most one)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def _lockstep_batches(n: int, rank: int, world_size: int, batch_size: int) -> list[list[int] | None]:
    """This rank's batches of row indices, padded with ``None`` (run, then dropped) to the count
    of the largest slice."""
    mine = list(rank_slice(n, rank, world_size))
    count = math.ceil(math.ceil(n / world_size) / batch_size)
    batches: list[list[int] | None] = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return batches + [None] * (count - len(batches))


def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's records, in row order, on every rank."""
    if _distributed():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def score_generations(model, tokenizer, examples: list[dict], *, batch_size: int, max_new_tokens: int,
                      temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                      cache_dtype: torch.dtype | None = None) -> list[dict]:
    """Generate a response per example (this rank's slice) and compare its final number with the
    reference's (``final_number_match``). Returns all ranks' records."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    records = []
    for indices in _lockstep_batches(len(examples), rank, world, batch_size):
        rows = indices if indices is not None else [0]
        prompts = [prompt_tokens(tokenizer, examples[i]) for i in rows]
        outputs = generate(model, prompts, max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                           temperature=temperature, top_k=top_k, seed=seed, row_ids=rows,
                           cache_dtype=cache_dtype, lockstep=_distributed())
        if indices is None:
            continue
        for i, new in zip(indices, outputs):
            text = tokenizer.decode(new)
            records.append({"index": i, "where": examples[i]["where"], "generated": text,
                            **final_number_match(text, reference_response(examples[i]))})
    return gather_records(records)


def final_number_match(generated: str, reference: str) -> dict:
    """GSM8K exact match: the final number of the generation (after its last ``####``, else its
    last number) equals the reference's, both canonicalised (no ``$``/commas, ``12.0`` = ``12``)."""
    predicted, expected = extract_final_number(generated), extract_final_number(reference)
    return {"predicted": predicted, "expected": expected, "correct": predicted is not None and predicted == expected}


@torch.no_grad()
def _choice_logprobs(model, contexts: list[list[int]], continuations: list[list[int]], pad_id: int) -> list[float]:
    """Sum of log p(continuation | context) for each pair, in one right-padded forward."""
    seqs = [c + x for c, x in zip(contexts, continuations)]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    logprobs = torch.log_softmax(model(tokens.to(device)).float(), dim=-1).cpu()
    out = []
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        positions = torch.arange(len(c) - 1, len(c) + len(x) - 1)  # position t predicts token t+1
        out.append(float(logprobs[i, positions, torch.tensor(x)].sum()))
    return out


def score_choices(model, tokenizer, rows: list[dict], *, batch_size: int, prompt_template: str) -> list[dict]:
    """Pick the choice with the highest log-likelihood after the question prompt (``correct``), and
    with the highest per-character log-likelihood (``correct_norm``, lm-eval's acc_norm)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    records = []
    for indices in _lockstep_batches(len(rows), rank, world, batch_size):
        batch = indices if indices is not None else [0]
        contexts, continuations, owners = [], [], []
        for i in batch:
            context = tokenizer.encode(prompt_template.format_map({"question": rows[i]["question"]}),
                                       add_bos=True, add_eos=False)
            for choice in rows[i]["choices"]:
                contexts.append(context)
                continuations.append(tokenizer.encode_continuation(choice))
                owners.append(i)
        scores = _choice_logprobs(model, contexts, continuations, tokenizer.pad_id)
        if indices is None:
            continue
        for i in indices:
            mine = [s for s, o in zip(scores, owners) if o == i]
            norm = [s / len(c) for s, c in zip(mine, rows[i]["choices"])]
            pred, pred_norm = max(range(len(mine)), key=mine.__getitem__), max(range(len(norm)), key=norm.__getitem__)
            records.append({"index": i, "where": rows[i]["where"], "logprobs": mine, "predicted": pred,
                            "predicted_norm": pred_norm, "expected": rows[i]["answer"],
                            "correct": pred == rows[i]["answer"], "correct_norm": pred_norm == rows[i]["answer"]})
    return gather_records(records)


def summarize(task: str, records: list[dict], rows: list[dict] | None = None) -> dict:
    """Accuracy (and for multiple choice acc_norm and the chance level) over all records."""
    n = len(records)
    summary = {"task": task, "n": n, "accuracy": sum(r["correct"] for r in records) / n if n else float("nan")}
    if task == "choice":
        summary["accuracy_norm"] = sum(r["correct_norm"] for r in records) / n
        summary["chance"] = sum(1 / len(rows[r["index"]]["choices"]) for r in records) / n
    return summary

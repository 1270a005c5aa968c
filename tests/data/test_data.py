"""Tokenizers, loss masks, file formats, malformed rows, config fields and the resumable sampler,
each against hand-checked values or an independent tokenisation by the underlying library."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from pmss_dist.data import batches
from pmss_dist.data import examples as D
from pmss_dist.data import rows as datasets
from pmss_dist.models.builtin import write_tiny_checkpoint
from pmss_dist.config import ConfigError, DataConfig, load_config
from pmss_dist.data.chat_template import render_chat
from pmss_dist.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer

IGNORE = D.IGNORE_INDEX
CORPUS = ["Question: what is two plus two?\nAnswer: four", "The cat sat on the mat.\n",
          "Hello world, hello there.\n", "[INST] hi [/INST] four"] * 20
CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "four"}]


def _trained(tokens, labels):
    return [t for t, lab in zip(tokens[1:], labels) if lab != IGNORE]


# ---------------------------------------------------------------------------------------------
# Byte tokenizer
# ---------------------------------------------------------------------------------------------

def test_byte_pair_masks_the_prompt():
    tok = ByteTokenizer(bos_id=256, eos_id=257, pad_id=258)
    s = D.tokenize_pair(tok, "1+2=", "3")
    assert s["tokens"] == [256, ord("1"), ord("+"), ord("2"), ord("="), ord("3"), 257]
    assert s["labels"] == [IGNORE, IGNORE, IGNORE, IGNORE, ord("3"), 257, IGNORE]
    full = D.tokenize_pair(tok, "1+2=", "3", train_on_prompt=True)
    assert full["labels"] == full["tokens"][1:] + [IGNORE]


def test_byte_chat_uses_plain_template_and_trains_assistant_only():
    tok = ByteTokenizer(bos_id=256, eos_id=257, pad_id=258)
    assert render_chat(tok, CHAT) == "<|bos|>### User:\nhello\n\n### Assistant:\nfour<|eos|>"
    s = D.tokenize_chat(tok, CHAT)
    assert s["tokens"][0] == 256 and s["tokens"].count(256) == 1  # BOS once, as an id
    assert _trained(s["tokens"], s["labels"]) == list(b"four") + [257]
    prompt = D.prompt_tokens(tok, {"messages": CHAT})
    assert bytes(t for t in prompt if t < 256).decode() == "### User:\nhello\n\n### Assistant:\n"
    assert s["tokens"][:len(prompt)] == prompt


def test_builtin_checkpoint_tokenizer_and_task(tmp_path):
    tok = load_tokenizer(write_tiny_checkpoint(tmp_path))
    assert isinstance(tok, ByteTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    cfg = DataConfig(num_samples=50)
    samples = D.build_dataset(cfg, tok, seed=3)
    # The built-in task is question/answer rows through the same path; the prompt is the question.
    expected = [D.tokenize_pair(tok, q, a) for q, a in D.arithmetic_pairs(50, seed=3)]
    assert samples == expected
    held_out = D.build_eval_dataset(DataConfig(num_samples=50, eval_source="builtin:arithmetic"), tok, seed=3)
    train_prompts = {bytes(s["tokens"][1:-1]) for s in samples}
    assert len(held_out) == D.ARITHMETIC_EVAL_SIZE
    assert not {bytes(s["tokens"][1:-1]) for s in held_out} & train_prompts


# ---------------------------------------------------------------------------------------------
# SentencePiece (a tiny model trained here)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    buf = io.BytesIO()
    # LLaMA-2's settings: BPE, byte fallback, no normalisation, a dummy prefix on each encode.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, split_by_whitespace=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "config.json").write_text(json.dumps({"pad_token_id": 0}))
    return out


def test_sentencepiece_pair(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = tok._tt.spm_model
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, 0, (2,))
    s = D.tokenize_pair(tok, "Question: two?\nAnswer:", " four")
    # Independent reference: SentencePiece on the whole text, as the model saw it in pretraining.
    assert s["tokens"] == [1] + sp.encode("Question: two?\nAnswer: four") + [2]
    prompt_len = len(sp.encode("Question: two?\nAnswer:"))
    assert _trained(s["tokens"], s["labels"]) == sp.encode("Question: two?\nAnswer: four")[prompt_len:] + [2]
    # A continuation gets no word-start marker of its own: "four" right after "Answer:".
    assert tok.encode_continuation("four") == sp.encode("Answer:four")[len(sp.encode("Answer:")):]


def test_sentencepiece_chat_maps_control_tokens(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = tok._tt.spm_model
    text = render_chat(tok, CHAT)
    assert text == "<s>[INST] hello [/INST] four </s>"  # the LLaMA-2 default template
    s = D.tokenize_chat(tok, CHAT)
    assert s["tokens"][0] == 1 and s["tokens"][-1] == 2 and 1 not in s["tokens"][1:]  # "<s>" became the id
    assert s["tokens"] == [1] + sp.encode("[INST] hello [/INST] four ") + [2]
    prompt_len = len(sp.encode("[INST] hello [/INST]"))
    assert _trained(s["tokens"], s["labels"]) == sp.encode("[INST] hello [/INST] four ")[prompt_len:] + [2]


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (tiny ones built with the tokenizers library)
# ---------------------------------------------------------------------------------------------

def _byte_level_bpe(specials, bos=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:  # Llama-3's post-processor puts BOS before every encoded text
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    return t


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama3")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    _byte_level_bpe(specials, bos="<|begin_of_text|>").save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                           "eos_token": "<|end_of_text|>"}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    return out


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen")
    _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(str(out / "tokenizer.json"))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                           "pad_token": "<|endoftext|>", "chat_template": template}))
    return out


def test_hf_llama3_bos_once_and_stop_tokens(llama3_dir):
    from tokenizers import Tokenizer

    tok = load_tokenizer(llama3_dir)
    ref = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.adds_bos
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # no pad token: EOS pads
    assert set(tok.stop_ids) == {1, 4}  # <|end_of_text|> and <|eot_id|>
    s = D.tokenize_pair(tok, "Question: two?\nAnswer:", " four")
    # The library's own encoding (its post-processor adds the one BOS) plus our EOS.
    assert s["tokens"] == ref.encode("Question: two?\nAnswer: four").ids + [1]
    assert tok.decode(_trained(s["tokens"], s["labels"])) == " four"


def test_hf_llama3_default_chat_template(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    text = render_chat(tok, CHAT)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nfour<|eot_id|>")
    s = D.tokenize_chat(tok, CHAT)
    assert s["tokens"] == tok._tok.encode(text, add_special_tokens=False).ids
    assert s["tokens"].count(0) == 1
    trained = _trained(s["tokens"], s["labels"])
    assert tok._tok.decode(trained, skip_special_tokens=False) == "four<|eot_id|>"


def test_hf_qwen_no_bos_and_checkpoint_template(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    assert tok.bos_id is None and tok.eos_token == "<|im_end|>" and tok.pad_id == 0
    s = D.tokenize_chat(tok, [{"role": "system", "content": "Be brief."}] + CHAT)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
            "<|im_start|>assistant\nfour<|im_end|>\n")
    assert s["tokens"] == tok._tok.encode(text, add_special_tokens=False).ids  # no BOS anywhere
    assert tok._tok.decode(_trained(s["tokens"], s["labels"]), skip_special_tokens=False) == "four<|im_end|>\n"
    pair = D.tokenize_pair(tok, "Q:", " four")
    assert pair["tokens"] == tok._tok.encode("Q: four").ids + [tok.eos_id]


def test_hf_metaspace_continuation(tmp_path):
    """LLaMA-2/Mistral as tokenizer.json: a word-start marker on each encode, cut from continuations."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    s = D.tokenize_pair(tok, "Question: two?\nAnswer:", " four")
    assert s["tokens"] == t.encode("Question: two?\nAnswer: four").ids + [tok.eos_id]
    assert t.encode("four").tokens == ["▁four"]  # alone it would get the marker ...
    assert s["tokens"][-2] == t.token_to_id("▁four")  # ... which here belongs to the space


def test_chat_template_runs_sandboxed(tmp_path):
    tok = ByteTokenizer(256, 257, 258)
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TokenizerError, match="chat template"):
        render_chat(tok, CHAT)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TokenizerError, match="roles must alternate"):
        render_chat(tok, CHAT)


# ---------------------------------------------------------------------------------------------
# Files, formats, column mapping, malformed rows
# ---------------------------------------------------------------------------------------------

QA_ROWS = [{"problem": "What is 2+2?", "solution": "2+2=4\n#### 4"}, {"problem": "What is 3+3?", "solution": "#### 6"}]


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_qa_files_with_column_mapping(tmp_path, suffix):
    path = _write(tmp_path / f"qa{suffix}", QA_ROWS)
    examples = datasets.load_examples(path, columns={"question": "problem", "answer": "solution"})
    assert [e["prompt"] for e in examples] == ["Question: What is 2+2?\nAnswer:\n", "Question: What is 3+3?\nAnswer:\n"]
    assert [e["response"] for e in examples] == ["2+2=4\n#### 4", "#### 6"]
    first_line = {".jsonl": 1, ".json": 2, ".csv": 2, ".parquet": None}[suffix]
    assert examples[0]["where"] == (f"{path}:{first_line}" if first_line else f"{path}:row 1")


def test_instruction_and_chat_formats(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 2", "output": "4"}, {"instruction": "Say hi.", "output": "hi"}]
    examples = datasets.load_examples(_write(tmp_path / "alpaca.jsonl", rows))
    assert examples[0]["prompt"] == datasets.ALPACA_TEMPLATE.format(instruction="Add.", input="2 and 2")
    assert examples[1]["prompt"] == datasets.ALPACA_NO_INPUT_TEMPLATE.format(instruction="Say hi.")
    custom = datasets.load_examples(tmp_path / "alpaca.jsonl", prompt_template="{instruction}|{input}|")
    assert [e["prompt"] for e in custom] == ["Add.|2 and 2|", "Say hi.||"]
    as_chat = datasets.load_examples(tmp_path / "alpaca.jsonl", use_chat_template=True)
    assert as_chat[0]["messages"] == [{"role": "user", "content": "Add.\n\n2 and 2"},
                                      {"role": "assistant", "content": "4"}]

    share_gpt = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    chat = datasets.load_examples(_write(tmp_path / "chat.json", share_gpt), fmt="chat",
                                  columns={"messages": "conversations", "role": "from", "content": "value"})
    assert chat[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(datasets.DataError, match="does not fit format 'qa'"):
        datasets.load_examples(_write(tmp_path / "qa.jsonl", QA_ROWS), columns={"question": "problem",
                               "answer": "solution"}, prompt_template="{instruction}")


def test_malformed_rows_name_file_and_line(tmp_path):
    lines = [json.dumps({"question": "a?", "answer": "1"}), "{not json", json.dumps({"question": "b?"}),
             "", json.dumps({"question": "c?", "answer": 3}), json.dumps({"question": "d?", "answer": "4"})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(datasets.DataError, match=rf"{path}:2: not valid JSON"):
        datasets.load_examples(path)
    bad = datasets.BadRows("skip")
    examples = datasets.load_examples(path, bad=bad)
    assert [e["where"] for e in examples] == [f"{path}:1", f"{path}:6"]
    assert (bad.total, bad.skipped) == (5, 3)
    assert bad.examples[1] == f"{path}:3: missing field 'answer'"
    assert bad.examples[2] == f"{path}:5: field 'answer' must be text, got int"

    array = tmp_path / "bad.json"
    array.write_text('[\n  {"question": "a?", "answer": "1"},\n  {"question": "",\n   "answer": "2"}\n]\n')
    with pytest.raises(datasets.DataError, match=rf"{array}:3: field 'question' is empty"):
        datasets.load_examples(array)

    table = tmp_path / "bad.csv"
    table.write_text('question,answer\n"multi\nline?",1\nonly-one-field\n')
    with pytest.raises(datasets.DataError, match=rf"{table}:4: fewer fields"):
        datasets.load_examples(table)

    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(datasets.DataError, match=rf"{chat}:1: conversation has no assistant"):
        datasets.load_examples(chat)


def test_build_dataset_skip_mode_reports(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n[1, 2]\n{"question": "2+2=", "answer": "4"}\n')
    tok = ByteTokenizer(256, 257, 258)
    cfg = DataConfig(source=str(path), seq_len=32)
    with pytest.raises(datasets.DataError, match=rf"{path}:2: expected a JSON object"):
        D.build_dataset(cfg, tok, seed=0)
    cfg.on_bad_row = "skip"
    samples = D.build_dataset(cfg, tok, seed=0)
    assert len(samples) == 2
    assert "skipped 1 malformed rows of 3" in capsys.readouterr().err


def test_bytes_that_are_not_utf8_are_a_malformed_row_at_their_line(tmp_path, capsys):
    # issue 21, item 11: a 0xFF byte on line 3 raised UnicodeDecodeError, also with on_bad_row=skip
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n'
                     b'{"question": "3+\xff=", "answer": "6"}\n{"question": "4+4=", "answer": "8"}\n')
    with pytest.raises(datasets.DataError, match=rf"{path}:3: not valid UTF-8 \(byte 0xff at column 17\)"):
        datasets.load_examples(path)
    bad = datasets.BadRows("skip")
    assert [e["where"] for e in datasets.load_examples(path, bad=bad)] == [f"{path}:{i}" for i in (1, 2, 4)]
    assert bad.skipped == 1 and f"{path}:3: not valid UTF-8" in bad.summary()
    for suffix, text in ((".json", b'[{"question": "1+1=", "answer": "2"},\n {"question": "\xfe", "answer": "4"}]'),
                         (".csv", b'question,answer\n1+1=,2\n2+\xff=,4\n')):
        other = tmp_path / f"d{suffix}"
        other.write_bytes(text)  # a file read whole: the error names the line and stops the load
        with pytest.raises(datasets.DataError, match=rf"{other}:[23]: not valid UTF-8"):
            datasets.load_examples(other, bad=datasets.BadRows("skip"))


def test_seq_len_that_leaves_nothing_to_train_is_refused():
    # issue 21, item 12: every sample cut before its first trained token ended in ZeroDivisionError
    tok = ByteTokenizer(256, 257, 258)
    cfg = DataConfig(num_samples=16, seq_len=4)
    with pytest.raises(datasets.DataError, match=r"data.seq_len=4 cuts every one of the 16 samples of "
                                                 r"builtin:arithmetic before its first trained token: raise "
                                                 r"data.seq_len to at least \d+"):
        D.build_dataset(cfg, tok, seed=0)
    cfg.seq_len = 8  # some samples keep a trained token: trains, with the usual report
    assert len(D.build_dataset(cfg, tok, seed=0)) == 16


def test_choice_rows(tmp_path):
    rows = [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}, {"question": "x", "choices": ["a"], "answer": 0},
            {"question": "1+1?", "choices": ["2", "5", "7"], "answer": "A"}]
    bad = datasets.BadRows("skip")
    loaded = datasets.load_choice_rows(_write(tmp_path / "mc.jsonl", rows), bad=bad)
    assert [r["answer"] for r in loaded] == [1, 0] and bad.skipped == 1


def test_data_config_fields(tmp_path):
    cfg = load_config(None, ["data.columns={question: problem}", "data.format=qa", "data.packed=true",
                             "data.on_bad_row=skip", "data.eval_source=builtin:arithmetic", "data.eval_every=5"])
    assert cfg.data.columns == {"question": "problem"} and cfg.data.packed and cfg.data.eval_every == 5
    for bad, match in [("data.format=tsv", "data.format"), ("data.on_bad_row=ignore", "data.on_bad_row"),
                       ("data.columns={bogus: x}", "data.columns"), ("data.columns=[a]", "must be a mapping"),
                       ("data.eval_every=3", "needs data.eval_source")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


# ---------------------------------------------------------------------------------------------
# The sampler: world-size independent and resumable
# ---------------------------------------------------------------------------------------------

def _global_batches(sampler, steps, world_size, micro):
    out = []
    for _ in range(steps):
        indices = sampler.next_batch()
        shares = [batches.rank_micro_batches(indices, r, world_size, micro) for r in range(world_size)]
        out.append([i for share in shares for mb in share for i in mb])
    return out


def test_sampler_world_sizes_and_resume():
    reference = _global_batches(batches.GlobalBatchSampler(50, 8, seed=1), 20, 1, 8)  # 20 steps: 3+ epochs
    assert all(sorted(b) == sorted(set(b)) for b in reference)
    for world in (2, 4):
        assert _global_batches(batches.GlobalBatchSampler(50, 8, seed=1), 20, world, 8 // world // 2 or 1) == reference
    for k in (0, 3, 6, 7, 13):  # stop after step k (inside and at the end of epochs), resume fresh
        first = batches.GlobalBatchSampler(50, 8, seed=1)
        head = _global_batches(first, k, 2, 2)
        state = json.loads(json.dumps(first.state_dict()))  # as it travels in a checkpoint
        resumed = batches.GlobalBatchSampler(50, 8, seed=1)
        resumed.load_state_dict(state)
        assert head + _global_batches(resumed, 20 - k, 4, 1) == reference
    with pytest.raises(ValueError, match="global_batch=8"):
        batches.GlobalBatchSampler(50, 16, seed=1).load_state_dict(state)
    legacy = batches.GlobalBatchSampler(50, 8, seed=1)
    legacy.load_state_dict({"step": 5})  # checkpoints written before the state recorded its origin
    assert _global_batches(legacy, 15, 1, 8) == reference[5:]


def test_eval_batches_cover_the_set_once_at_any_world_size():
    samples = [{"tokens": [i, i + 1], "labels": [i + 1, IGNORE]} for i in range(11)]
    for world in (1, 2, 4):
        per_rank = [batches.eval_micro_batches(samples, r, world, 2, 4, pad_id=0) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # same forward count on every rank
        seen = sorted(int(t) for batches in per_rank for b in batches
                      for row, lab in zip(b["tokens"], b["labels"]) if (lab != IGNORE).any() for t in row[:1])
        assert seen == list(range(11))
        limited = [batches.eval_micro_batches(samples, r, world, 2, 4, pad_id=0, max_samples=5) for r in range(world)]
        firsts = sorted(int(b["tokens"][j, 0]) for bs in limited for b in bs for j in range(2)
                        if (b["labels"][j] != IGNORE).any())
        assert firsts == [0, 1, 2, 3, 4]  # the same five samples whatever the world size
    assert torch.equal(batches.collate(samples[:2], 4, 0)["tokens"], torch.tensor([[0, 1, 0, 0], [1, 2, 0, 0]]))

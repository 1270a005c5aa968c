"""Tokenizers loaded from a checkpoint directory, behind one small interface.

Every tokenizer here has ``bos_id`` (None when the family uses no BOS, e.g. Qwen2), ``eos_id``,
``pad_id``, ``stop_ids`` (ids that end a generation), ``vocab_size``, ``bos_token``/``eos_token``
(their text, as chat templates write them) and:

- ``encode(text, add_bos, add_eos)``: text at the start of a sequence;
- ``encode_continuation(text)``: text that follows other text. SentencePiece-style tokenizers put a
  word-start marker before the first word of every ``encode`` call; a continuation must not get it,
  or ``encode(a) + encode_continuation(b)`` would differ from what the model saw in pretraining;
- ``encode_rendered(text)``: template output, where special tokens appear as text (``<s>``,
  ``<|im_start|>``) and must become their ids, not characters;
- ``decode(ids)``: text without special tokens;
- ``chat_template``: Jinja source, from the checkpoint or a per-family default, and
  ``chat_template_source``: where it is (a file, or which default), for messages.

Three kinds: the built-in byte tokenizer, SentencePiece ``tokenizer.model`` (LLaMA-2, Mistral,
Gemma; torchtune's ``SentencePieceBaseTokenizer``) and Hugging Face ``tokenizer.json`` (Llama-3,
Qwen2, SmolLM2; the ``tokenizers`` library). Chat templates render in a sandbox with limits
(`data.chat_template.render_chat`): a template that does not compile or runs past them is a
`ChatTemplateError`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pmss_dist.errors import TokenizerError
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
# End-of-turn markers of the chat families: generation stops on them as on EOS.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")

# Per-family chat templates for checkpoints that ship none. Same variables as Hugging Face
# templates (messages, bos_token, eos_token, add_generation_prompt).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# LLaMA-2 / Mistral: a system message is folded into the first user turn (<<SYS>> block).
INST_TEMPLATE = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if system and loop.first %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}{{ m['content'] | trim }} [/INST]"
    "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}")
PLAIN_TEMPLATE = (  # newlines inside expressions: trim_blocks eats the one after a block tag
    "{{ bos_token }}{% for m in messages %}{{ '### ' ~ (m['role'] | capitalize) ~ ':\\n' ~ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}")


def _split_on(text: str, specials: dict[str, int]):
    """Yield ``(piece, special_id_or_None)`` for ``text`` cut at every occurrence of a special
    token string (longest first, so ``</s>`` is not read as ``<s>`` inside it)."""
    if not specials:
        yield text, None
        return
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], None
        yield m.group(), specials[m.group()]
        pos = m.end()
    if pos < len(text):
        yield text[pos:], None


class _SplitSpecials:
    """``encode_rendered`` for tokenizers whose encoder does not recognise special tokens written
    as text (SentencePiece control symbols, the byte tokenizer)."""

    specials: dict[str, int]

    def encode_rendered(self, text: str, continuation: bool = False) -> list[int]:
        ids: list[int] = []
        after_text = continuation
        for piece, special in _split_on(text, self.specials):
            if special is not None:
                ids.append(special)
                after_text = False  # after a special token, text starts a new word
            else:
                ids += self.encode_continuation(piece) if after_text else self.encode(piece, False, False)
                after_text = True
        return ids


class ByteTokenizer(_SplitSpecials):
    """UTF-8 bytes as ids 0..255 plus BOS/EOS/PAD: the built-in model's tokenizer."""

    bos_token, eos_token = "<|bos|>", "<|eos|>"

    def __init__(self, bos_id: int, eos_id: int, pad_id: int):
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.stop_ids = (eos_id,)
        self.vocab_size = max(bos_id, eos_id, pad_id) + 1
        self.specials = {self.bos_token: bos_id, self.eos_token: eos_id}
        self.chat_template, self.chat_template_source = PLAIN_TEMPLATE, _default_source("plain")

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_continuation(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(_SplitSpecials):
    """A ``tokenizer.model`` through torchtune's ``SentencePieceBaseTokenizer``; BOS at the start
    of every sequence (LLaMA-2, Mistral and Gemma all train with it)."""

    def __init__(self, path: Path, pad_id: int | None = None, extra_stop_ids=(),
                 chat_template: tuple[str, str] | None = None):
        from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

        try:
            self._tt = SentencePieceBaseTokenizer(str(path))
        except Exception as err:  # sentencepiece raises RuntimeError/OSError for non-SP files
            raise TokenizerError(f"{path} is not a SentencePiece model: {err}") from err
        spm = self._tt.spm_model
        self.vocab_size = spm.vocab_size()
        self.bos_id = self._tt.bos_id if self._tt.bos_id >= 0 else None
        self.eos_id = self._tt.eos_id
        if self.eos_id < 0:
            raise TokenizerError(f"{path} defines no EOS token: generation could not stop")
        own_pad = self._tt.pad_id if self._tt.pad_id >= 0 else None
        self.pad_id = own_pad if own_pad is not None else (pad_id if pad_id is not None else self.eos_id)
        self.bos_token = spm.id_to_piece(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = spm.id_to_piece(self.eos_id)
        # Control symbols (<s>, </s>, Mistral's [INST] ...) are never produced from text by
        # SentencePiece; templates write them as text, so they are cut out and mapped by hand.
        self.specials = {spm.id_to_piece(i): i for i in range(self.vocab_size) if spm.is_control(i)}
        turn_ends = {t: spm.piece_to_id(t) for t in END_OF_TURN_TOKENS}
        turn_ends = {t: i for t, i in turn_ends.items() if spm.id_to_piece(i) == t}  # unknown -> <unk>
        self.stop_ids = _unique((self.eos_id, *extra_stop_ids, *turn_ends.values()))
        # The checkpoint's own (template, source), else the family's default.
        default = (GEMMA_TEMPLATE, _default_source("Gemma")) if "<end_of_turn>" in turn_ends else (
            INST_TEMPLATE, _default_source("[INST]"))
        self.chat_template, self.chat_template_source = chat_template or default

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return self._tt.encode(text, add_bos=add_bos and self.bos_id is not None, add_eos=add_eos)

    def encode_continuation(self, text: str) -> list[int]:
        # torchtune drops the word-start marker by encoding "\n" + text and cutting the "\n"
        # pieces (it only does so for models that encode whitespace, where the cut is exact).
        return self._tt.encode(text, add_bos=False, add_eos=False, trim_leading_whitespace=True)

    def decode(self, ids) -> str:
        return self._tt.decode(list(ids))  # control symbols decode to nothing


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library.

    torchtune's ``HuggingFaceBaseTokenizer`` does not fit two of our families: it refuses a
    ``tokenizer_config.json`` whose ``bos_token`` is null (Qwen2 has no BOS), and it cannot encode
    text without the post-processor's BOS (Llama-3 would get a second BOS before every response).
    So special tokens are handled here: BOS is added where the tokenizer's own post-processor adds
    it (Llama-3 yes; Qwen2, SmolLM2 no), EOS is appended to every training response.
    """

    def __init__(self, ckpt_dir: Path, model_config: dict):
        from tokenizers import Tokenizer

        path = ckpt_dir / HF_TOKENIZER_FILE
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for bad JSON
            raise TokenizerError(f"cannot load {path}: {err}") from err
        config = _read_json(ckpt_dir / "tokenizer_config.json")
        generation = _read_json(ckpt_dir / "generation_config.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                tid = self._tok.token_to_id(token)
                if tid is None:
                    raise TokenizerError(f"{ckpt_dir}/tokenizer_config.json: {key}={token!r} is not in {path}")
                return tid
            ids = model_config.get(f"{key}_id", generation.get(f"{key}_id"))
            return ids[0] if isinstance(ids, list) else ids

        self.bos_id = token_id("bos_token") if config.get("bos_token", "") is not None else None
        self.eos_id = token_id("eos_token")
        if self.eos_id is None:
            raise TokenizerError(f"{ckpt_dir}: no EOS token in tokenizer_config.json, config.json or "
                                 "generation_config.json; generation could not stop")
        pad = token_id("pad_token")
        self.pad_id = pad if pad is not None else self.eos_id
        self.bos_token = self._tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self._tok.id_to_token(self.eos_id)
        self.adds_bos = self.bos_id is not None and self.bos_id in self._tok.encode("").ids
        # Metaspace tokenizers (LLaMA-2 and Mistral as tokenizer.json) mark a word start at the
        # beginning of every encode call, like SentencePiece: continuations cut it off.
        plain, newline = self._ids("a"), self._ids("\n")
        self._marks_start = self._ids("\na")[len(newline):] != plain
        extra = generation.get("eos_token_id", model_config.get("eos_token_id"))
        extra = extra if isinstance(extra, list) else [extra] if extra is not None else []
        turn_ends = [self._tok.token_to_id(t) for t in END_OF_TURN_TOKENS]
        self.stop_ids = _unique((self.eos_id, *extra, *(t for t in turn_ends if t is not None)))
        self.chat_template, self.chat_template_source = (_template_from(ckpt_dir, config)
                                                         or _default_template(self._tok.token_to_id))

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self._ids(text)
        return ([self.bos_id] if add_bos and self.adds_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_continuation(self, text: str) -> list[int]:
        if not self._marks_start:
            return self._ids(text)
        newline = self._ids("\n")
        ids = self._ids("\n" + text)
        return ids[len(newline):] if ids[:len(newline)] == newline else self._ids(text)

    def encode_rendered(self, text: str, continuation: bool = False) -> list[int]:
        # Added tokens (<|im_start|>, <|eot_id|> ...) written as text are matched by the library.
        return self.encode_continuation(text) if continuation else self._ids(text)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _unique(ids) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path} is not valid JSON: {err}") from err
    return value if isinstance(value, dict) else {}


def _template_from(ckpt_dir: Path, tokenizer_config: dict) -> tuple[str, str] | None:
    """The checkpoint's own chat template and where it is: ``chat_template.jinja`` (newer
    transformers save it there), else ``tokenizer_config.json``'s ``chat_template`` (a string, or
    named variants of which ``default`` is taken), else ``chat_template.json``."""
    jinja_file = ckpt_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(), str(jinja_file)
    template, source = tokenizer_config.get("chat_template"), f"{ckpt_dir / 'tokenizer_config.json'} (chat_template)"
    if not template:
        template, source = (_read_json(ckpt_dir / "chat_template.json").get("chat_template"),
                            str(ckpt_dir / "chat_template.json"))
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template, source = named.get("default"), source.replace("(chat_template)", "(chat_template 'default')")
    return (template, source) if isinstance(template, str) else None


def _default_template(token_to_id) -> tuple[str, str]:
    """The family default for a vocabulary, and its name as a source."""
    for marker, template, name in (("<|start_header_id|>", LLAMA3_TEMPLATE, "Llama-3"),
                                   ("<|im_start|>", CHATML_TEMPLATE, "ChatML"),
                                   ("<start_of_turn>", GEMMA_TEMPLATE, "Gemma"), ("[INST]", INST_TEMPLATE, "[INST]")):
        if token_to_id(marker) is not None:
            return template, _default_source(name)
    return PLAIN_TEMPLATE, _default_source("plain")


def _default_source(name: str) -> str:
    return f"pmss_dist's default {name} template (data/tokenizers.py)"


def load_tokenizer(ckpt_dir: str | Path):
    """The tokenizer of a checkpoint directory: ``byte_tokenizer.json`` (the built-in model), else
    ``tokenizer.model`` (SentencePiece), else ``tokenizer.json`` (Hugging Face)."""
    ckpt_dir = Path(ckpt_dir)
    byte_file = ckpt_dir / BYTE_TOKENIZER_FILE
    if byte_file.is_file():
        spec = json.loads(byte_file.read_text())
        return ByteTokenizer(spec["bos_id"], spec["eos_id"], spec["pad_id"])
    model_config = _read_json(ckpt_dir / "config.json")
    if (ckpt_dir / SENTENCEPIECE_FILE).is_file():
        config = _read_json(ckpt_dir / "tokenizer_config.json")
        eos = _read_json(ckpt_dir / "generation_config.json").get("eos_token_id", model_config.get("eos_token_id"))
        return SentencePieceTokenizer(ckpt_dir / SENTENCEPIECE_FILE, pad_id=model_config.get("pad_token_id"),
                                      extra_stop_ids=eos if isinstance(eos, list) else [eos],
                                      chat_template=_template_from(ckpt_dir, config))
    if (ckpt_dir / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(ckpt_dir, model_config)
    raise FileNotFoundError(f"no tokenizer in {ckpt_dir}: looked for {BYTE_TOKENIZER_FILE}, "
                            f"{SENTENCEPIECE_FILE} and {HF_TOKENIZER_FILE}")

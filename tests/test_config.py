"""Tests for jaxlstm.config: presets, overrides, validation and JSON."""

import dataclasses
import json

import pytest

from jaxlstm.config import (
    PRESETS,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    override,
    validate,
)
from jaxlstm.errors import InputError

# Sizes and optimiser settings that both lesson models share.
LESSON_SHARED = {
    ("model", "embedding"): 128,
    ("model", "hidden"): 128,
    ("train", "batch_size"): 100,
    ("train", "seq_len"): 50,
    ("train", "clip"): 4.5,
    ("train", "epochs"): 10,
}


def _setting(config: Config, group: str, name: str):
    return getattr(getattr(config, group), name)


# Presets


def test_preset_word_lesson_settings():
    config = PRESETS["word"]
    assert config.data.level == "word"
    assert config.data.clean == "lesson"
    assert config.data.min_count == 5
    assert config.model.layers == 1
    assert config.train.lr == pytest.approx(1e-3)
    for (group, name), value in LESSON_SHARED.items():
        assert _setting(config, group, name) == value, f"{group}.{name}"


def test_preset_char_lesson_settings():
    config = PRESETS["char"]
    assert config.data.level == "char"
    assert config.model.layers == 3
    assert config.train.lr == pytest.approx(5e-4)
    # The lesson's character model keeps every character of the text.
    assert config.data.min_count == 0
    for (group, name), value in LESSON_SHARED.items():
        assert _setting(config, group, name) == value, f"{group}.{name}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_valid(name):
    validate(PRESETS[name])
    assert PRESETS[name].preset == name


# override


def test_override_replaces_in_groups():
    base = PRESETS["word"]
    config = override(base, level="char", hidden=64, lr=0.01, steps=7)
    assert config.data.level == "char"
    assert config.model.hidden == 64
    assert config.train.lr == 0.01
    assert config.train.steps == 7
    # Fields not named keep the base values.
    assert config.data.min_count == base.data.min_count
    assert config.model.embedding == base.model.embedding
    assert config.train.batch_size == base.train.batch_size
    assert config.preset == base.preset


def test_override_leaves_base_unchanged():
    base = PRESETS["word"]
    override(base, hidden=64)
    assert base.model.hidden == 128


def test_override_skips_none():
    base = PRESETS["char"]
    assert override(base, lr=None, hidden=None) == base


def test_override_rejects_unknown_name():
    with pytest.raises(InputError) as excinfo:
        override(PRESETS["word"], learning_rate=0.1)
    assert "learning_rate" in str(excinfo.value)


def test_override_rejects_invalid_value():
    with pytest.raises(InputError) as excinfo:
        override(PRESETS["word"], batch_size=0)
    assert "--batch-size" in str(excinfo.value)


# validate

# (group, field, value, text the message must contain)
INVALID_SETTINGS = [
    ("model", "embedding", 0, "--embedding"),
    ("model", "embedding", -8, "--embedding"),
    ("model", "hidden", 0, "--hidden"),
    ("model", "layers", 0, "--layers"),
    ("model", "layers", -1, "--layers"),
    ("train", "batch_size", 0, "--batch-size"),
    ("train", "batch_size", -100, "--batch-size"),
    ("train", "seq_len", 0, "--seq-len"),
    ("train", "lr", 0.0, "--lr"),
    ("train", "lr", -1e-3, "--lr"),
    ("train", "lr", float("nan"), "finite"),
    ("train", "lr", float("inf"), "finite"),
    ("train", "clip", 0.0, "--clip"),
    ("train", "clip", -4.5, "--clip"),
    ("train", "epochs", 0, "--epochs"),
    ("train", "steps", 0, "--steps"),
    ("train", "steps", -5, "--steps"),
    ("data", "val_fraction", 0.0, "--val-fraction"),
    ("data", "val_fraction", 1.0, "--val-fraction"),
    ("data", "val_fraction", -0.1, "--val-fraction"),
    ("data", "val_fraction", 1.5, "--val-fraction"),
    ("data", "min_count", -1, "--min-count"),
]


@pytest.mark.parametrize(("group", "name", "value", "text"), INVALID_SETTINGS)
def test_validate_rejects_value(group, name, value, text):
    base = PRESETS["word"]
    changed = dataclasses.replace(getattr(base, group), **{name: value})
    config = dataclasses.replace(base, **{group: changed})
    with pytest.raises(InputError) as excinfo:
        validate(config)
    assert text in str(excinfo.value)


def test_validate_accepts_edge_values():
    config = Config(
        data=DataConfig(min_count=0, val_fraction=0.5),
        model=ModelConfig(embedding=1, hidden=1, layers=1),
        train=TrainConfig(batch_size=1, seq_len=1, steps=1, sample_tokens=0),
    )
    validate(config)


# JSON round trip


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    config = PRESETS[name]
    assert Config.from_json(config.to_json()) == config


def test_config_json_round_trip_changed():
    config = override(PRESETS["char"], steps=30, primes=("romeo", "juliet"))
    restored = Config.from_json(config.to_json())
    assert restored == config
    assert restored.train.primes == ("romeo", "juliet")


def test_config_save_load(tmp_path):
    path = tmp_path / "config.json"
    PRESETS["char"].save(path)
    assert Config.load(path) == PRESETS["char"]


def test_config_from_json_rejects_non_json():
    with pytest.raises(InputError) as excinfo:
        Config.from_json("model: 3", source="runs/a/config.json")
    message = str(excinfo.value)
    assert "runs/a/config.json" in message
    assert "not valid JSON" in message


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3]",
        '"model"',
        json.dumps({"format": 1, "level": "word", "tokens": ["a", "b"]}),
    ],
    ids=["list", "string", "vocab"],
)
def test_config_from_json_rejects_non_config(text):
    with pytest.raises(InputError) as excinfo:
        Config.from_json(text, source="vocab.json")
    message = str(excinfo.value)
    assert "vocab.json" in message
    assert "not a jaxlstm run configuration" in message


def test_config_from_json_rejects_newer_format():
    body = json.loads(PRESETS["word"].to_json())
    body["format"] = 2
    with pytest.raises(InputError) as excinfo:
        Config.from_json(json.dumps(body))
    message = str(excinfo.value)
    assert "format 2" in message
    assert "upgrade" in message


def _config_body_with_unknown_field() -> dict:
    body = json.loads(PRESETS["word"].to_json())
    body["model"]["width"] = 256
    return body


@pytest.mark.parametrize(
    "body",
    [{"format": 1, "model": {}}, _config_body_with_unknown_field()],
    ids=["missing-groups", "unknown-field"],
)
def test_config_from_json_bad_fields(body):
    with pytest.raises(InputError):
        Config.from_json(json.dumps(body))

"""Run settings: one frozen dataclass per concern, presets, JSON round trip.

The two presets hold the settings of the TensorFlow lesson that this package
re-implements: a word model (one LSTM layer) and a stacked character model
(three LSTM layers, each with its own weights).
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from jaxlstm.errors import InputError

# Raised whenever config.json changes in a way older code cannot read.
CONFIG_FORMAT = 1
CONFIG_FILE = "config.json"  # its name in a run folder

LESSON_PRIMES = ("thou art more", "to be or not to", "wherefore art thou")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Settings of corpus cleaning, tokenisation and the validation split."""

    level: Literal["word", "char"] = "word"
    # "lesson": lower case, punctuation except - and ' removed, whitespace
    # collapsed. "none": the text as it is, newlines kept.
    clean: Literal["lesson", "none"] = "lesson"
    # A token is kept in the vocabulary when it occurs more than this often.
    min_count: int = 5
    # The last fraction of the token stream is held out for validation.
    val_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the embedding, the LSTM stack and the output layer."""

    embedding: int = 128
    hidden: int = 128
    layers: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, batching and schedule of a training run."""

    batch_size: int = 100  # stream rows per batch
    seq_len: int = 50  # tokens per truncated-backpropagation window
    lr: float = 1e-3  # Adam learning rate
    clip: float = 4.5  # maximum global gradient norm
    epochs: int = 10
    # Total optimiser steps. None means as many as `epochs` passes take.
    steps: int | None = None
    eval_every: int = 200  # steps between validation passes and samples
    save_every: int = 500  # steps between checkpoints
    keep: int = 3  # newest checkpoints kept; older ones are deleted
    log_every: int = 10  # steps between loss read-backs to the host
    seed: int = 0
    sample_tokens: int = 10  # tokens generated after each prime at eval
    primes: tuple[str, ...] = LESSON_PRIMES


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run; saved as config.json in the run folder."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    preset: str = "word"

    def to_json(self) -> str:
        """Serialise to a JSON document that `Config.from_json` reads."""
        body = {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "config.json") -> "Config":
        """Parse a document written by `to_json`.

        Raises:
          InputError: if the document is not a config or has a newer format.
        """
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{source} is not valid JSON ({error}); it should be the "
                "config.json that `jaxlstm train` writes"
            ) from None
        if not isinstance(body, dict) or "model" not in body:
            raise InputError(f"{source} is not a jaxlstm run configuration")
        version = body.pop("format", None)
        if version != CONFIG_FORMAT:
            raise InputError(
                f"{source} has format {version!r} but this jaxlstm reads "
                f"format {CONFIG_FORMAT}; upgrade jaxlstm to read it"
            )
        try:
            train = dict(body["train"])
            train["primes"] = tuple(train.get("primes", LESSON_PRIMES))
            config = cls(
                data=DataConfig(**body["data"]),
                model=ModelConfig(**body["model"]),
                train=TrainConfig(**train),
                preset=body.get("preset", "custom"),
            )
            validate(config)
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(
                f"{source} is damaged ({type(error).__name__}: {error}); "
                "retrain to write it again"
            ) from None
        return config

    def save(self, path: str | Path) -> None:
        """Write the config as JSON to `path`."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """Read a config written by `save`."""
        path = Path(path)
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))


PRESETS: dict[str, Config] = {
    # The lesson's word model: words seen more than 5 times, 128-wide
    # embedding and LSTM, Adam 1e-3, clip 4.5, 100 streams x 50 steps.
    "word": Config(preset="word"),
    # The lesson's stacked character model: three LSTM layers with their own
    # weights and Adam 5e-4. The lesson keeps every character of the text,
    # so the minimum count is 0. Samples are longer because a character
    # carries less than a word.
    "char": Config(
        data=DataConfig(level="char", min_count=0),
        model=ModelConfig(layers=3),
        train=TrainConfig(lr=5e-4, sample_tokens=60),
        preset="char",
    ),
}


# Settings that may change when a run resumes: they set how long to train and
# what to report, not what the saved state means.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "steps",
        "eval_every",
        "save_every",
        "keep",
        "log_every",
        "sample_tokens",
        "primes",
    }
)


def flag_name(field: str) -> str:
    """Return the command-line flag that sets a config field."""
    if field == "level":
        return "--preset"  # the presets set the token level
    return "--" + field.replace("_", "-")


def resume_differences(saved: Config, requested: Config) -> list[str]:
    """List the settings that differ and that a resumed run cannot change.

    Returns:
      One phrase per differing setting, such as
      "--hidden is 128 in the checkpoint but 256 now"; empty when the
      requested config can continue the saved run.
    """
    differences = []
    if saved.preset != requested.preset:
        differences.append(
            f"--preset is {saved.preset} in the checkpoint but "
            f"{requested.preset} now"
        )
    for group in ("data", "model", "train"):
        old, new = getattr(saved, group), getattr(requested, group)
        for field in dataclasses.fields(old):
            name = field.name
            if name in RESUMABLE_CHANGES or name == "level":
                continue  # the level follows the preset, compared above
            a, b = getattr(old, name), getattr(new, name)
            if a != b:
                differences.append(
                    f"{flag_name(name)} is {a!r} in the checkpoint but "
                    f"{b!r} now"
                )
    return differences


def override(config: Config, **changes: Any) -> Config:
    """Return `config` with the named fields replaced, wherever they live.

    Args:
      config: the starting config, usually a preset.
      **changes: field names of `DataConfig`, `ModelConfig` or
        `TrainConfig` with their new values; None values are skipped.

    Raises:
      InputError: for an unknown field name or an invalid value.
    """
    groups = {"data": {}, "model": {}, "train": {}}
    for name, value in changes.items():
        if value is None:
            continue
        for group in groups:
            fields = {
                f.name for f in dataclasses.fields(getattr(config, group))
            }
            if name in fields:
                groups[group][name] = value
                break
        else:
            raise InputError(f"unknown setting {name!r}")
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, **groups["data"]),
        model=dataclasses.replace(config.model, **groups["model"]),
        train=dataclasses.replace(config.train, **groups["train"]),
    )
    validate(config)
    return config


def _require_positive(name: str, value: float, flag: str) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, int | float) and math.isfinite(value)
    ):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise InputError(
            f"{name} must be greater than 0, got {value!r}; "
            f"pass a positive value with {flag}"
        )


def validate(config: Config) -> None:
    """Check every setting and raise `InputError` naming the first bad one."""
    data, model, train = config.data, config.model, config.train
    if data.level not in ("word", "char"):
        raise InputError(f"level must be 'word' or 'char', got {data.level!r}")
    if data.clean not in ("lesson", "none"):
        raise InputError(
            f"--clean must be 'lesson' or 'none', got {data.clean!r}"
        )
    if not 0 < data.val_fraction < 1:
        raise InputError(
            f"--val-fraction must be between 0 and 1 (exclusive), got "
            f"{data.val_fraction!r}; the default holds out 0.1"
        )
    if data.min_count < 0:
        raise InputError(
            f"--min-count must be 0 or more, got {data.min_count!r}"
        )
    positives = [
        ("embedding size", model.embedding, "--embedding"),
        ("hidden size", model.hidden, "--hidden"),
        ("number of layers", model.layers, "--layers"),
        ("batch size", train.batch_size, "--batch-size"),
        ("sequence length", train.seq_len, "--seq-len"),
        ("learning rate", train.lr, "--lr"),
        ("clip norm", train.clip, "--clip"),
        ("epochs", train.epochs, "--epochs"),
        ("eval interval", train.eval_every, "--eval-every"),
        ("save interval", train.save_every, "--save-every"),
        ("checkpoints kept", train.keep, "--keep"),
        ("log interval", train.log_every, "--log-every"),
    ]
    if train.steps is not None:
        positives.append(("steps", train.steps, "--steps"))
    for name, value, flag in positives:
        _require_positive(name, value, flag)
    integers = [
        ("min_count", data.min_count),
        ("embedding", model.embedding),
        ("hidden", model.hidden),
        ("layers", model.layers),
        ("batch_size", train.batch_size),
        ("seq_len", train.seq_len),
        ("epochs", train.epochs),
        ("seed", train.seed),
        ("sample_tokens", train.sample_tokens),
    ]
    for name, value in integers:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
    if not 0 <= train.seed < 2**32:
        raise InputError(
            f"--seed must be from 0 to {2**32 - 1}, got {train.seed!r}"
        )
    if train.sample_tokens < 0:
        raise InputError(
            f"sample length must be 0 or more, got {train.sample_tokens!r}"
        )

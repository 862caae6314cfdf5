"""Orbax checkpoints of a training run.

A run folder contains `config.json`, `vocab.json` and `checkpoints/<step>/`,
one Orbax checkpoint per saved step with four items: `params`, `opt_state`,
`training` (the optimiser step, the carried LSTM state of every batch row and
the PRNG key) and `meta` (JSON: format, step, epoch, window). Together with
the config and the text, that is everything needed to continue a run
exactly. Loading never unpickles anything, and files other than these are
ignored.

Orbax writes each step into a temporary folder and renames it when complete,
so a save cut short (by SIGKILL or a full disk) never looks like a
checkpoint; `all_steps` lists complete ones only.
"""

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlstm.config import CONFIG_FILE, Config
from jaxlstm.data import Vocab
from jaxlstm.errors import InputError
from jaxlstm.model import LanguageModel, build_model, init_params

logger = logging.getLogger(__name__)

# Raised whenever the checkpoint layout changes in a way older code cannot
# read.
CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
VOCAB_FILE = "vocab.json"


def open_manager(
    run_dir: str | Path, keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """Open the checkpoint manager of a run folder; use it as a context."""
    if read_only:
        options = ocp.CheckpointManagerOptions(
            read_only=True,
            create=False,
            save_interval_steps=0,
            max_to_keep=None,
        )
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        )
    path = (Path(run_dir) / CHECKPOINT_DIR).absolute()
    return ocp.CheckpointManager(path, options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    params: Any,
    opt_state: Any,
    training: Any,
    meta: dict,
) -> None:
    """Start an asynchronous save of one step.

    `manager.wait_until_finished` completes it and raises its error, if any.
    """
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            training=ocp.args.StandardSave(training),
            meta=ocp.args.JsonSave({"format": CHECKPOINT_FORMAT, **meta}),
        ),
        force=True,
    )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    params: Any,
    opt_state: Any,
    training: Any,
) -> tuple[Any, Any, Any, dict]:
    """Restore one step against abstract targets of the same structure.

    Args:
      manager: the run's checkpoint manager.
      step: a step listed by `manager.all_steps()`.
      params, opt_state, training: trees of `jax.ShapeDtypeStruct` (or
        arrays) from a fresh initialisation, giving structure and shapes.

    Returns:
      The restored params, opt_state, training tree and meta dict.

    Raises:
      InputError: if the checkpoint was written by a newer format.
    """
    with damaged_checkpoint_errors(manager.directory / str(step)):
        meta = restore_meta(manager, step)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params),
                opt_state=ocp.args.StandardRestore(opt_state),
                training=ocp.args.StandardRestore(training),
            ),
        )
    return (
        restored["params"],
        restored["opt_state"],
        restored["training"],
        meta,
    )


@contextlib.contextmanager
def damaged_checkpoint_errors(where: Any) -> Iterator[None]:
    """Turn any failure to read a checkpoint into one `InputError`.

    Orbax and TensorStore raise many types for a truncated file, a missing
    item or shapes that no longer match config.json and vocab.json.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"checkpoint {where} cannot be read: it is damaged or does not "
            f"match config.json and vocab.json ({type(error).__name__}: "
            f"{first_line}). Pick another --step, or train again"
        ) from error


def read_run_files(run_dir: Path) -> tuple[Config, Vocab]:
    """Read and cross-check config.json and vocab.json of a run folder.

    Raises:
      InputError: if either file is unreadable, invalid or they disagree.
    """
    config_path = run_dir / CONFIG_FILE
    vocab_path = run_dir / VOCAB_FILE
    try:
        config = Config.load(config_path)
        vocab = Vocab.from_json(vocab_path.read_text("utf-8"), str(vocab_path))
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(
            f"cannot read the run files in {str(run_dir)!r}: {error}; "
            "train again to write them"
        ) from None
    if vocab.level != config.data.level:
        raise InputError(
            f"{vocab_path} is a {vocab.level} vocabulary but {config_path} "
            f"describes a {config.data.level} model; the run folder is "
            "damaged, so train again"
        )
    return config, vocab


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """Read a step's JSON meta item and check its format version."""
    meta = manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )["meta"]
    check_format(meta, manager.directory / str(step))
    return meta


def check_format(meta: Any, where: Any) -> None:
    """Raise `InputError` unless `meta` is from a readable checkpoint."""
    version = meta.get("format") if isinstance(meta, dict) else None
    if version != CHECKPOINT_FORMAT:
        raise InputError(
            f"checkpoint {where} has format {version!r} but this jaxlstm "
            f"reads format {CHECKPOINT_FORMAT}; upgrade jaxlstm to read it"
        )


class TrainedRun:
    """A trained run folder loaded for sampling."""

    def __init__(self, config: Config, vocab: Vocab, params: Any, step: int):
        self.config = config
        self.vocab = vocab
        self.params = params
        self.step = step
        self.model: LanguageModel = build_model(config.model, vocab.size)


def load_run(run_dir: str | Path, step: int | None = None) -> TrainedRun:
    """Load the config, vocabulary and parameters of a run folder.

    Args:
      run_dir: a folder written by `jaxlstm train`.
      step: the checkpoint step to load; None loads the newest.

    Raises:
      InputError: if the folder contains no trained run, or not that step.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    vocab_path = run_dir / VOCAB_FILE
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if not run_dir.is_dir():
        raise InputError(
            f"run folder {str(run_dir)!r} not found; pass the --out folder "
            "of a `jaxlstm train` run"
        )
    if not (config_path.is_file() and vocab_path.is_file()):
        raise InputError(
            f"{str(run_dir)!r} contains no trained run: {CONFIG_FILE} or "
            f"{VOCAB_FILE} is missing; pass the --out folder of a "
            "`jaxlstm train` run"
        )
    config, vocab = read_run_files(run_dir)
    if not ckpt_dir.is_dir():
        raise InputError(
            f"{str(run_dir)!r} contains no checkpoint yet; train until the "
            "first save (--save-every) or to the end"
        )
    with open_manager(run_dir, read_only=True) as manager:
        steps = manager.all_steps()
        if not steps:
            raise InputError(
                f"{str(run_dir)!r} contains no complete checkpoint; train "
                "until the first save (--save-every) or to the end"
            )
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise InputError(
                f"{str(run_dir)!r} has no checkpoint at step {step}; saved "
                f"steps are {', '.join(map(str, sorted(steps)))}"
            )
        model = build_model(config.model, vocab.size)
        abstract = jax.eval_shape(
            lambda key: init_params(model, key), jax.random.key(0)
        )
        with damaged_checkpoint_errors(manager.directory / str(step)):
            restore_meta(manager, step)
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract)
                ),
            )
    logger.info("loaded %s at step %d", run_dir, step)
    return TrainedRun(config, vocab, restored["params"], step)

"""Orbax checkpoints of a training run.

A run folder contains `config.json`, `vocab.json` and `checkpoints/<step>/`,
one Orbax checkpoint per saved step with the items `params`, `opt_state`,
`training` (step and carried LSTM state) and `meta` (JSON: step, epoch,
window). Loading never unpickles anything.
"""

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlstm.config import Config
from jaxlstm.data import Vocab
from jaxlstm.errors import InputError
from jaxlstm.model import LanguageModel, build_model, init_params

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


def open_manager(run_dir: str | Path, keep: int = 3) -> ocp.CheckpointManager:
    """Open the checkpoint manager of a run folder; use it as a context."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
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
    """Start an asynchronous save of one step; `manager.wait_until_finished`
    completes it."""
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            training=ocp.args.StandardSave(training),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
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
    config = Config.load(config_path)
    vocab = Vocab.from_json(vocab_path.read_text("utf-8"), str(vocab_path))
    if not ckpt_dir.is_dir():
        raise InputError(
            f"{str(run_dir)!r} contains no checkpoint yet; train until the "
            "first save (--save-every) or to the end"
        )
    with open_manager(run_dir) as manager:
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
        restored = manager.restore(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)),
        )
    logger.info("loaded %s at step %d", run_dir, step)
    return TrainedRun(config, vocab, restored["params"], step)

"""The training loop: batches, steps, evaluation, samples, checkpoints."""

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlstm import checkpoint
from jaxlstm.config import Config, validate
from jaxlstm.data import (
    Batch,
    Corpus,
    TBPTTBatches,
    eval_windows,
    prepare_corpus,
)
from jaxlstm.errors import InputError, TrainingError
from jaxlstm.model import LanguageModel, build_model
from jaxlstm.plot import plot_losses
from jaxlstm.sampling import generate_text
from jaxlstm.train_step import (
    TrainState,
    create_train_state,
    eval_step,
    train_step,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"

# Called after every log interval with (step, total steps, values), so a
# front end can draw progress; values hold `loss` and `tokens_per_sec`.
ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclasses.dataclass
class RunSummary:
    """What a finished training run reached."""

    steps: int
    train_loss: float  # mean over the last log interval, nats per token
    val_loss: float  # nats per token over the whole validation split
    val_perplexity: float
    unigram_loss: float  # validation loss of the training unigram frequencies
    samples: list[str]
    seconds: float


def evaluate(
    state: TrainState, model: LanguageModel, windows: list[Batch]
) -> dict[str, float]:
    """Score every validation target once, carrying the state row by row.

    Returns:
      `val_loss` in nats per token and `val_perplexity`.
    """
    carry = model.initial_carry(windows[0].inputs.shape[0])
    total, count = 0.0, 0.0
    sums = []
    for batch in windows:
        carry, metrics = eval_step(state, batch, carry)
        sums.append(metrics)
    for metrics in jax.device_get(sums):
        total += float(metrics["loss_sum"])
        count += float(metrics["count"])
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}


def unigram_loss(corpus: Corpus) -> float:
    """Cross-entropy of the validation tokens under training frequencies.

    Counts are smoothed by one, so every id has a probability. A model that
    learns nothing about context cannot do better than this.
    """
    size = corpus.vocab.size
    counts = np.bincount(corpus.train_ids, minlength=size) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[corpus.val_ids].mean())


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(
            f"--out {str(run_dir)!r} is a file; pass a folder for the run"
        )
    existing = run_dir / checkpoint.CONFIG_FILE
    if existing.exists() and not overwrite:
        raise InputError(
            f"{str(run_dir)!r} already contains a run; pass --overwrite to "
            "replace it, or another --out folder"
        )
    if overwrite:
        for name in (
            checkpoint.CHECKPOINT_DIR,
            METRICS_FILE,
            PLOT_FILE,
            checkpoint.CONFIG_FILE,
            checkpoint.VOCAB_FILE,
        ):
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _check_finite(loss: float, grad_norm: float, step: int) -> None:
    # A finite loss with non-finite gradients would still put NaN into the
    # parameters, so both are checked before anything is saved.
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise TrainingError(
                f"the training {name} became {value} at step {step}; no "
                "checkpoint from this step on was saved. Try a lower --lr "
                "or --clip"
            )


def train(
    config: Config,
    text: str,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> RunSummary:
    """Train a model on `text` and write the run folder.

    The folder receives config.json, vocab.json, metrics.jsonl (one JSON
    object per line: `step` with `train_loss`, or `step` with the
    validation figures), checkpoints/ and loss.png.

    Raises:
      InputError: for bad settings, a text too short, or a folder in use.
      TrainingError: if the loss stops being finite.
    """
    validate(config)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    data, train_cfg = config.data, config.train
    corpus = prepare_corpus(
        text, data.level, data.clean, data.min_count, data.val_fraction
    )
    batches = TBPTTBatches(
        corpus.train_ids, train_cfg.batch_size, train_cfg.seq_len
    )
    val_windows = eval_windows(
        corpus.val_ids, train_cfg.batch_size, train_cfg.seq_len
    )
    total_steps = train_cfg.steps or train_cfg.epochs * len(batches)
    _prepare_run_dir(run_dir, overwrite)
    config.save(run_dir / checkpoint.CONFIG_FILE)
    (run_dir / checkpoint.VOCAB_FILE).write_text(
        corpus.vocab.to_json(), encoding="utf-8"
    )

    model = build_model(config.model, corpus.vocab.size)
    key = jax.random.key(train_cfg.seed)
    state = create_train_state(model, train_cfg, jax.random.fold_in(key, 0))
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    baseline = unigram_loss(corpus)
    logger.info(
        "%s model: %d parameters, %d windows of %d x %d per epoch, %d steps",
        config.preset,
        num_params,
        len(batches),
        train_cfg.batch_size,
        train_cfg.seq_len,
        total_steps,
    )
    logger.info("unigram baseline: %.4f nats per token", baseline)

    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    records: list[dict[str, Any]] = []
    pending: list[tuple[int, Any]] = []
    last = {"train_loss": float("nan"), "val_loss": float("nan")}
    samples: list[str] = []
    mark = time.perf_counter()
    metrics_file = open(run_dir / METRICS_FILE, "w", encoding="utf-8")

    def write(record: dict[str, Any]) -> None:
        records.append(record)
        metrics_file.write(json.dumps(record) + "\n")

    def flush(step: int) -> None:
        # Reading the losses back waits for the device, so it happens once
        # per interval rather than after every step.
        nonlocal mark
        values = jax.device_get([m for _, m in pending])
        losses = [float(m["loss"]) for m in values]
        for (s, _), m in zip(pending, values, strict=True):
            _check_finite(float(m["loss"]), float(m["grad_norm"]), s)
            write({"step": s, "train_loss": float(m["loss"])})
        now = time.perf_counter()
        speed = len(pending) * tokens_per_step / max(now - mark, 1e-9)
        last["train_loss"] = float(np.mean(losses))
        mark = now
        pending.clear()
        if progress is not None:
            progress(
                step,
                total_steps,
                {
                    "loss": last["train_loss"],
                    "tokens_per_sec": speed,
                },
            )
        logger.debug(
            "step %d: loss %.4f, %.0f tokens/s", step, last["train_loss"], speed
        )

    def run_eval(step: int) -> None:
        nonlocal samples, mark
        scores = evaluate(state, model, val_windows)
        if data.level == "char":
            scores["val_bpc"] = scores["val_loss"] / math.log(2)
        write({"step": step, **scores})
        last["val_loss"] = scores["val_loss"]
        extra = (
            f", {scores['val_bpc']:.3f} bits per character"
            if "val_bpc" in scores
            else ""
        )
        logger.info(
            "step %d: validation loss %.4f nats per token, perplexity %.2f%s",
            step,
            scores["val_loss"],
            scores["val_perplexity"],
            extra,
        )
        samples = generate_text(
            model,
            state.params,
            corpus.vocab,
            data.clean,
            train_cfg.primes,
            train_cfg.sample_tokens,
        )
        for sample in samples:
            logger.info("sample: %s", sample)
        mark = time.perf_counter()  # evaluation time is not training speed

    with checkpoint.open_manager(run_dir) as manager, metrics_file:
        carry = model.initial_carry(train_cfg.batch_size)
        for step in range(1, total_steps + 1):
            window = (step - 1) % len(batches)
            if window == 0:  # a new epoch starts every row from zero state
                carry = model.initial_carry(train_cfg.batch_size)
            state, carry, metrics = train_step(
                state, batches.window(window), carry
            )
            pending.append((step, metrics))
            is_last = step == total_steps
            if step % train_cfg.log_every == 0 or is_last:
                flush(step)
            if step % train_cfg.eval_every == 0 or is_last:
                run_eval(step)
            if step % train_cfg.save_every == 0 or is_last:
                if pending:
                    flush(step)
                checkpoint.save(
                    manager,
                    step,
                    state.params,
                    state.opt_state,
                    {"step": state.step, "carry": carry},
                    {
                        "step": step,
                        "epoch": (step - 1) // len(batches),
                        "window": window,
                    },
                )
        manager.wait_until_finished()

    plot_losses(records, run_dir / PLOT_FILE, f"jaxlstm {config.preset} model")
    return RunSummary(
        steps=total_steps,
        train_loss=last["train_loss"],
        val_loss=last["val_loss"],
        val_perplexity=math.exp(min(last["val_loss"], 700.0)),
        unigram_loss=baseline,
        samples=samples,
        seconds=time.perf_counter() - started,
    )

"""The training loop: batches, steps, evaluation, samples, checkpoints.

`train` starts a run in an empty folder, or continues the run already in
the folder from its newest complete checkpoint. A resumed run repeats the
uninterrupted one exactly: the checkpoint contains the parameters, the
optimiser state, the carried LSTM state of every batch row and the PRNG key,
and the position in the data follows from the step, because the batches of
an epoch are always taken in the same order.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlstm import checkpoint
from jaxlstm.config import Config, resume_differences, validate
from jaxlstm.data import (
    Batch,
    Corpus,
    TBPTTBatches,
    Vocab,
    eval_windows,
    prepare_corpus,
    vocab_difference,
)
from jaxlstm.errors import InputError, TrainingError, TrainingStopped
from jaxlstm.model import LanguageModel, build_model
from jaxlstm.plot import plot_losses
from jaxlstm.sampling import generate_text
from jaxlstm.train_step import Placement, TrainState, create_train_state

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
RUN_FILES = (
    checkpoint.CHECKPOINT_DIR,
    checkpoint.CONFIG_FILE,
    checkpoint.VOCAB_FILE,
    METRICS_FILE,
    PLOT_FILE,
)

# Called after every log interval with (step, total steps, values), so a
# front end can draw progress; values hold `loss` and `tokens_per_sec`.
ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclasses.dataclass
class RunSummary:
    """Figures of a finished training run."""

    steps: int
    resumed_from: int  # step of the checkpoint the run continued; 0 if none
    train_loss: float  # mean of the last --log-every steps, nats per token
    val_loss: float  # nats per token over the whole validation split
    val_perplexity: float
    unigram_loss: float  # validation loss of the training unigram frequencies
    samples: list[str]
    seconds: float


def _first(value: Any) -> float:
    """Return a metric as a float; pmapped metrics repeat it per device."""
    return float(np.asarray(value).reshape(-1)[0])


def evaluate(
    state: TrainState,
    model: LanguageModel,
    windows: list[Batch],
    placement: Placement | None = None,
) -> dict[str, float]:
    """Score every validation target once, carrying the state row by row.

    Args:
      state: the train state, placed by `placement` when one is given.
      model: the model.
      windows: the validation windows from `eval_windows`.
      placement: the devices the state lives on; None means one device.

    Returns:
      `val_loss` in nats per token and `val_perplexity`.
    """
    placement = placement or Placement(jax.devices()[:1], 1)
    carry = placement.shard(model.initial_carry(windows[0].inputs.shape[0]))
    sums = []
    for batch in windows:
        carry, metrics = placement.eval_step(
            state, placement.shard(batch), carry
        )
        sums.append(metrics)
    sums = jax.device_get(sums)
    total = sum(_first(m["loss_sum"]) for m in sums)
    count = sum(_first(m["count"]) for m in sums)
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}


def unigram_loss(corpus: Corpus) -> float:
    """Cross-entropy of the validation tokens under training frequencies.

    Counts are smoothed by one, so every id has a probability. This is the
    loss of a model that ignores context, a baseline any LSTM should beat.
    """
    size = corpus.vocab.size
    counts = np.bincount(corpus.train_ids, minlength=size) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[corpus.val_ids].mean())


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a crash leaves the old or new file."""
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(part, path)


def _check_run_dir(run_dir: Path, config: Config, overwrite: bool) -> bool:
    """Check `run_dir` for a new or resumed run; return True to resume.

    Raises:
      InputError: if the folder is a file, contains other files but no run,
        or contains a run that `config` cannot continue.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(
            f"--out {str(run_dir)!r} is a file; pass a folder for the run"
        )
    config_path = run_dir / checkpoint.CONFIG_FILE
    if not run_dir.exists():
        return False
    if not config_path.exists():
        others = sorted(p.name for p in run_dir.iterdir())
        if others:
            raise InputError(
                f"--out {str(run_dir)!r} is not a jaxlstm run folder and not "
                f"empty (it contains {', '.join(others[:3])}); pass a new or "
                "empty folder"
            )
        return False
    if overwrite:
        return False
    saved = Config.load(config_path)
    differences = resume_differences(saved, config)
    if differences:
        raise InputError(
            f"cannot resume the run in {str(run_dir)!r}: "
            + "; ".join(differences)
            + ". Pass the run's settings, or --overwrite to start again"
        )
    return True


def _check_vocab(run_dir: Path, vocab: Vocab) -> None:
    path = run_dir / checkpoint.VOCAB_FILE
    saved = Vocab.from_json(path.read_text("utf-8"), str(path))
    difference = vocab_difference(saved, vocab)
    if difference:
        raise InputError(
            f"cannot resume the run in {str(run_dir)!r}: {difference}. Pass "
            "the same --text and --min-count, or --overwrite to start again"
        )


PREVIOUS_DIR = ".previous-run"


def _set_aside(run_dir: Path) -> Path | None:
    """Move the files of a run being overwritten into a hidden folder.

    They are deleted once the new run has saved its first checkpoint, and
    put back if it fails before that, so a failed --overwrite loses nothing.

    Returns:
      The hidden folder, or None when there was nothing to move.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        present = [n for n in RUN_FILES if (run_dir / n).exists()]
        if not present:
            return None
        aside = run_dir / PREVIOUS_DIR
        if aside.exists():
            shutil.rmtree(aside)
        aside.mkdir()
        for name in present:
            os.replace(run_dir / name, aside / name)
    except OSError as error:
        raise InputError(
            f"cannot prepare the run folder {str(run_dir)!r}: "
            f"{error.strerror}; pass another --out"
        ) from None
    return aside


def _put_back(run_dir: Path, aside: Path) -> None:
    for name in RUN_FILES:
        new = run_dir / name
        if new.is_dir():
            shutil.rmtree(new)
        elif new.exists():
            new.unlink()
        if (aside / name).exists():
            os.replace(aside / name, new)
    aside.rmdir()
    logger.warning("the new run failed; the previous run is restored")


def read_metrics(
    run_dir: str | Path, up_to: float = math.inf
) -> list[dict[str, Any]]:
    """Read the records of a run's metrics.jsonl, of steps up to `up_to`."""
    return _read_metrics(Path(run_dir) / METRICS_FILE, up_to)


def _read_metrics(path: Path, up_to: float) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text("utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the run was killed
        if isinstance(record, dict) and record.get("step", up_to + 1) <= up_to:
            records.append(record)
    return records


class _StopSignals:
    """Turn SIGINT and SIGTERM into a request to stop after this step.

    The first signal sets `signum` and restores the previous handlers, so a
    second one stops the program at once, without a checkpoint.

    NOTE: under several processes each one stops on its own signal, so a
    signal must reach all of them, as a pod preemption does. A process left
    running waits in the next collective. Agreeing on a stop step through a
    collective would remove that need.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        # Python only lets the main thread install signal handlers.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = signum
        logger.warning(
            "%s received: stopping after this step and saving a checkpoint "
            "(send it again to stop at once, without saving)",
            signal.Signals(signum).name,
        )
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()


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


class _Run:
    """The state and bookkeeping of one training run in a folder."""

    def __init__(
        self,
        config: Config,
        corpus: Corpus,
        run_dir: Path,
        progress: ProgressFn | None,
        devices: list[jax.Device],
    ):
        train_cfg = config.train
        self.config = config
        self.corpus = corpus
        self.run_dir = run_dir
        self.progress = progress
        self.batches = TBPTTBatches(
            corpus.train_ids, train_cfg.batch_size, train_cfg.seq_len
        )
        self.val_windows = eval_windows(
            corpus.val_ids, train_cfg.batch_size, train_cfg.seq_len
        )
        self.total_steps = train_cfg.steps or train_cfg.epochs * len(
            self.batches
        )
        self.placement = Placement(devices, train_cfg.batch_size)
        self.model = build_model(config.model, corpus.vocab.size)
        self.key = jax.random.key(train_cfg.seed)
        state = create_train_state(
            self.model, train_cfg, jax.random.fold_in(self.key, 0)
        )
        self.num_params = sum(x.size for x in jax.tree.leaves(state.params))
        # Shapes and structure of one unplaced copy, for restoring.
        self.abstract_state = jax.eval_shape(lambda: state)
        self.zero_carry = self.placement.shard(
            self.model.initial_carry(train_cfg.batch_size)
        )
        self.state = self.placement.replicate(state)
        self.carry = self.zero_carry
        self.step = 0
        self.saved_step = 0
        self.records: list[dict[str, Any]] = []
        self.pending: list[tuple[int, Any]] = []
        self.train_loss = float("nan")
        self.val_loss = float("nan")
        self.samples: list[str] = []
        self.mark = time.perf_counter()
        self.metrics_file = None
        self.on_first_save: Callable[[], None] | None = None
        # Under several processes, process 0 alone writes files and logs.
        self.primary = jax.process_index() == 0
        if not self.primary:
            self.progress = None

    def restore_newest(self, manager) -> None:
        """Continue from the newest complete checkpoint, if there is one."""
        steps = manager.all_steps()
        if not steps:
            logger.info("no complete checkpoint in %s; starting", self.run_dir)
            return
        step = max(steps)
        abstract = self.abstract_state
        training = {
            "step": abstract.step,
            "carry": jax.eval_shape(
                lambda: self.model.initial_carry(self.batches.batch_size)
            ),
            "key": jax.eval_shape(lambda: jax.random.key_data(self.key)),
        }
        targets = (abstract.params, abstract.opt_state, training)
        if jax.process_count() > 1:
            # Several processes restore host copies; Orbax restores numpy
            # leaves on every process without a global sharding.
            targets = jax.tree.map(
                lambda x: np.zeros(x.shape, x.dtype), targets
            )
        params, opt_state, training, _ = checkpoint.restore(
            manager, step, *targets
        )
        # A checkpoint contains one copy of everything and the carry of all
        # rows in order, so it restores onto any number of devices.
        state = self.placement.unreplicate(self.state).replace(
            step=training["step"], params=params, opt_state=opt_state
        )
        self.state = self.placement.replicate(state)
        self.carry = self.placement.shard(training["carry"])
        self.key = jax.random.wrap_key_data(training["key"])
        self.step = self.saved_step = step
        logger.info("resuming from the checkpoint of step %d", step)

    def _training_tree(self) -> dict[str, Any]:
        return {
            "step": self.placement.unreplicate(self.state.step),
            "carry": self.placement.unshard(self.carry),
            "key": np.asarray(jax.random.key_data(self.key)),
        }

    def open_metrics(self, resumed: bool) -> None:
        path = self.run_dir / METRICS_FILE
        self.records = _read_metrics(path, self.step) if resumed else []
        if not self.primary:
            return
        # Lines logged after the checkpoint are dropped: the resumed run
        # computes those steps again, with the same values.
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.metrics_file = open(path, "a", encoding="utf-8")

    def close_metrics(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def flush(self) -> None:
        """Read back and record the losses of the steps since the last call.

        Reading values back waits for the device, so it happens once per
        log interval rather than after every step.
        """
        if not self.pending:
            return
        values = jax.device_get([m for _, m in self.pending])
        losses = []
        for (step, _), m in zip(self.pending, values, strict=True):
            loss = _first(m["loss"])
            _check_finite(loss, _first(m["grad_norm"]), step)
            self.write({"step": step, "train_loss": loss})
            losses.append(loss)
        now = time.perf_counter()
        tokens = len(self.pending) * self.batches.batch_size
        speed = tokens * self.batches.seq_len / max(now - self.mark, 1e-9)
        self.train_loss = float(np.mean(losses))
        self.mark = now
        self.pending.clear()
        if self.progress is not None:
            self.progress(
                self.step,
                self.total_steps,
                {"loss": self.train_loss, "tokens_per_sec": speed},
            )
        logger.debug(
            "step %d: loss %.4f, %.0f tokens/s",
            self.step,
            self.train_loss,
            speed,
        )

    def run_eval(self, record: bool = True) -> None:
        """Score the validation split and generate the samples.

        Args:
          record: write the scores to metrics.jsonl.
        """
        data = self.config.data
        scores = evaluate(
            self.state, self.model, self.val_windows, self.placement
        )
        extra = ""
        if data.level == "char":
            scores["val_bpc"] = scores["val_loss"] / math.log(2)
            extra = f", {scores['val_bpc']:.3f} bits per character"
        if record:
            self.write({"step": self.step, **scores})
        self.val_loss = scores["val_loss"]
        logger.info(
            "step %d: validation loss %.4f nats per token, perplexity %.2f%s",
            self.step,
            scores["val_loss"],
            scores["val_perplexity"],
            extra,
        )
        if not self.primary:
            return  # samples are logged by process 0 only
        self.samples = generate_text(
            self.model,
            self.placement.unreplicate(self.state.params),
            self.corpus.vocab,
            data.clean,
            self.config.train.primes,
            self.config.train.sample_tokens,
        )
        for sample in self.samples:
            logger.info("sample: %r", sample)
        self.mark = time.perf_counter()  # evaluation is not training time

    def save(self, manager) -> None:
        """Save the current step and wait until it is complete on disk.

        Raises:
          TrainingError: if the save fails; older checkpoints stay intact.
        """
        self.flush()  # checks the losses are finite first
        num_windows = len(self.batches)
        meta = {
            "step": self.step,
            "epoch": self.step // num_windows,
            "window": self.step % num_windows,
        }
        try:
            checkpoint.save(
                manager,
                self.step,
                self.placement.unreplicate(self.state.params),
                self.placement.unreplicate(self.state.opt_state),
                self._training_tree(),
                meta,
            )
            # Checkpoints are small next to the time between them, so
            # waiting here costs little and reports a failure at its step.
            manager.wait_until_finished()
        except Exception as error:  # Orbax raises many types; all stop here
            intact = (
                f"the checkpoint of step {self.saved_step} is intact"
                if self.saved_step
                else "no earlier checkpoint exists"
            )
            raise TrainingError(
                f"saving the checkpoint of step {self.step} to "
                f"{manager.directory} failed ({type(error).__name__}: "
                f"{error}); {intact}. Free disk space or fix the folder's "
                "permissions, then run the same command to resume"
            ) from error
        self.saved_step = self.step
        if self.on_first_save is not None:
            self.on_first_save()
            self.on_first_save = None

    def loop(self, manager, stop: _StopSignals) -> None:
        """Train from `self.step` to the total, saving and evaluating."""
        train_cfg = self.config.train
        num_windows = len(self.batches)
        while self.step < self.total_steps:
            if stop.signum is not None:  # a signal before this step began
                self.stop(manager, stop.signum)
            window = self.step % num_windows
            if window == 0:  # each epoch starts every row from zero state
                self.carry = self.zero_carry
            batch = self.placement.shard(self.batches.window(window))
            self.state, self.carry, metrics = self.placement.train_step(
                self.state, batch, self.carry
            )
            self.step += 1
            self.pending.append((self.step, metrics))
            is_last = self.step == self.total_steps
            if self.step % train_cfg.log_every == 0 or is_last:
                self.flush()
            if self.step % train_cfg.eval_every == 0 or is_last:
                self.run_eval()
            if self.step % train_cfg.save_every == 0 or is_last:
                self.save(manager)
            if stop.signum is not None:
                self.stop(manager, stop.signum)

    def stop(self, manager, signum: int) -> None:
        """Save the current step, unless saved, and raise TrainingStopped."""
        name = signal.Signals(signum).name
        if self.step == 0:
            raise TrainingStopped(
                f"training stopped by {name} before the first step; nothing "
                "was saved",
                signum=signum,
            )
        if self.saved_step != self.step:
            self.save(manager)
        raise TrainingStopped(
            f"training stopped by {name} after step {self.step}; the "
            f"checkpoint is saved in {self.run_dir}. Run the same command "
            "to resume",
            signum=signum,
        )


def _recent_mean(records: list[dict[str, Any]], count: int) -> float:
    """Mean training loss of the last `count` steps logged, NaN if none."""
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    return float(np.mean(losses[-count:])) if losses else float("nan")


def select_devices(count: int | None) -> list[jax.Device]:
    """Return the first `count` local devices, or all of them for None.

    Raises:
      InputError: if `count` is not between 1 and the number available.
    """
    available = jax.local_devices()
    if count is None:
        return available
    if jax.process_count() > 1 and count != len(available):
        raise InputError(
            f"--devices {count} is not supported with several processes: "
            "each process trains on all its local devices; pass --devices all"
        )
    if not 1 <= count <= len(available):
        raise InputError(
            f"--devices {count} is not available: this machine has "
            f"{len(available)} {available[0].platform} device(s); pass "
            f"--devices all or a number from 1 to {len(available)}"
        )
    return available[:count]


def train(
    config: Config,
    text: str,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    devices: int | None = None,
) -> RunSummary:
    """Train a model on `text` in `run_dir`, resuming the run already there.

    With more than one device (`devices` None means all local devices), the
    steps run data-parallel under `jax.pmap`; see `Placement`.

    A folder that contains a run is continued from its newest complete
    checkpoint, and `config` must match the run's settings except for the
    schedule and reporting ones (`RESUMABLE_CHANGES`). With `overwrite`,
    the run is replaced instead. The folder receives config.json,
    vocab.json, metrics.jsonl (one JSON object per line: `step` with
    `train_loss`, or `step` with the validation figures), checkpoints/ and
    loss.png.

    SIGINT and SIGTERM stop training after the current step, with a
    checkpoint, by raising `TrainingStopped`.

    Raises:
      InputError: for bad settings, a text too short, or a folder whose run
        these settings or this text cannot continue.
      TrainingError: if the loss stops being finite or a save fails.
      TrainingStopped: after SIGINT or SIGTERM.
    """
    validate(config)
    # Signals are caught from the start, so an early Ctrl-C is never lost.
    with _StopSignals() as stop:
        return _train(
            config, text, Path(run_dir), overwrite, progress, devices, stop
        )


def _train(
    config: Config,
    text: str,
    run_dir: Path,
    overwrite: bool,
    progress: ProgressFn | None,
    devices: int | None,
    stop: _StopSignals,
) -> RunSummary:
    started = time.perf_counter()
    resuming = _check_run_dir(run_dir, config, overwrite)
    data = config.data
    corpus = prepare_corpus(
        text, data.level, data.clean, data.min_count, data.val_fraction
    )
    if resuming:
        _check_vocab(run_dir, corpus.vocab)
    devices = select_devices(devices)
    # Checks the text length and the batch size against the device count.
    run = _Run(config, corpus, run_dir, progress, devices)
    aside = None
    if run.primary:
        if not resuming:
            aside = _set_aside(run_dir)
            if aside is not None:
                run.on_first_save = lambda: shutil.rmtree(aside)
            _write_atomic(
                run_dir / checkpoint.VOCAB_FILE, corpus.vocab.to_json()
            )
        _write_atomic(run_dir / checkpoint.CONFIG_FILE, config.to_json())
    if jax.process_count() > 1:
        # Every process has read the folder; now all see it prepared.
        multihost_utils.sync_global_devices("jaxlstm: run folder ready")

    baseline = unigram_loss(corpus)
    logger.info(
        "%d %s device(s): %s",
        len(devices),
        devices[0].platform,
        ", ".join(str(d) for d in devices),
    )
    logger.info(
        "%s model: %d parameters, %d windows of %d x %d per epoch, %d steps",
        config.preset,
        run.num_params,
        len(run.batches),
        config.train.batch_size,
        config.train.seq_len,
        run.total_steps,
    )
    logger.info("unigram baseline: %.4f nats per token", baseline)

    try:
        with checkpoint.open_manager(run_dir, config.train.keep) as manager:
            if resuming:
                run.restore_newest(manager)
            resumed_from = run.step
            run.open_metrics(resuming)
            try:
                if run.step >= run.total_steps:
                    logger.info(
                        "the run already reached step %d of %d; nothing to "
                        "train",
                        run.step,
                        run.total_steps,
                    )
                    run.run_eval(record=False)
                run.loop(manager, stop)
            finally:
                run.close_metrics()
                if run.records and run.primary:
                    plot_losses(
                        run.records,
                        run_dir / PLOT_FILE,
                        f"jaxlstm {config.preset} model",
                    )
    except BaseException as error:
        if aside is not None and run.on_first_save is not None:
            _put_back(run_dir, aside)
        # After a failed save, closing the manager raises the save's error
        # again; the error that explains it is the one already in flight.
        cause = error.__context__
        while cause is not None and not isinstance(cause, TrainingError):
            cause = cause.__context__
        if cause is not None and not isinstance(error, TrainingError):
            raise cause from None
        raise

    return RunSummary(
        steps=run.step,
        resumed_from=resumed_from,
        train_loss=_recent_mean(run.records, config.train.log_every),
        val_loss=run.val_loss,
        val_perplexity=math.exp(min(run.val_loss, 700.0)),
        unigram_loss=baseline,
        samples=run.samples,
        seconds=time.perf_counter() - started,
    )

"""The `jaxlstm` command line: `jaxlstm train` and `jaxlstm sample`.

This is the only module that reads command-line arguments. Examples:

    jaxlstm train --preset char --text input.txt --steps 2000
    jaxlstm sample runs/char --prime "thou art more" --num 60
"""

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxlstm import __version__
from jaxlstm.config import CONFIG_FILE, LESSON_PRIMES, PRESETS, Config, override
from jaxlstm.errors import InputError, JaxlstmError, TrainingStopped

logger = logging.getLogger("jaxlstm")


def _number(kind, minimum: float | None, strict: bool):
    """Return an argparse type that parses `kind` and checks a lower bound."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, "
                f"got {text!r}"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f"expected a finite number, got {text!r}"
            )
        if minimum is not None and (
            value <= minimum if strict else value < minimum
        ):
            bound = "greater than" if strict else "at least"
            raise argparse.ArgumentTypeError(
                f"expected a value {bound} {minimum:g}, got {text!r}"
            )
        return value

    return parse


positive_int = _number(int, 0, strict=True)
positive_float = _number(float, 0.0, strict=True)
count = _number(int, 0, strict=False)


def device_count(text: str) -> int | None:
    """Parse `all` (None) or a positive number of devices."""
    if text == "all":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or a positive integer, got {text!r}"
        ) from None


def seed(text: str) -> int:
    """Parse a seed: an integer from 0 to 2**32 - 1."""
    value = count(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(
            f"expected a value below 2**32 = {2**32}, got {text!r}"
        )
    return value


def nonempty(text: str) -> str:
    """Parse a string that must not be empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got ''")
    return text


def fraction(text: str) -> float:
    """Parse a number strictly between 0 and 1."""
    value = _number(float, None, strict=False)(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a fraction between 0 and 1 (exclusive), got {text!r}"
        )
    return value


def temperature(text: str) -> float:
    """Parse a temperature: a finite number of 0 or more."""
    return _number(float, 0.0, strict=False)(text)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of both subcommands."""
    parser = argparse.ArgumentParser(
        prog="jaxlstm",
        description="Train LSTM language models in JAX and generate text.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    # -v is accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log every interval and library warnings",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        parents=[common],
        help="train a model and write a run folder",
        description="Train a word or character LSTM language model.",
    )
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="the lesson's settings to start from (default: char, or the "
        "preset of the run being resumed)",
    )
    source = train.add_argument_group("corpus")
    where = source.add_mutually_exclusive_group()
    where.add_argument(
        "--text",
        metavar="FILE",
        help="train on this UTF-8 text file instead of the default corpus "
        "(Project Gutenberg's Complete Works of Shakespeare, downloaded once)",
    )
    where.add_argument(
        "--url",
        type=nonempty,
        help="download the corpus from this URL instead (a plain UTF-8 "
        "text; Project Gutenberg licence lines are cut off)",
    )
    source.add_argument(
        "--encoding",
        default="utf-8",
        help="encoding of --text (default: utf-8)",
    )
    source.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="folder for the downloaded corpus (default: $JAXLSTM_CACHE_DIR,"
        " else the user cache folder)",
    )
    source.add_argument(
        "--clean",
        choices=("lesson", "none"),
        help="'lesson': lower case, punctuation except - and ' removed, "
        "whitespace collapsed; 'none': the text as it is",
    )
    source.add_argument(
        "--min-count",
        type=count,
        help="keep tokens seen more than this many times (word preset: 5)",
    )
    source.add_argument(
        "--val-fraction",
        type=fraction,
        help="fraction at the end of the text held out (default: 0.1)",
    )
    model = train.add_argument_group("model")
    model.add_argument("--embedding", type=positive_int, help="embedding size")
    model.add_argument("--hidden", type=positive_int, help="LSTM width")
    model.add_argument("--layers", type=positive_int, help="LSTM layers")
    opt = train.add_argument_group("training")
    opt.add_argument(
        "--batch-size", type=positive_int, help="stream rows per batch"
    )
    opt.add_argument(
        "--seq-len", type=positive_int, help="tokens per training window"
    )
    opt.add_argument("--lr", type=positive_float, help="Adam learning rate")
    opt.add_argument(
        "--clip", type=positive_float, help="maximum global gradient norm"
    )
    opt.add_argument(
        "--epochs", type=positive_int, help="passes over the training text"
    )
    opt.add_argument(
        "--steps",
        type=positive_int,
        help="total optimiser steps (overrides --epochs)",
    )
    opt.add_argument(
        "--eval-every",
        type=positive_int,
        help="steps between validation passes and samples (default: 200)",
    )
    opt.add_argument(
        "--save-every",
        type=positive_int,
        help="steps between checkpoints (default: 500)",
    )
    opt.add_argument(
        "--keep",
        type=positive_int,
        help="newest checkpoints to keep (default: 3)",
    )
    opt.add_argument(
        "--log-every",
        type=positive_int,
        help="steps between loss reports (default: 10)",
    )
    opt.add_argument("--seed", type=seed, help="random seed (default: 0)")
    opt.add_argument(
        "--devices",
        type=device_count,
        default=None,
        help="local devices to train on data-parallel, 'all' or a number "
        "(default: all)",
    )
    hosts = train.add_argument_group(
        "multiple hosts",
        "Start one process per host; each trains on its local devices.",
    )
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="join JAX's multi-process runtime, configured by the "
        "environment (TPU pod slices, SLURM, Open MPI)",
    )
    hosts.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0's coordination service; implies "
        "--distributed and needs --num-processes and --process-id",
    )
    hosts.add_argument(
        "--num-processes", type=positive_int, help="processes in the run"
    )
    hosts.add_argument(
        "--process-id", type=count, help="this process's index, from 0"
    )
    train.add_argument(
        "--out",
        metavar="DIR",
        help="run folder to write (default: runs/PRESET)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in --out and start again, instead of resuming it",
    )
    train.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )

    sample = commands.add_parser(
        "sample",
        parents=[common],
        help="continue prime texts with a trained run",
        description="Continue prime texts with a trained model.",
    )
    sample.add_argument(
        "run_dir", metavar="RUN_DIR", help="a train --out folder"
    )
    sample.add_argument(
        "--prime",
        action="append",
        help="prime text; repeat for several (default: the lesson's three)",
    )
    sample.add_argument(
        "--num",
        type=count,
        default=None,
        help="tokens to generate after each prime (default: the run's "
        "sample length)",
    )
    sample.add_argument(
        "--temperature",
        type=temperature,
        default=0.0,
        help="softmax temperature; 0 picks the most likely token (default)",
    )
    sample.add_argument(
        "--top-k",
        type=count,
        default=0,
        help="sample among the K most likely tokens; 0 keeps all (default)",
    )
    sample.add_argument(
        "--seed", type=seed, default=0, help="random seed for sampling"
    )
    sample.add_argument(
        "--step", type=positive_int, help="checkpoint step (default: newest)"
    )
    return parser


class _CliHandler(logging.StreamHandler):
    """The handler `main` installs; replaced on each call of `main`."""


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(old)  # bound to an earlier call's stderr
    handler = _CliHandler(sys.stderr)
    if not verbose:
        # Orbax and TensorStore log failed reads and saves with tracebacks
        # from background threads; jaxlstm reports them in one line.
        handler.addFilter(lambda record: record.name.startswith("jaxlstm"))
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    )
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Orbax logs a failed save through absl with a traceback; jaxlstm then
    # reports the failure in one line, so those logs show only with -v.
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(
            logging.ERROR if verbose else logging.CRITICAL
        )


def _start_distributed(args: argparse.Namespace) -> bool:
    """Join JAX's multi-process runtime if `args` ask; True if joined."""
    if args.coordinator is None and not args.distributed:
        if args.num_processes is not None or args.process_id is not None:
            raise InputError(
                "--num-processes and --process-id need --coordinator "
                "HOST:PORT (or use --distributed where the environment "
                "configures the processes)"
            )
        return False
    import jax

    # CPU devices need a collectives library for cross-process pmap.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator is None:
        jax.distributed.initialize()
    else:
        if args.num_processes is None or args.process_id is None:
            raise InputError(
                "--coordinator needs --num-processes and --process-id"
            )
        if args.process_id >= args.num_processes:
            raise InputError(
                f"--process-id {args.process_id} must be below "
                f"--num-processes {args.num_processes}"
            )
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    if jax.process_index() != 0:
        logger.setLevel(logging.WARNING)  # process 0 reports for all
        args.no_progress = True
    return True


def run_train(args: argparse.Namespace) -> int:
    """Train with the settings in `args` and print a summary."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    distributed = _start_distributed(args)

    from jaxlstm.data import load_text
    from jaxlstm.train import train

    out = Path(args.out or f"runs/{args.preset or 'char'}")
    saved = out / CONFIG_FILE
    if saved.is_file() and not args.overwrite and args.preset is None:
        base = Config.load(saved)  # resume with the run's own settings
    else:
        base = PRESETS[args.preset or "char"]
    config = override(
        base,
        clean=args.clean,
        min_count=args.min_count,
        val_fraction=args.val_fraction,
        embedding=args.embedding,
        hidden=args.hidden,
        layers=args.layers,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        clip=args.clip,
        epochs=args.epochs,
        steps=args.steps,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep=args.keep,
        log_every=args.log_every,
        seed=args.seed,
    )
    if args.epochs is not None and args.steps is None:
        # --epochs alone sets the length, also over a resumed run's --steps.
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, steps=None)
        )
    text = load_text(args.text, args.encoding, args.cache_dir, args.url)

    bar = None

    def progress(step: int, total: int, values: dict[str, float]) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        bar.update(step - bar.n)
        bar.set_postfix(
            loss=f"{values['loss']:.3f}",
            tok_s=f"{values['tokens_per_sec']:.0f}",
        )

    with contextlib.ExitStack() as stack:
        if not args.no_progress:
            stack.enter_context(logging_redirect_tqdm())
        summary = train(
            config,
            text,
            out,
            overwrite=args.overwrite,
            devices=args.devices,
            progress=None if args.no_progress else progress,
        )
        if bar is not None:
            bar.close()
    if distributed:
        import jax

        if jax.process_index() != 0:
            return 0
    print(f"run folder: {out}")
    if summary.resumed_from:
        print(f"resumed from step {summary.resumed_from}")
    line = f"steps: {summary.steps}, time: {summary.seconds:.0f} s"
    if math.isfinite(summary.train_loss):
        line += f", final training loss: {summary.train_loss:.4f}"
    print(line)
    print(
        f"validation loss: {summary.val_loss:.4f} nats per token "
        f"(perplexity {summary.val_perplexity:.2f}; unigram baseline "
        f"{summary.unigram_loss:.4f})"
    )
    for sample in summary.samples:
        print(f"  {sample}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    """Print a continuation of each prime."""
    from jaxlstm.checkpoint import load_run
    from jaxlstm.sampling import SampleSettings, check_settings, generate_text

    settings = SampleSettings(args.temperature, args.top_k, args.seed)
    check_settings(settings)
    if args.top_k and not args.temperature:
        logger.warning("--top-k has no effect when --temperature is 0 (greedy)")
    run = load_run(args.run_dir, args.step)
    num = args.num if args.num is not None else run.config.train.sample_tokens
    primes = args.prime or list(LESSON_PRIMES)
    texts = generate_text(
        run.model,
        run.params,
        run.vocab,
        run.config.data.clean,
        primes,
        num,
        settings,
    )
    for text in texts:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    handlers = {"train": run_train, "sample": run_sample}
    try:
        return handlers[args.command](args)
    except TrainingStopped as error:
        print(f"jaxlstm: {error}", file=sys.stderr)
        return 128 + error.signum
    except JaxlstmError as error:
        print(f"jaxlstm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\njaxlstm: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # XLA reports an allocation larger than memory as RESOURCE_EXHAUSTED.
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        print(
            "jaxlstm: error: out of memory "
            f"({str(error).splitlines()[0][:160]}); pass smaller sizes such "
            "as --hidden, --batch-size, --seq-len or --num",
            file=sys.stderr,
        )
        return 1

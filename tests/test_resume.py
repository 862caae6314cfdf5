"""Checkpoints and resuming: exact continuation, failures, bad folders."""

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from jaxlstm.checkpoint import load_run
from jaxlstm.cli import main

SMALL = [
    "--preset", "char", "--batch-size", "8", "--seq-len", "16",
    "--embedding", "16", "--hidden", "24", "--layers", "2",
    "--log-every", "1", "--eval-every", "10", "--save-every", "5",
    "--no-progress",
]  # fmt: skip
TOTAL = 30


def train_argv(text, out, *extra):
    return ["train", "--text", str(text), "--out", str(out), *SMALL, *extra]


def train_losses(run_dir):
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = {}
    for line in records:
        record = json.loads(line)
        if "train_loss" in record:
            losses[record["step"]] = record["train_loss"]
    return losses


def assert_same_params(run_a, run_b):
    a = jax.tree_util.tree_leaves_with_path(load_run(run_a).params)
    b = jax.tree.leaves(load_run(run_b).params)
    for (path, x), y in zip(a, b, strict=True):
        name = jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture(scope="module")
def straight(shakespeare, tmp_path_factory):
    """A run trained to TOTAL steps without a stop."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_argv(shakespeare, out, "--steps", str(TOTAL))) == 0
    return out


def assert_matches_straight(straight, out, from_step):
    assert_same_params(straight, out)
    want, got = train_losses(straight), train_losses(out)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(from_step + 1, TOTAL + 1):
        assert got[step] == want[step], f"step {step}"


def test_resume_is_bitwise_exact(straight, shakespeare, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(shakespeare, out, "--steps", "17")) == 0
    capsys.readouterr()
    # The run's own settings come from config.json; only --steps changes.
    argv = ["train", "--text", str(shakespeare), "--out", str(out)]
    assert main([*argv, "--steps", str(TOTAL), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "resumed from step 17" in captured.out
    assert "resuming from the checkpoint of step 17" in captured.err
    assert_matches_straight(straight, out, 17)


def run_until_signal(text, out, signum, stop_after):
    """Start training in a subprocess and signal it after `stop_after`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxlstm",
         *train_argv(text, out, "--steps", str(TOTAL))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    metrics = out / "metrics.jsonl"
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.exists() and len(train_losses(out)) >= stop_after:
                break
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, err


def test_sigint_then_resume_is_exact(straight, shakespeare, tmp_path):
    out = tmp_path / "run"
    stop_after = random.Random(os.getpid()).randint(3, 20)
    status, err = run_until_signal(shakespeare, out, signal.SIGINT, stop_after)
    assert status == 128 + signal.SIGINT, err
    assert "training stopped by SIGINT after step" in err
    stopped = load_run(out).step
    assert f"after step {stopped};" in err
    assert stopped >= stop_after
    argv = ["train", "--text", str(shakespeare), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    assert_matches_straight(straight, out, stopped)


def test_sigterm_saves_checkpoint(shakespeare, tmp_path):
    out = tmp_path / "run"
    status, err = run_until_signal(shakespeare, out, signal.SIGTERM, 7)
    assert status == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err
    assert load_run(out).step >= 7


def test_sigkill_then_resume_is_exact(straight, shakespeare, tmp_path):
    # Saving every step makes it likely that the kill lands inside a save.
    out = tmp_path / "run"
    extra = ["--save-every", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxlstm",
         *train_argv(shakespeare, out, "--steps", str(TOTAL), *extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stop_after = random.Random(os.getpid() + 1).randint(4, 20)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "metrics.jsonl").exists():
                if len(train_losses(out)) >= stop_after:
                    break
            time.sleep(0.01)
        process.kill()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    argv = ["train", "--text", str(shakespeare), "--out", str(out)]
    assert main([*argv, *extra, "--no-progress"]) == 0
    assert_same_params(straight, out)


def test_half_written_checkpoint_ignored(straight, shakespeare, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(shakespeare, out, "--steps", "17")) == 0
    # What a save cut short leaves: Orbax's temporary folder, part-filled.
    checkpoints = out / "checkpoints"
    partial = checkpoints / "20.orbax-checkpoint-tmp-1234"
    shutil.copytree(checkpoints / "17", partial)
    for path in partial.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:3])
    argv = ["train", "--text", str(shakespeare), "--out", str(out)]
    assert main([*argv, "--steps", str(TOTAL), "--no-progress"]) == 0
    assert_matches_straight(straight, out, 17)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_save_keeps_previous(shakespeare, tmp_path, capsys, code):
    out = tmp_path / "run"
    path_class = type(epath.Path("/"))

    def failing(original):
        def write(self, *args, **kwargs):
            if "10.orbax-checkpoint-tmp" in str(self):
                raise OSError(code, os.strerror(code), str(self))
            return original(self, *args, **kwargs)

        return write

    with pytest.MonkeyPatch.context() as patch:
        for name in ("write_text", "write_bytes"):
            patch.setattr(path_class, name, failing(getattr(path_class, name)))
        status = main(train_argv(shakespeare, out, "--steps", str(TOTAL)))
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err
    assert "checkpoint of step 10" in err
    assert "step 5 is intact" in err
    assert os.strerror(code) in err
    run = load_run(out)
    assert run.step == 5
    leaves = jax.tree.leaves(run.params)
    assert all(np.isfinite(x).all() for x in leaves)


def test_other_min_count_rejected(straight, shakespeare, capsys):
    argv = ["train", "--text", str(shakespeare), "--out", str(straight)]
    assert main([*argv, "--min-count", "2"]) == 1
    err = capsys.readouterr().err
    assert "--min-count is 0 in the checkpoint but 2 now" in err


def test_edited_text_rejected(straight, shakespeare, tmp_path, capsys):
    edited = tmp_path / "edited.txt"
    edited.write_text(shakespeare.read_text() + " 0123456789 zz" * 50)
    argv = ["train", "--text", str(edited), "--out", str(straight)]
    started = time.monotonic()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "checkpoint vocabulary has" in err
    assert "this text gives" in err
    assert time.monotonic() - started < 30  # fails before compiling


def test_other_model_size_rejected(straight, shakespeare, capsys):
    argv = ["train", "--text", str(shakespeare), "--out", str(straight)]
    assert main([*argv, "--hidden", "32", "--lr", "0.01"]) == 1
    err = capsys.readouterr().err
    assert "--hidden is 24 in the checkpoint but 32 now" in err
    assert "--lr is 0.0005 in the checkpoint but 0.01 now" in err


def test_other_preset_rejected(straight, shakespeare, capsys):
    argv = ["train", "--text", str(shakespeare), "--out", str(straight)]
    assert main([*argv, "--preset", "word"]) == 1
    assert "--preset is char" in capsys.readouterr().err


def test_pickles_never_loaded(straight, shakespeare, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("vocab.pkl", "checkpoints/30/state.pkl", "model.pickle"):
        (run / name).write_bytes(pickle.dumps(Payload()))
    assert main(["sample", str(run), "--num", "3"]) == 0
    argv = ["train", "--text", str(shakespeare), "--out", str(run)]
    assert main([*argv, "--steps", "31", "--no-progress"]) == 0
    assert not marker.exists()


def test_newer_config_format_rejected(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    config = json.loads((run / "config.json").read_text())
    config["format"] = 99
    (run / "config.json").write_text(json.dumps(config))
    assert main(["sample", str(run)]) == 1
    err = capsys.readouterr().err
    assert "format 99" in err
    assert "upgrade jaxlstm" in err


def test_newer_checkpoint_format_rejected(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    meta = run / "checkpoints" / "30" / "meta" / "metadata"
    body = json.loads(meta.read_text())
    body["format"] = 7
    meta.write_text(json.dumps(body))
    assert main(["sample", str(run)]) == 1
    assert "format 7" in capsys.readouterr().err


def test_train_into_foreign_folder_rejected(shakespeare, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["train", "--text", str(shakespeare), "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "not a jaxlstm run folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sample_uses_newest_or_step(straight, capsys):
    assert main(["sample", str(straight), "--num", "5"]) == 0
    newest = capsys.readouterr().out
    assert main(["sample", str(straight), "--num", "5", "--step", "30"]) == 0
    assert capsys.readouterr().out == newest
    steps = sorted(int(p.name) for p in (straight / "checkpoints").iterdir())
    assert steps == [20, 25, 30]  # the newest --keep 3 are kept


def test_failed_overwrite_restores_run(straight, shakespeare, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = (run / "metrics.jsonl").read_text()
    argv = train_argv(shakespeare, run, "--steps", "20", "--overwrite")
    assert main([*argv, "--lr", "1e38"]) == 1  # the loss becomes NaN
    assert "became nan" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
    assert load_run(run).step == TOTAL
    assert not (run / ".previous-run").exists()


def test_overwrite_replaces_after_first_save(straight, shakespeare, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    argv = train_argv(shakespeare, run, "--steps", "6", "--overwrite")
    assert main(argv) == 0
    assert load_run(run).step == 6
    assert sorted(train_losses(run)) == list(range(1, 7))
    assert not (run / ".previous-run").exists()


@pytest.mark.parametrize(
    "damage",
    ["extra-token", "hidden", "no-params", "empty-step", "level"],
)
def test_damaged_run_one_line_error(straight, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    vocab = json.loads((run / "vocab.json").read_text())
    config = json.loads((run / "config.json").read_text())
    if damage == "extra-token":
        vocab["tokens"].append("#")
        (run / "vocab.json").write_text(json.dumps(vocab))
    elif damage == "hidden":
        config["model"]["hidden"] = 32
        (run / "config.json").write_text(json.dumps(config))
    elif damage == "no-params":
        shutil.rmtree(run / "checkpoints" / "30" / "params")
    elif damage == "empty-step":
        (run / "checkpoints" / "999").mkdir()
    elif damage == "level":
        vocab["level"] = "word"
        (run / "vocab.json").write_text(json.dumps(vocab))
    assert main(["sample", str(run), "--num", "3"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("jaxlstm: error: ")
    assert len(err.strip().splitlines()) == 1


def test_overwrite_keeps_foreign_folder(shakespeare, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = train_argv(shakespeare, tmp_path, "--steps", "2", "--overwrite")
    assert main(argv) == 1
    assert "not a jaxlstm run folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_epochs_on_resume_replace_steps(straight, shakespeare, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    argv = ["train", "--text", str(shakespeare), "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--log-every", "50"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] is None
    assert load_run(run).step > TOTAL  # one epoch is hundreds of steps


def test_training_compiles_each_step_once(shakespeare, tmp_path):
    # A hidden size no other test uses, so every step compiles afresh here.
    compiles = {}

    def record(event, duration, **kwargs):
        del duration
        if event == "/jax/core/compile/backend_compile_duration":
            name = str(kwargs.get("fun_name"))
            compiles[name] = compiles.get(name, 0) + 1

    argv = train_argv(
        shakespeare, tmp_path / "run", "--steps", "10", "--eval-every", "3",
        "--hidden", "20",
    )  # fmt: skip
    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        assert main(argv) == 0
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    # Evaluations and samples at steps 3, 6, 9 and 10 reuse their first
    # compile, and so do the nine training steps after the first.
    assert compiles.get("jit(train_step)") == 1
    assert compiles.get("jit(eval_step)") == 1
    assert compiles.get("jit(generate_ids)") == 1

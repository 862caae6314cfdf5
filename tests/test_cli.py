"""End-to-end runs of the command line and its handling of bad input."""

import json
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlstm.checkpoint import load_run
from jaxlstm.cli import main

# Small enough to train in seconds, big enough for several windows.
TINY = [
    "--batch-size", "8", "--seq-len", "16", "--embedding", "16",
    "--hidden", "24", "--log-every", "3", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def char_run(shakespeare, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "char"
    argv = ["train", "--preset", "char", "--text", str(shakespeare)]
    argv += [*TINY, "--layers", "2", "--steps", "12", "--eval-every", "6"]
    argv += ["--save-every", "6", "--out", str(out)]
    assert main(argv) == 0
    return out


def read_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_train_writes_run_folder(char_run):
    for name in ("config.json", "vocab.json", "metrics.jsonl", "loss.png"):
        assert (char_run / name).is_file(), name
    assert (char_run / "checkpoints" / "12").is_dir()
    assert (char_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_logs_every_step_and_evals(char_run):
    records = read_metrics(char_run)
    train_steps = [r["step"] for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert train_steps == list(range(1, 13))
    assert [r["step"] for r in val] == [6, 12]
    assert all(r["val_bpc"] > 0 for r in val)


def test_train_config_records_overrides(char_run):
    config = json.loads((char_run / "config.json").read_text())
    assert config["train"]["batch_size"] == 8
    assert config["model"]["layers"] == 2
    assert config["preset"] == "char"


def test_sample_continues_prime(char_run, capsys):
    capsys.readouterr()
    argv = ["sample", str(char_run), "--prime", "thou art more"]
    assert main([*argv, "--num", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("thou art more")
    assert len(lines[0]) == len("thou art more") + 10


def test_sample_older_step(char_run, capsys):
    capsys.readouterr()
    assert main(["sample", str(char_run), "--step", "6", "--num", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_sample_missing_step(char_run, capsys):
    assert main(["sample", str(char_run), "--step", "7"]) == 1
    assert "no checkpoint at step 7" in capsys.readouterr().err


def test_python_m_matches_script(char_run):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlstm",
            "sample",
            str(char_run),
            "--num",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line[: -5] for line in lines] == [
        "thou art more", "to be or not to", "wherefore art thou",
    ]  # fmt: skip


def test_same_seed_same_losses(shakespeare, tmp_path):
    losses = []
    for name in ("a", "b"):
        argv = ["train", "--preset", "word", "--text", str(shakespeare)]
        argv += [*TINY, "--min-count", "1", "--steps", "6"]
        argv += ["--eval-every", "6", "--out", str(tmp_path / name)]
        assert main(argv) == 0
        records = read_metrics(tmp_path / name)
        losses.append([r.get("train_loss", r.get("val_loss")) for r in records])
    assert losses[0] == losses[1]


def test_word_run_samples_words(shakespeare, tmp_path, capsys):
    out = tmp_path / "word"
    argv = ["train", "--preset", "word", "--text", str(shakespeare)]
    argv += [*TINY, "--min-count", "2", "--steps", "4", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--num", "6", "--prime", "to be"]) == 0
    words = capsys.readouterr().out.split()
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    assert len(words) == 2 + 6
    assert all(w in vocab for w in words[2:])


def test_finished_run_trains_nothing(char_run, shakespeare, capsys):
    before = (char_run / "metrics.jsonl").read_text()
    argv = ["train", "--text", str(shakespeare), "--out", str(char_run)]
    assert main([*argv, "--no-progress"]) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert (char_run / "metrics.jsonl").read_text() == before


# Bad input: one line on stderr, a non-zero exit, no traceback.


def one_line_error(capsys, argv):
    """Run `argv`, expect a failure, return the single stderr line."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse errors exit with status 2
        status = exit_.code
    err = capsys.readouterr().err
    assert status != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1]


def test_missing_text_file(capsys, tmp_path):
    line = one_line_error(capsys, ["train", "--text", str(tmp_path / "no")])
    assert "not found" in line


def test_text_is_folder(capsys, tmp_path):
    line = one_line_error(capsys, ["train", "--text", str(tmp_path)])
    assert "is a folder" in line


def test_empty_text_file(capsys, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    assert "is empty" in one_line_error(capsys, ["train", "--text", str(path)])


def test_invalid_utf8_names_offset(capsys, tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"hello caf\xe9 world")
    line = one_line_error(capsys, ["train", "--text", str(path)])
    assert "byte offset 9" in line
    assert "--encoding" in line


def test_corpus_too_short(capsys, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be " * 30)
    line = one_line_error(
        capsys, ["train", "--preset", "word", "--text", str(path)]
    )
    assert "needs 5001" in line
    assert "--batch-size" in line


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--batch-size", "0"),
        ("--seq-len", "-3"),
        ("--hidden", "ten"),
        ("--layers", "1.5"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--clip", "-1"),
        ("--steps", "0"),
        ("--epochs", "x"),
        ("--val-fraction", "0"),
        ("--val-fraction", "1"),
        ("--val-fraction", "1.5"),
    ],
)
def test_bad_number_rejected(capsys, flag, value):
    line = one_line_error(capsys, ["train", flag, value])
    assert flag in line
    assert repr(value) in line


def test_offline_without_cache_suggests_text(capsys, tmp_path):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/pg100.txt"
    argv = ["train", "--url", url, "--cache-dir", str(tmp_path)]
    line = one_line_error(capsys, argv)
    assert "--text" in line


def test_sample_on_non_run_folder(capsys, tmp_path):
    line = one_line_error(capsys, ["sample", str(tmp_path)])
    assert "contains no trained run" in line


def test_sample_empty_prime(char_run, capsys):
    line = one_line_error(capsys, ["sample", str(char_run), "--prime", " ,"])
    assert "empty after cleaning" in line


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_sample_bad_temperature(char_run, capsys, value):
    line = one_line_error(
        capsys, ["sample", str(char_run), "--temperature", value]
    )
    assert "--temperature" in line


def test_nonfinite_loss_stops_without_checkpoint(shakespeare, tmp_path, capsys):
    out = tmp_path / "diverged"
    argv = ["train", "--preset", "char", "--text", str(shakespeare), *TINY]
    # Near float32's largest value, so the parameters overflow to infinity
    # within two steps and the loss becomes NaN.
    argv += ["--lr", "1e38", "--steps", "30"]
    argv += ["--save-every", "1", "--out", str(out)]
    line = one_line_error(capsys, argv)
    match = re.search(r"became nan at step (\d+)", line)
    assert match, line
    failed_at = int(match.group(1))
    saved = [int(p.name) for p in (out / "checkpoints").glob("[0-9]*")]
    assert all(step < failed_at for step in saved)
    for step in saved:
        params = load_run(out, step).params
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_seed_beyond_32_bits_rejected(capsys):
    line = one_line_error(capsys, ["train", "--seed", str(2**32)])
    assert "--seed" in line


def test_min_count_keeping_nothing(shakespeare, capsys, tmp_path):
    argv = ["train", "--preset", "word", "--text", str(shakespeare)]
    argv += ["--min-count", "1000000", "--out", str(tmp_path / "run")]
    line = one_line_error(capsys, argv)
    assert "--min-count 1000000 keeps 0 token(s)" in line


def test_empty_text_path_rejected(capsys):
    assert "--text is empty" in one_line_error(capsys, ["train", "--text", ""])


def test_text_and_url_exclusive(capsys):
    argv = ["train", "--text", "a.txt", "--url", "http://127.0.0.1:9/x"]
    assert "not allowed with" in one_line_error(capsys, argv)


def test_huge_temperature_rejected(char_run, capsys):
    line = one_line_error(
        capsys, ["sample", str(char_run), "--temperature", "1e300"]
    )
    assert "too large for float32" in line


def test_verbose_after_subcommand(char_run, capsys):
    assert main(["sample", str(char_run), "-v", "--num", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_process_flags_need_coordinator(capsys):
    argv = ["train", "--num-processes", "2", "--process-id", "0"]
    assert "need --coordinator" in one_line_error(capsys, argv)

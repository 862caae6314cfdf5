"""Data-parallel training with pmap, on fake CPU devices.

Each test runs in a subprocess whose XLA_FLAGS ask for four host devices,
because the flag only takes effect before JAX is imported.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

FOUR_DEVICES = "--xla_force_host_platform_device_count=4"
SMALL = [
    "--preset", "char", "--batch-size", "8", "--seq-len", "16",
    "--embedding", "16", "--hidden", "24", "--layers", "2",
    "--log-every", "1", "--eval-every", "10", "--save-every", "10",
    "--no-progress",
]  # fmt: skip


def run_python(code, *args):
    env = dict(os.environ, XLA_FLAGS=FOUR_DEVICES)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return result


def run_cli(*args):
    return run_python(
        "import sys; from jaxlstm.cli import main; sys.exit(main())", *args
    )


def losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        key = "train_loss" if "train_loss" in record else "val_loss"
        out[(key, record["step"])] = record[key]
    return out


@pytest.fixture(scope="module")
def runs(shakespeare, tmp_path_factory):
    """The same 20 steps trained on 1 and on 4 devices."""
    root = tmp_path_factory.mktemp("parallel")
    for count in (1, 4):
        out = root / f"devices{count}"
        result = run_cli(
            "train", "--text", shakespeare, "--out", out, *SMALL,
            "--steps", "20", "--devices", count,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"{count} cpu device(s)" in result.stderr
    return root


# Four devices reduce gradients in another order than one device, and the
# float32 round-off of each sum (about 1e-7 relative) compounds through 20
# Adam steps; 1e-5 relative is far below any real difference in training.
TOLERANCE = 1e-5


def test_four_devices_match_one(runs):
    one, four = losses(runs / "devices1"), losses(runs / "devices4")
    assert sorted(one) == sorted(four)
    for key in one:
        assert four[key] == pytest.approx(one[key], rel=TOLERANCE), key


def test_four_devices_same_params(runs):
    code = """
        import sys, jax, numpy as np
        from jaxlstm.checkpoint import load_run
        a = jax.tree.leaves(load_run(sys.argv[1]).params)
        b = jax.tree.leaves(load_run(sys.argv[2]).params)
        print(max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)))
    """
    result = run_python(code, runs / "devices1", runs / "devices4")
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < TOLERANCE


def test_rows_carry_on_every_device():
    # Two windows scored on 4 devices with the carry passed on give the
    # same per-row carry as on one device, so each device carries its rows.
    code = """
        import json, jax, numpy as np
        from jaxlstm.config import TrainConfig
        from jaxlstm.data import TBPTTBatches
        from jaxlstm.model import LanguageModel
        from jaxlstm.train_step import Placement, create_train_state
        model = LanguageModel(vocab_size=50, embedding=8, hidden=12, layers=2)
        state = create_train_state(model, TrainConfig(), jax.random.key(0))
        ids = np.random.default_rng(0).integers(0, 50, 8 * 40 + 1)
        batches = TBPTTBatches(ids.astype(np.int32), 8, 10)
        carries = {}
        for count in (1, 4):
            place = Placement(jax.devices()[:count], 8)
            placed = place.replicate(state)
            carry = place.shard(model.initial_carry(8))
            per_window = []
            for k in range(3):
                window = place.shard(batches.window(k))
                carry, _ = place.eval_step(placed, window, carry)
                per_window.append(
                    [np.asarray(x).tolist()
                     for x in jax.tree.leaves(place.unshard(carry))]
                )
            carries[count] = per_window
        print(json.dumps(carries))
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    carries = json.loads(result.stdout)
    for k, (one, four) in enumerate(
        zip(carries["1"], carries["4"], strict=True)
    ):
        for a, b in zip(one, four, strict=True):
            np.testing.assert_allclose(
                b, a, rtol=1e-5, atol=1e-6, err_msg=f"window {k}"
            )


def test_indivisible_batch_rejected(shakespeare, tmp_path):
    result = run_cli(
        "train", "--text", shakespeare, "--out", tmp_path / "run", *SMALL,
        "--batch-size", "10", "--devices", "4", "--steps", "2",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "--batch-size 10 does not divide evenly across 4 devices" in line
    assert "--batch-size 8 or 12" in line


def test_too_many_devices_rejected(shakespeare, tmp_path):
    result = run_cli(
        "train", "--text", shakespeare, "--out", tmp_path / "run", *SMALL,
        "--devices", "5", "--steps", "2",
    )  # fmt: skip
    assert result.returncode == 1
    assert "--devices 5 is not available" in result.stderr


def test_save_four_sample_one_resume_two(runs, shakespeare, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "devices4", run)
    sample = run_cli("sample", run, "--num", "8")
    assert sample.returncode == 0, sample.stderr
    assert len(sample.stdout.splitlines()) == 3

    resumed = run_cli(
        "train", "--text", shakespeare, "--out", run, "--steps", "30",
        "--devices", "2", "--no-progress",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint of step 20" in resumed.stderr
    straight = run_cli(
        "train", "--text", shakespeare, "--out", tmp_path / "straight",
        *SMALL, "--steps", "30", "--devices", "1",
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr
    want, got = losses(tmp_path / "straight"), losses(run)
    for step in range(21, 31):
        key = ("train_loss", step)
        assert got[key] == pytest.approx(want[key], rel=TOLERANCE), step


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(runs, shakespeare, tmp_path):
    # Two processes on 127.0.0.1 under jax.distributed, 2 fake CPU devices
    # each, with Gloo collectives: 20 steps with an evaluation and a save
    # midway, compared with one device.
    out = tmp_path / "run"
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    argv = [
        sys.executable, "-m", "jaxlstm", "train", "--text", str(shakespeare),
        "--out", str(out), *SMALL, "--steps", "20",
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
    ]  # fmt: skip
    processes = [
        subprocess.Popen(
            [*argv, "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    assert "2 cpu device(s)" in outputs[0][1]
    assert "run folder:" in outputs[0][0]
    assert "run folder:" not in outputs[1][0]  # process 0 reports for all
    want, got = losses(runs / "devices1"), losses(out)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [
        10,
        20,
    ]
    for step in range(1, 21):
        key = ("train_loss", step)
        assert got[key] == pytest.approx(want[key], rel=TOLERANCE), step

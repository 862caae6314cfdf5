"""Print training throughput with pmap on 1, 2 and 4 devices.

    python benchmarks/parallel_throughput.py --preset char

Each device count runs in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=4, so on a CPU-only
machine the "devices" are slices of the same cores. There the table shows
the overhead of the data-parallel path for the word model, and for the char
model a speed-up from running the devices' small products side by side. On
a machine with several accelerators, run it without the flag
(--real-devices).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(preset: str, count: int, windows: int, steps: int) -> dict:
    """Time full training steps on `count` devices; runs in a subprocess."""
    import jax
    import numpy as np

    from jaxlstm.config import PRESETS
    from jaxlstm.data import Batch
    from jaxlstm.model import build_model
    from jaxlstm.train_step import Placement, create_train_state

    config = PRESETS[preset]
    train_cfg = config.train
    vocab = 8000 if preset == "word" else 40
    model = build_model(config.model, vocab)
    placement = Placement(jax.devices()[:count], train_cfg.batch_size)
    state = placement.replicate(
        create_train_state(model, train_cfg, jax.random.key(0))
    )
    carry = placement.shard(model.initial_carry(train_cfg.batch_size))
    rng = np.random.default_rng(0)
    shape = (train_cfg.batch_size, train_cfg.seq_len)
    batches = [
        placement.shard(
            Batch(
                rng.integers(0, vocab, shape).astype(np.int32),
                rng.integers(0, vocab, shape).astype(np.int32),
                np.ones(shape, np.float32),
            )
        )
        for _ in range(4)
    ]

    started = time.perf_counter()
    state, carry, metrics = placement.train_step(state, batches[0], carry)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - started
    for i in range(3):  # warm-up
        state, carry, metrics = placement.train_step(state, batches[i], carry)
    jax.block_until_ready(metrics)

    rates = []
    tokens = train_cfg.batch_size * train_cfg.seq_len * steps
    for _ in range(windows):
        started = time.perf_counter()
        for i in range(steps):
            state, carry, metrics = placement.train_step(
                state, batches[i % 4], carry
            )
        jax.block_until_ready((state, carry, metrics))
        rates.append(tokens / (time.perf_counter() - started))
    return {
        "devices": count,
        "platform": jax.devices()[0].platform,
        "tokens_per_sec": statistics.median(rates),
        "first_step_s": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("word", "char"), default="char")
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--real-devices", action="store_true")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args.preset, args.worker, args.windows, args.steps)
        print(json.dumps(result))
        return

    env = dict(os.environ)
    if not args.real_devices:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    print(
        f"preset {args.preset}, batch 100 x 50, median of {args.windows} "
        f"windows of {args.steps} steps"
    )
    print("| devices | platform | tokens/s | vs 1 device | first step s |")
    print("|---|---|---|---|---|")
    base = None
    for count in map(int, args.counts.split(",")):
        output = subprocess.run(
            [sys.executable, __file__, "--preset", args.preset,
             "--windows", str(args.windows), "--steps", str(args.steps),
             "--worker", str(count)],
            capture_output=True, text=True, env=env, check=True,
        ).stdout  # fmt: skip
        result = json.loads(output.strip().splitlines()[-1])
        base = base or result["tokens_per_sec"]
        print(
            f"| {count} | {result['platform']} | "
            f"{result['tokens_per_sec']:,.0f} | "
            f"{result['tokens_per_sec'] / base:.2f} | "
            f"{result['first_step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()

"""Measure jaxlstm's training, compilation and generation speed.

    python benchmarks/speed.py                        # word and char
    python benchmarks/speed.py --preset char --reference --json speed.jsonl
    python benchmarks/speed.py --quick                # smoke test

Both presets are the lesson's models, trained at batch 100 x 50 on random
token ids. The word model has a vocabulary of 8000, an embedding of 128, one
LSTM layer of 128 and Adam at 1e-3. The char model has a vocabulary of 40,
an embedding of 128, three LSTM layers of 128 and Adam at 5e-4. Both clip
gradients to global norm 4.5. No text is read, so data loading is not
timed. On two cores of an AMD EPYC, `--preset char` ran in about 20 s and
`--quick` (both presets) in about 40 s.

Each run of a preset is a fresh subprocess, so compilation caches and the
peak resident memory belong to that run alone. It reports:

- `first_step_s`: the first call of `jaxlstm.train_step.train_step`,
  including its tracing and compilation, until the result is ready. The
  persistent compilation cache is turned off so that this compile is cold.
- `lower_s` and `compile_s`: `train_step.lower(...)` and `.compile()`, timed
  after `jax.clear_caches()` so that they repeat the work from scratch.
- `train_tok_s` and `step_ms`: after `warmup` steps, the median of `windows`
  windows of `steps` steps, each window ending with `jax.block_until_ready`
  on the state, the carry and the metrics.
- `train_compiles`: `train_step._cache_size()` after all training, which is
  1 when no step compiled the function again. Where jax lacks that private
  method, the count comes from `jax.monitoring` compile events instead, and
  `train_compiles_source` names the source used.
- With `--cpu-devices N`, training runs data-parallel with `pmap` on N
  fake CPU devices, the way `jaxlstm train` does when
  `XLA_FLAGS=--xla_force_host_platform_device_count=N` is set. Lowering and
  compilation are then not timed apart, `train_compiles` is not counted,
  and the result lines have `peer` "jaxlstm_Ncpu".
- `gen_scan_tok_s`: greedy generation of 200 tokens after a 3-token prime
  with `jaxlstm.sampling.generate_ids`, at batch 1. `gen_scan_first_s` is
  its first call, compilation included. The same at batch 16 and 100 gives
  total tokens per second and the cost per generated token against batch 1.
- `peak_rss_mb`: the subprocess's maximum resident set size at the end.

The parent process measures the float32 matrix product peak once with jax
and NumPy and reports each run's training FLOPs as a share of it.
`--reference` also runs every preset with `fused=False`, the straightforward
model, so that both paths are measured in one run. Its result lines have
`peer` "jaxlstm_reference".
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, NamedTuple


class Preset(NamedTuple):
    """Model and optimiser sizes of one benchmark configuration."""

    vocab: int
    embed: int
    hidden: int
    layers: int
    lr: float


PRESETS = {
    "word": Preset(vocab=8000, embed=128, hidden=128, layers=1, lr=1e-3),
    "char": Preset(vocab=40, embed=128, hidden=128, layers=3, lr=5e-4),
}
BATCH = 100  # stream rows per training batch
SEQ = 50  # tokens per training window
CLIP = 4.5  # maximum global gradient norm
POOL = 8  # random training batches cycled through, built before timing
PRIME = 3  # prime tokens per generated row
GEN_TOKENS = 200  # tokens generated after the prime
MATMUL_SIZE = 2048  # side of the square matrix product behind the peak
MATMUL_REPS = 5  # timed products per library, after one warm-up


class Schedule(NamedTuple):
    """Step and call counts of one run."""

    warmup: int  # untimed training steps after the first
    windows: int  # timed windows, whose median is reported
    steps: int  # training steps per window
    gen_reps: int  # timed generation calls after the first
    gen_batches: tuple[int, ...]  # batch sizes of batched generation


FULL = Schedule(warmup=3, windows=5, steps=4, gen_reps=5, gen_batches=(16, 100))
QUICK = Schedule(warmup=1, windows=2, steps=2, gen_reps=2, gen_batches=(16,))


def flops_per_token(preset: Preset) -> dict[str, int]:
    """Count the matrix-product FLOPs per token of a training step.

    A multiply-add counts as 2 FLOPs. Per token, an LSTM layer's forward
    pass costs 2 * 4H * (I + H), where I is the embedding size for layer 0
    and H for the layers above, and the output layer costs 2 * H * V. A
    training step costs 3 x the forward pass, because for every product
    Y = X W the backward pass computes dX = dY W^T and dW = X^T dY, each as
    costly as the forward product. The embedding lookup, the gate
    nonlinearities, the softmax and the optimiser are left out.

    Returns:
      `lstm`, `output`, `forward` and `train` FLOPs per token.
    """
    hidden = preset.hidden
    lstm = sum(
        2 * 4 * hidden * ((preset.embed if layer == 0 else hidden) + hidden)
        for layer in range(preset.layers)
    )
    output = 2 * hidden * preset.vocab
    forward = lstm + output
    return {
        "lstm": lstm,
        "output": output,
        "forward": forward,
        "train": 3 * forward,
    }


def log(message: str) -> None:
    """Print a progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    """Return the versions of Python and the numerical libraries."""
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    """Return the first "model name" of /proc/cpuinfo, or the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class CompileCounter:
    """Count XLA backend compilations reported through `jax.monitoring`."""

    # NOTE: the event name and its `fun_name` value ("jit(train_step)") are
    # those of jax 0.10.2, not a public contract. If a later jax renames
    # them, every count here stays 0.
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count = 0
        self.by_function: dict[str, int] = {}
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration
        if event == self.EVENT:
            self.count += 1
            name = str(kwargs.get("fun_name"))
            self.by_function[name] = self.by_function.get(name, 0) + 1

    def of_function(self, name: str) -> int:
        """Return the compilations of the jitted function called `name`."""
        return self.by_function.get(f"jit({name})", 0)


def _random_tokens(rng, shape: tuple[int, ...], vocab: int):
    """Draw `<int32>` token ids in 1..vocab-1, never the unknown token 0."""
    import numpy as np

    return rng.integers(1, vocab, shape, dtype=np.int32)


def _time_first_step(
    train_step, state, batch, carry
) -> tuple[Any, Any, float, float]:
    """Time the first, cold call of `train_step` until its result is ready.

    Returns:
      The new state and carry, the seconds, and the step's loss.
    """
    import jax
    import numpy as np

    started = time.perf_counter()
    state, carry, metrics = jax.block_until_ready(
        train_step(state, batch, carry)
    )
    seconds = time.perf_counter() - started
    return state, carry, seconds, float(np.ravel(metrics["loss"])[0])


def _time_compile(state, batch, carry) -> tuple[float, float]:
    """Time `train_step.lower(...)` and `.compile()` from empty caches.

    Returns:
      The lowering seconds (tracing included) and the compile seconds.
    """
    import jax

    from jaxlstm.train_step import train_step

    # The first step filled the tracing and compilation caches, which would
    # otherwise make both timings near zero.
    jax.clear_caches()
    started = time.perf_counter()
    lowered = train_step.lower(state, batch, carry)
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
    return lowered_at - started, compiled_at - lowered_at


def _time_training(
    train_step, state, batches, carry, schedule: Schedule
) -> dict:
    """Run the warm-up steps and the timed windows of training steps.

    Nothing is read back to the host inside a window, so steps are
    dispatched while earlier ones still run, as in `jaxlstm train`.

    Returns:
      `train_tok_s` and `step_ms` (medians over windows), the per-window
      `train_tok_s_windows`, `loss_last` (the last step's loss) and the
      final `state`.
    """
    import jax
    import numpy as np

    index = 0
    metrics = None
    for _ in range(schedule.warmup):
        state, carry, metrics = train_step(
            state, batches[index % len(batches)], carry
        )
        index += 1
    jax.block_until_ready((state, carry, metrics))

    rates, step_ms = [], []
    for _ in range(schedule.windows):
        started = time.perf_counter()
        for _ in range(schedule.steps):
            state, carry, metrics = train_step(
                state, batches[index % len(batches)], carry
            )
            index += 1
        jax.block_until_ready((state, carry, metrics))
        seconds = time.perf_counter() - started
        rates.append(schedule.steps * BATCH * SEQ / seconds)
        step_ms.append(1e3 * seconds / schedule.steps)
    return {
        "train_tok_s": statistics.median(rates),
        "train_tok_s_windows": rates,
        "step_ms": statistics.median(step_ms),
        "loss_last": (float(np.ravel(metrics["loss"])[0]) if metrics else None),
        "state": state,
    }


def _time_generation(model, params, rows: int, reps: int, rng) -> dict:
    """Time greedy generation of `GEN_TOKENS` tokens for `rows` primes.

    Returns:
      `first_s`, the first call with its compilation, and `seconds`, the
      median wall time of `reps` later calls.
    """
    import jax
    import jax.numpy as jnp

    from jaxlstm.sampling import generate_ids

    prime_ids = jnp.asarray(
        _random_tokens(rng, (rows, PRIME), model.vocab_size)
    )
    prime_lengths = jnp.full((rows,), PRIME, jnp.int32)
    # Greedy generation ignores the key, the temperature and top-k.
    key, temperature, top_k = jax.random.key(0), jnp.float32(0), jnp.int32(0)

    def generate():
        return jax.block_until_ready(
            generate_ids(
                model,
                params,
                prime_ids,
                prime_lengths,
                key,
                temperature,
                top_k,
                num_steps=GEN_TOKENS,
                greedy=True,
            )
        )

    started = time.perf_counter()
    tokens = generate()
    first_s = time.perf_counter() - started
    if tokens.shape != (rows, GEN_TOKENS):
        raise RuntimeError(
            f"generate_ids returned shape {tokens.shape}, expected "
            f"{(rows, GEN_TOKENS)}"
        )
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        generate()
        times.append(time.perf_counter() - started)
    return {"first_s": first_s, "seconds": statistics.median(times)}


def _build_inputs(preset: Preset, fused: bool) -> tuple:
    """Create the model, its train state, a zero carry and a batch pool.

    Returns:
      The model, the train state, the carry, and `POOL` batches of random
      `<int32>[BATCH, SEQ]` inputs and targets with all-ones weights,
      already on the device.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlstm.config import TrainConfig
    from jaxlstm.data import Batch
    from jaxlstm.model import LanguageModel
    from jaxlstm.train_step import create_train_state

    model = LanguageModel(
        preset.vocab, preset.embed, preset.hidden, preset.layers, fused=fused
    )
    config = TrainConfig(lr=preset.lr, clip=CLIP)
    state = create_train_state(model, config, jax.random.key(0))
    carry = model.initial_carry(BATCH)
    rng = np.random.default_rng(0)
    weights = jnp.ones((BATCH, SEQ), jnp.float32)
    batches = [
        Batch(
            jnp.asarray(_random_tokens(rng, (BATCH, SEQ), preset.vocab)),
            jnp.asarray(_random_tokens(rng, (BATCH, SEQ), preset.vocab)),
            weights,
        )
        for _ in range(POOL)
    ]
    return model, state, carry, batches


def _measure_generation(
    model, params, schedule: Schedule, label: str
) -> dict[str, float]:
    """Time generation at batch 1 and at `schedule.gen_batches` rows.

    Returns:
      The `gen_scan_*` fields for batch 1 and, per batch size R,
      `gen_batchR_tok_s` (tokens of all rows per second),
      `gen_batchR_first_s`, `gen_batchR_us_per_token` (microseconds per
      generated token) and `gen_batchR_cost_vs_batch1` (that cost divided
      by batch 1's).
    """
    import numpy as np

    rng = np.random.default_rng(1)
    gen = _time_generation(model, params, 1, schedule.gen_reps, rng)
    result = {
        "gen_scan_first_s": gen["first_s"],
        "gen_scan_tok_s": GEN_TOKENS / gen["seconds"],
    }
    single_us = 1e6 * gen["seconds"] / GEN_TOKENS
    log(
        f"{label} generate batch 1: {result['gen_scan_tok_s']:,.0f} tok/s, "
        f"first call {gen['first_s']:.2f} s"
    )
    for rows in schedule.gen_batches:
        gen = _time_generation(model, params, rows, schedule.gen_reps, rng)
        us_per_token = 1e6 * gen["seconds"] / (GEN_TOKENS * rows)
        result[f"gen_batch{rows}_tok_s"] = rows * GEN_TOKENS / gen["seconds"]
        result[f"gen_batch{rows}_first_s"] = gen["first_s"]
        result[f"gen_batch{rows}_us_per_token"] = us_per_token
        result[f"gen_batch{rows}_cost_vs_batch1"] = us_per_token / single_us
        log(
            f"{label} generate batch {rows}: "
            f"{result[f'gen_batch{rows}_tok_s']:,.0f} tok/s"
        )
    return result


def measure(
    name: str, fused: bool, schedule: Schedule, devices: int = 1
) -> dict:
    """Measure one preset in this process, as a worker subprocess does.

    Returns:
      The result fields that the worker can measure. The parent adds the
      settings and the matrix product peak.
    """
    import jax

    # A persistent compilation cache would make the first step warm.
    jax.config.update("jax_enable_compilation_cache", False)
    compiles = CompileCounter()

    from jaxlstm.train_step import train_step

    label = f"[{name}{'' if fused else ' reference'}]"
    model, state, carry, batches = _build_inputs(PRESETS[name], fused)
    step_fn = train_step
    if devices > 1:
        # The jaxlstm train path on several devices: pmap over the rows.
        from jaxlstm.train_step import Placement

        placement = Placement(jax.devices()[:devices], BATCH)
        state = placement.replicate(state)
        carry = placement.shard(carry)
        batches = [placement.shard(batch) for batch in batches]
        step_fn = placement.train_step
    state, carry, first_step_s, loss_first = _time_first_step(
        step_fn, state, batches[0], carry
    )
    log(f"{label} first step {first_step_s:.2f} s, loss {loss_first:.3f}")

    compiles_before_lower = compiles.of_function("train_step")
    if devices == 1:
        lower_s, compile_s = _time_compile(state, batches[1], carry)
        log(f"{label} lower {lower_s:.2f} s, compile {compile_s:.2f} s")
    else:
        lower_s = compile_s = None  # pmap is not timed ahead of time

    compiles_before_training = compiles.count
    training = _time_training(step_fn, state, batches[1:], carry, schedule)
    state = training.pop("state")
    if devices > 1:
        state = placement.unreplicate(state)
    log(
        f"{label} train {training['train_tok_s']:,.0f} tok/s "
        f"({training['step_ms']:.1f} ms/step)"
    )
    if devices > 1:
        train_compiles = None
        source = "not counted under pmap"
    elif hasattr(train_step, "_cache_size"):
        train_compiles = train_step._cache_size()
        source = "train_step._cache_size()"
    else:
        # The compile timed above, plus any that training needed.
        train_compiles = (
            compiles.of_function("train_step") - compiles_before_lower
        )
        source = "jax.monitoring backend compile events"

    result = {
        "devices": devices,
        "first_step_s": first_step_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "loss_first": loss_first,
        "train_compiles": train_compiles,
        "train_compiles_source": source,
        # All backend compilations during warm-up and timed windows. This is
        # 0 when the calls reuse the executable compiled ahead of time.
        "training_backend_compiles": compiles.count - compiles_before_training,
        **training,
        **_measure_generation(model, state.params, schedule, label),
    }

    # ru_maxrss is in KiB on Linux.
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mb"] = peak_kib / 1024
    return result


def measure_matmul_peak(reps: int = MATMUL_REPS) -> dict[str, float]:
    """Measure float32 matrix product GFLOP/s with jax and with NumPy.

    Each library multiplies two `MATMUL_SIZE` square matrices once to warm
    up, then `reps` more times. The jax product is jitted and waited for
    with `block_until_ready`, so its dispatch time is included.

    Returns:
      The median GFLOP/s of each library, keyed `jax` and `numpy`.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = MATMUL_SIZE
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    a_device, b_device = jnp.asarray(a), jnp.asarray(b)
    products = {
        "jax": lambda: dot(a_device, b_device).block_until_ready(),
        "numpy": lambda: a @ b,
    }
    rates = {}
    for library, product in products.items():
        product()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            product()
            times.append(time.perf_counter() - started)
        rates[library] = flops / statistics.median(times) / 1e9
    return rates


class Run(NamedTuple):
    """One preset and model path, measured in its own subprocess."""

    preset: str
    fused: bool
    devices: int = 1

    @property
    def peer(self) -> str:
        """The `peer` field of the run's result line."""
        name = "jaxlstm" if self.fused else "jaxlstm_reference"
        return name if self.devices == 1 else f"{name}_{self.devices}cpu"

    @property
    def title(self) -> str:
        """The run's column heading."""
        title = self.preset if self.fused else f"{self.preset} reference"
        if self.devices > 1:
            title += f", {self.devices} CPU devices"
        return title


def run_worker(run: Run, quick: bool, chunk_rows: int | None) -> dict | None:
    """Measure `run` in a fresh Python process.

    Returns:
      The worker's result, or None if the process failed; its stderr
      passes through to this process's stderr.
    """
    command = [sys.executable, __file__, "--worker", run.preset]
    if not run.fused:
        command.append("--reference")
    if quick:
        command.append("--quick")
    if chunk_rows is not None:
        command += ["--chunk-rows", str(chunk_rows)]
    env = dict(os.environ)
    if run.devices > 1:
        # Split the host into fake CPU devices before JAX starts.
        command += ["--cpu-devices", str(run.devices)]
        flag = f"--xla_force_host_platform_device_count={run.devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    completed = subprocess.run(
        command, stdout=subprocess.PIPE, text=True, check=False, env=env
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        log(
            f"{run.title}: the worker process failed with exit status "
            f"{completed.returncode}; its error is printed above"
        )
        return None
    return json.loads(lines[-1])


def build_result(
    run: Run,
    measured: dict,
    schedule: Schedule,
    rep: int,
    peak: dict[str, float],
    machine: dict,
) -> dict:
    """Join a worker's measurements with the run's settings and the peak."""
    preset = PRESETS[run.preset]
    flops = flops_per_token(preset)
    peak_gflops = max(peak.values())
    result = {
        "peer": run.peer,
        "config": run.preset,
        "rep": rep,
        **preset._asdict(),
        "batch": BATCH,
        "seq": SEQ,
        "clip": CLIP,
        "fused": run.fused,
        "warmup": schedule.warmup,
        "steps": schedule.steps,
        "windows": schedule.windows,
        "gen_tokens": GEN_TOKENS,
        "gen_reps": schedule.gen_reps,
        "prime": PRIME,
        "flops": flops,
        **measured,
        "matmul_peak_gflops": peak_gflops,
        "matmul_gflops": peak,
        "train_peak_fraction": (
            measured["train_tok_s"] * flops["train"] / (peak_gflops * 1e9)
        ),
        "ceiling_tok_s": peak_gflops * 1e9 / flops["train"],
        **machine,
    }
    return result


def _format(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _gen_cost(result: dict, rows: int) -> str:
    us = result.get(f"gen_batch{rows}_us_per_token")
    if us is None:
        return "-"
    ratio = result[f"gen_batch{rows}_cost_vs_batch1"]
    return f"{us:.1f} ({ratio:.2f})"


# Table rows: a label and a function from a result line to its cell.
ROWS = [
    ("train tok/s", lambda r: _format(r["train_tok_s"])),
    ("ms/step", lambda r: _format(r["step_ms"], 1)),
    ("% of matmul peak", lambda r: f"{100 * r['train_peak_fraction']:.1f}%"),
    ("ceiling tok/s at the peak", lambda r: _format(r["ceiling_tok_s"])),
    ("train FLOPs/token", lambda r: f"{r['flops']['train'] / 1e6:.2f} M"),
    (
        "first step s (trace + compile + run)",
        lambda r: f"{r['first_step_s']:.2f}",
    ),
    ("lower s", lambda r: _format(r["lower_s"], 2)),
    ("compile s", lambda r: _format(r["compile_s"], 2)),
    ("train_step compilations", lambda r: _format(r["train_compiles"])),
    ("gen batch 1 tok/s", lambda r: _format(r["gen_scan_tok_s"])),
    ("gen batch 1 first call s", lambda r: f"{r['gen_scan_first_s']:.2f}"),
    ("gen batch 16 tok/s", lambda r: _format(r.get("gen_batch16_tok_s"))),
    (
        "gen batch 16 us/token (x batch 1)",
        lambda r: _gen_cost(r, 16),
    ),
    ("gen batch 100 tok/s", lambda r: _format(r.get("gen_batch100_tok_s"))),
    (
        "gen batch 100 us/token (x batch 1)",
        lambda r: _gen_cost(r, 100),
    ),
    ("peak RSS MB", lambda r: _format(r["peak_rss_mb"])),
    (
        "loss first -> last",
        lambda r: f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
    ),
]


def print_table(runs: list[Run], results: list[dict]) -> None:
    """Print one column per run and one row per measurement, as Markdown."""
    print("| measurement | " + " | ".join(r.title for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for label, cell in ROWS:
        cells = [cell(r) for r in results]
        if all(c == "-" for c in cells):
            continue  # a measurement that this schedule skips
        print(f"| {label} | " + " | ".join(cells) + " |")

    # With --reference, compare the two paths of each preset.
    by_run = dict(zip(runs, results, strict=True))
    for run, result in by_run.items():
        reference = by_run.get(Run(run.preset, False, run.devices))
        if run.fused and reference:
            speedup = result["train_tok_s"] / reference["train_tok_s"]
            print(
                f"\n{run.preset}: fused training is {speedup:.2f}x the "
                "reference model's tokens/s"
            )


def print_header(
    machine: dict, peak: dict[str, float], schedule: Schedule
) -> None:
    """Print the versions, the machine, the peak and the schedule."""
    names = ("python", "jax", "jaxlib", "flax", "optax", "numpy")
    print(", ".join(f"{name} {machine[name]}" for name in names))
    print(f"CPU: {machine['cpu_model']}, {machine['cpus']} cores")
    rates = ", ".join(f"{lib} {rate:.0f}" for lib, rate in peak.items())
    print(
        f"float32 {MATMUL_SIZE}^3 matrix product GFLOP/s (median of "
        f"{MATMUL_REPS}): {rates}; peak = {max(peak.values()):.0f}"
    )
    batches = ", ".join(str(rows) for rows in (1, *schedule.gen_batches))
    print(
        f"batch {BATCH} x {SEQ}; {schedule.warmup} warm-up "
        f"step{'' if schedule.warmup == 1 else 's'}, median of "
        f"{schedule.windows} windows x {schedule.steps} steps; generation: "
        f"{PRIME}-token prime + {GEN_TOKENS} greedy tokens at batch "
        f"{batches}, median of {schedule.gen_reps} calls after the first"
    )
    print()


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=("word", "char", "all"),
        default="all",
        help="model configuration to measure (default all)",
    )
    parser.add_argument(
        "--rep",
        type=int,
        default=0,
        help="repetition number, copied into the JSON lines (default 0)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also measure the straightforward model (fused=False)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 warm-up step, 2 windows of 2 steps, 2 "
        "generation calls, no batch-100 generation",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="append one JSON object per run to FILE",
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help="rows per block of the fused output layer and loss "
        "(jaxlstm.fused.CHUNK_ROWS; default: the package's value)",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        metavar="N",
        help="train on N fake CPU devices with pmap, as "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N jaxlstm train "
        "does (default 1)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    schedule = QUICK if args.quick else FULL
    if args.worker:
        import jaxlstm.fused

        if args.chunk_rows is not None:
            jaxlstm.fused.CHUNK_ROWS = args.chunk_rows
        result = measure(
            args.worker, not args.reference, schedule, args.cpu_devices
        )
        result["chunk_rows"] = jaxlstm.fused.CHUNK_ROWS
        print(json.dumps(result), flush=True)
        return

    names = ["word", "char"] if args.preset == "all" else [args.preset]
    paths = [True, False] if args.reference else [True]
    runs = [
        Run(name, fused, args.cpu_devices) for name in names for fused in paths
    ]
    machine = {
        **versions(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
    }
    log("measuring the matrix product peak")
    peak = measure_matmul_peak()
    print_header(machine, peak, schedule)

    results, measured_runs = [], []
    for run in runs:
        log(f"measuring {run.title}")
        run_info = {
            **machine,
            "loadavg_1m": os.getloadavg()[0],  # at the start of the run
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        measured = run_worker(run, args.quick, args.chunk_rows)
        if measured is None:
            continue
        result = build_result(run, measured, schedule, args.rep, peak, run_info)
        results.append(result)
        measured_runs.append(run)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as out:
                out.write(json.dumps(result, sort_keys=True) + "\n")

    if results:
        print_table(measured_runs, results)
    if len(results) < len(runs):
        sys.exit(1)


if __name__ == "__main__":
    main()

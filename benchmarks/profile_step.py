"""Split one training step of a preset into its parts and time each part.

    python benchmarks/profile_step.py --preset word
    python benchmarks/profile_step.py --preset char

Each part is jitted on its own and timed like the whole step: one call to
compile, then the median of `--reps` calls, each waited for with
`jax.block_until_ready`. The parts are:

- the output layer with its loss, forward and backward
  (`jaxlstm.fused.linear_cross_entropy`);
- each LSTM layer's recurrence, forward alone and forward and backward
  (`jaxlstm.fused.lstm_recurrence`);
- each layer's input projection, forward and backward; for the char
  model's first layer, a lookup in the projected vocabulary instead;
- the gradient clipping and the Adam update.

A part run alone pays its own dispatch and misses the overlap of a whole
step, so the parts add up only roughly to the step. The table shows where
the time goes, not an exact split. Sizes are those of `benchmarks/speed.py`.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlstm.config import TrainConfig
from jaxlstm.data import Batch
from jaxlstm.fused import linear_cross_entropy, lstm_recurrence
from jaxlstm.model import LanguageModel
from jaxlstm.train_step import create_train_state, train_step

PRESETS = {  # vocabulary, layers, learning rate
    "word": (8000, 1, 1e-3),
    "char": (40, 3, 5e-4),
}
BATCH, SEQ, WIDTH = 100, 50, 128


def median_ms(fn, *args, reps: int) -> float:
    """Call `fn` once to compile, then return the median of `reps` calls."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def profile(preset: str, reps: int) -> list[tuple[str, float]]:
    """Return (part, milliseconds) rows for one preset."""
    vocab, layers, lr = PRESETS[preset]
    model = LanguageModel(vocab, WIDTH, WIDTH, layers)
    state = create_train_state(model, TrainConfig(lr=lr), jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, (BATCH, SEQ + 1)).astype(np.int32)
    batch = Batch(
        jnp.asarray(tokens[:, :-1]),
        jnp.asarray(tokens[:, 1:]),
        jnp.ones((BATCH, SEQ), jnp.float32),
    )
    carry = model.initial_carry(BATCH)
    rows = [("whole train step", median_ms(train_step, state, batch, carry,
                                           reps=reps))]  # fmt: skip

    # The output layer and loss over all B * T rows.
    keys = jax.random.split(jax.random.key(1), 4)
    features = jax.random.normal(keys[0], (BATCH * SEQ, WIDTH))
    output = state.params["output"]
    targets = batch.targets.reshape(-1)
    weights = batch.weights.reshape(-1)

    def output_loss(features, kernel, bias):
        return linear_cross_entropy(features, kernel, bias, targets, weights)

    output_grad = jax.jit(jax.grad(output_loss, argnums=(0, 1, 2)))
    rows.append((
        "output layer + loss, forward and backward",
        median_ms(output_grad, features, output["kernel"], output["bias"],
                  reps=reps),
    ))  # fmt: skip

    # One LSTM layer's parts, with the first layer's shapes.
    cell = state.params["cells_0"]
    inputs = jax.random.normal(keys[1], (SEQ, BATCH, WIDTH))
    zeros = jnp.zeros((BATCH, WIDTH))
    read_out = jax.random.normal(keys[2], (SEQ, BATCH, WIDTH))

    def project(x, kernel, bias):
        return x @ kernel + bias

    def projection_loss(x, kernel, bias):
        return jnp.sum(project(x, kernel, bias)[..., :WIDTH] * read_out)

    def recurrence(projected, kernel):
        return lstm_recurrence(projected, kernel, zeros, zeros)[0]

    def recurrence_loss(projected, kernel):
        return jnp.sum(recurrence(projected, kernel) * read_out)

    projected = project(inputs, cell["input_kernel"], cell["bias"])
    kernel = cell["recurrent_kernel"]
    layer_rows = [
        ("recurrence, forward", jax.jit(recurrence), (projected, kernel)),
        (
            "recurrence, forward and backward",
            jax.jit(jax.grad(recurrence_loss, argnums=(0, 1))),
            (projected, kernel),
        ),
        (
            "input projection, forward and backward",
            jax.jit(jax.grad(projection_loss, argnums=(0, 1, 2))),
            (inputs, cell["input_kernel"], cell["bias"]),
        ),
    ]
    # With fewer words than tokens in a window, the first layer's
    # projection is a lookup in a projected vocabulary (see
    # LanguageModel.hidden_states): time that instead of the product.
    lookup = vocab < BATCH * SEQ
    if lookup:
        embedding = state.params["embed"]["embedding"]
        ids = batch.inputs.T

        # The ids and read-out are arguments, not constants, so that XLA
        # does not fold the whole gradient at compile time.
        def lookup_loss(embedding, kernel, bias, ids, read_out):
            table = project(embedding, kernel, bias)
            rows = jnp.take(table, ids, axis=0)[..., :WIDTH]
            return jnp.sum(rows * read_out)

        fn = jax.jit(jax.grad(lookup_loss, argnums=(0, 1, 2)))
        args = (embedding, cell["input_kernel"], cell["bias"], ids, read_out)
        ms = median_ms(fn, *args, reps=reps)
        rows.append(("first layer's projection by lookup, forward and "
                     "backward", ms))  # fmt: skip
    for name, fn, args in layer_rows:
        ms = median_ms(fn, *args, reps=reps)
        count = layers - 1 if lookup and "projection" in name else layers
        label = f"{name} (x {count} layers)" if layers > 1 else name
        rows.append((label, ms * count))

    # Clipping and Adam on gradients shaped like the parameters.
    grads = jax.tree.map(jnp.ones_like, state.params)

    def update(state, grads):
        return state.apply_gradients(grads=grads)

    rows.append((
        "clip + Adam update",
        median_ms(jax.jit(update), state, grads, reps=reps),
    ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="word")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    rows = profile(args.preset, args.reps)
    step = rows[0][1]
    print(f"preset {args.preset}, batch {BATCH} x {SEQ}, median of "
          f"{args.reps} calls per part")  # fmt: skip
    print("| part | ms | share of the step |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {100 * ms / step:.0f}% |")
    parts = sum(ms for name, ms in rows[1:] if "forward and" in name)
    parts += rows[-1][1]
    print(f"\nparts with a backward pass, plus the update: {parts:.1f} ms "
          f"of a {step:.1f} ms step")  # fmt: skip


if __name__ == "__main__":
    main()

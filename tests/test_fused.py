"""The fast path against the straightforward one.

Each hand-written gradient in `jaxlstm.fused` is checked against autodiff
through plain JAX code that computes the same function, and the fused model
against the reference model (`fused=False`) over several training steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlstm import fused
from jaxlstm.config import TrainConfig
from jaxlstm.data import Batch
from jaxlstm.model import LanguageModel, LSTMState, init_params
from jaxlstm.sampling import generate_ids
from jaxlstm.train_step import create_train_state, eval_step, train_step

# float32 round-off: the two paths add the same terms in different orders.
RTOL, ATOL = 2e-5, 2e-6


def assert_trees_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def reference_recurrence(projected, kernel, c0, h0):
    """The LSTM recurrence as plain JAX, differentiated by autodiff."""

    def step(state, p):
        c, h = state
        i, f, g, o = jnp.split(p + h @ kernel, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h

    (c, h), hs = jax.lax.scan(step, (c0, h0), projected)
    return hs, c, h


def random_arrays(seed, *shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]


def grads_of_outputs(fn, args, seed):
    """Return the value and the gradient of a random linear read-out."""
    outputs = fn(*args)
    weights = random_arrays(seed, *[o.shape for o in outputs])

    def read_out(*a):
        return sum(jnp.sum(o * w) for o, w in zip(fn(*a), weights, strict=True))

    argnums = tuple(range(len(args)))
    return outputs, jax.grad(read_out, argnums=argnums)(*args)


def test_lstm_recurrence_matches_autodiff():
    time, batch, hidden = 7, 3, 5
    projected, kernel, c0, h0 = random_arrays(
        0,
        (time, batch, 4 * hidden),
        (hidden, 4 * hidden),
        (batch, hidden),
        (batch, hidden),
    )
    args = (projected, 0.5 * kernel, c0, h0)
    got = grads_of_outputs(fused.lstm_recurrence, args, seed=1)
    want = grads_of_outputs(reference_recurrence, args, seed=1)
    assert_trees_close(got, want)


def reference_cross_entropy(features, kernel, bias, targets, weights):
    logits = features @ kernel + bias
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights)


@pytest.mark.parametrize("rows", [1, 8, 21])
def test_linear_cross_entropy_matches_autodiff(monkeypatch, rows):
    # Blocks of 8 rows: 21 rows need three blocks, the last one padded.
    monkeypatch.setattr(fused, "CHUNK_ROWS", 8)
    hidden, vocab = 6, 11
    features, kernel, bias = random_arrays(
        4, (rows, hidden), (hidden, vocab), (vocab,)
    )
    rng = np.random.default_rng(5)
    targets = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=rows) > 0.3, jnp.float32)
    args = (features, kernel, bias)

    def loss(fn):
        def of(features, kernel, bias, weights):
            return fn(features, kernel, bias, targets, weights)

        return jax.value_and_grad(of, argnums=(0, 1, 2, 3))(*args, weights)

    assert_trees_close(
        loss(fused.linear_cross_entropy), loss(reference_cross_entropy)
    )


def test_linear_cross_entropy_ignores_zero_weight_rows():
    features, kernel, bias = random_arrays(6, (5, 4), (4, 7), (7,))
    targets = jnp.arange(5, dtype=jnp.int32)
    weights = jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.0])
    changed = features.at[2].set(1e3).at[4].set(-1e3)
    a = fused.linear_cross_entropy(features, kernel, bias, targets, weights)
    b = fused.linear_cross_entropy(changed, kernel, bias, targets, weights)
    np.testing.assert_allclose(a, b, rtol=1e-6)


# Word-like (one layer, a larger vocabulary) and char-like (three layers).
SHAPES = [
    pytest.param(dict(vocab_size=300, embedding=16, hidden=12), id="one"),
    pytest.param(
        dict(vocab_size=30, embedding=8, hidden=12, layers=3), id="three"
    ),
]


def make_batches(vocab, count, batch=4, time=9):
    rng = np.random.default_rng(8)
    batches = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, (batch, time + 1)).astype(np.int32)
        weights = (rng.uniform(size=(batch, time)) > 0.1).astype(np.float32)
        batches.append(Batch(tokens[:, :-1], tokens[:, 1:], weights))
    return batches


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_model_trains_like_reference(shape):
    fast = LanguageModel(**shape)
    slow = fast.clone(fused=False)
    config = TrainConfig(lr=3e-3)
    runs = {}
    for name, model in (("fast", fast), ("slow", slow)):
        state = create_train_state(model, config, jax.random.key(0))
        carry = model.initial_carry(4)
        losses = []
        for batch in make_batches(shape["vocab_size"], 6):
            state, carry, metrics = train_step(state, batch, carry)
            losses.append(float(metrics["loss"]))
        runs[name] = (losses, state.params, carry)
    np.testing.assert_allclose(runs["fast"][0], runs["slow"][0], rtol=RTOL)
    # Adam divides by the root of its second moment, which magnifies
    # round-off in tiny gradients, so parameters get a looser bound.
    for g, w in zip(
        jax.tree.leaves(runs["fast"][1:]),
        jax.tree.leaves(runs["slow"][1:]),
        strict=True,
    ):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_model_evaluates_like_reference(shape):
    fast = LanguageModel(**shape)
    slow = fast.clone(fused=False)
    state = create_train_state(fast, TrainConfig(), jax.random.key(1))
    batch = make_batches(shape["vocab_size"], 1)[0]
    carry = tuple(
        LSTMState(s.c + 0.5, s.h - 0.25) for s in fast.initial_carry(4)
    )
    got = eval_step(state, batch, carry)
    want = eval_step(state.replace(apply_fn=slow.apply), batch, carry)
    assert_trees_close(got, want)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_step_generates_like_reference(shape):
    fast = LanguageModel(**shape)
    slow = fast.clone(fused=False)
    params = init_params(fast, jax.random.key(2))
    primes = jnp.asarray([[3, 4, 5, 0], [6, 7, 0, 0]], jnp.int32)
    lengths = jnp.asarray([3, 2], jnp.int32)

    def generate(model):
        return generate_ids(
            model,
            params,
            primes,
            lengths,
            jax.random.key(0),
            jnp.float32(0),
            jnp.int32(0),
            num_steps=20,
            greedy=True,
        )

    np.testing.assert_array_equal(generate(fast), generate(slow))

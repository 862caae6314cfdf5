"""Tests of the LSTM cell and the language model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlstm.config import PRESETS
from jaxlstm.model import (
    FORGET_BIAS,
    LanguageModel,
    LSTMCell,
    LSTMState,
    build_model,
    init_params,
)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm_step(params, c, h, x):
    """The LSTM equations written out gate by gate, in float64."""
    wx = np.asarray(params["input_kernel"], np.float64)
    wh = np.asarray(params["recurrent_kernel"], np.float64)
    b = np.asarray(params["bias"], np.float64)
    n = wh.shape[0]
    gate = {}
    for k, name in enumerate("ifgo"):
        cols = slice(k * n, (k + 1) * n)
        gate[name] = x @ wx[:, cols] + h @ wh[:, cols] + b[cols]
    i = _sigmoid(gate["i"])
    f = _sigmoid(gate["f"])
    g = np.tanh(gate["g"])
    o = _sigmoid(gate["o"])
    c_new = f * c + i * g
    return c_new, o * np.tanh(c_new)


@pytest.fixture(scope="module")
def small_model():
    model = LanguageModel(vocab_size=23, embedding=12, hidden=16, layers=2)
    params = init_params(model, jax.random.key(3))
    return model, params


def random_tokens(seed, batch, time, vocab):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, vocab, (batch, time)), jnp.int32)


@pytest.mark.parametrize(
    ("batch", "time", "layers"), [(1, 1, 1), (3, 7, 1), (4, 5, 3), (2, 9, 2)]
)
def test_model_output_shapes(batch, time, layers):
    model = LanguageModel(vocab_size=31, embedding=8, hidden=10, layers=layers)
    params = init_params(model, jax.random.key(0))
    tokens = random_tokens(0, batch, time, 31)
    logits, carry = model.apply(
        {"params": params}, tokens, model.initial_carry(batch)
    )
    assert logits.shape == (batch, time, 31)
    assert len(carry) == layers
    for state in carry:
        assert state.c.shape == (batch, 10)
        assert state.h.shape == (batch, 10)


def test_initial_carry_is_zero():
    model = LanguageModel(vocab_size=5, hidden=6, layers=2)
    carry = model.initial_carry(3)
    assert len(carry) == 2
    for state in carry:
        assert not np.any(np.asarray(state.c))
        assert not np.any(np.asarray(state.h))


def test_cell_matches_numpy_equations():
    cell = LSTMCell(input_size=5, hidden=4)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    c = rng.normal(size=(3, 4)).astype(np.float32)
    h = rng.normal(size=(3, 4)).astype(np.float32)
    variables = cell.init(jax.random.key(0), LSTMState(c, h), x)
    # Random biases, so every gate's bias slice is exercised.
    params = dict(variables["params"])
    params["bias"] = jnp.asarray(rng.normal(size=16), jnp.float32)
    state, out = cell.apply({"params": params}, LSTMState(c, h), x)
    want_c, want_h = numpy_lstm_step(params, c, h, x)
    np.testing.assert_allclose(state.c, want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.h, want_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, state.h)


def test_forget_bias_starts_at_one():
    model = LanguageModel(vocab_size=7, embedding=4, hidden=5, layers=3)
    params = init_params(model, jax.random.key(0))
    for layer in range(3):
        bias = np.asarray(params[f"cells_{layer}"]["bias"])
        np.testing.assert_array_equal(bias[5:10], FORGET_BIAS)
        np.testing.assert_array_equal(bias[:5], 0.0)
        np.testing.assert_array_equal(bias[10:], 0.0)


def test_scan_matches_python_loop(small_model):
    model, params = small_model
    tokens = random_tokens(1, 3, 8, model.vocab_size)
    rng = np.random.default_rng(2)
    carry = tuple(
        LSTMState(
            jnp.asarray(rng.normal(size=(3, 16)), jnp.float32),
            jnp.asarray(rng.normal(size=(3, 16)), jnp.float32),
        )
        for _ in range(model.layers)
    )
    logits, new_carry = model.apply({"params": params}, tokens, carry)

    # Reference: one cell call per layer per time step, in a Python loop.
    embedding = params["embed"]["embedding"]
    states = list(carry)
    ref_logits = []
    for t in range(tokens.shape[1]):
        x = embedding[tokens[:, t]]
        for layer in range(model.layers):
            cell = LSTMCell(x.shape[-1], model.hidden)
            cell_params = {"params": params[f"cells_{layer}"]}
            states[layer], x = cell.apply(cell_params, states[layer], x)
        out = params["output"]
        ref_logits.append(x @ out["kernel"] + out["bias"])
    ref_logits = jnp.stack(ref_logits, axis=1)

    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(new_carry, states, strict=True):
        np.testing.assert_allclose(got.c, want.c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.h, want.h, rtol=1e-5, atol=1e-5)


def test_window_split_matches_whole(small_model):
    # Two windows with the carry passed on equal one long window.
    model, params = small_model
    tokens = random_tokens(4, 2, 10, model.vocab_size)
    carry = model.initial_carry(2)
    whole, whole_carry = model.apply({"params": params}, tokens, carry)
    first, mid = model.apply({"params": params}, tokens[:, :6], carry)
    second, end = model.apply({"params": params}, tokens[:, 6:], mid)
    halves = jnp.concatenate([first, second], axis=1)
    np.testing.assert_allclose(halves, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(end[-1].h, whole_carry[-1].h, atol=1e-6)


def test_output_is_causal(small_model):
    model, params = small_model
    tokens = np.asarray(random_tokens(5, 4, 9, model.vocab_size))
    carry = model.initial_carry(4)
    base, _ = model.apply({"params": params}, jnp.asarray(tokens), carry)
    t, row = 5, 2
    changed = tokens.copy()
    changed[row, t] = (changed[row, t] + 1) % model.vocab_size
    other, _ = model.apply({"params": params}, jnp.asarray(changed), carry)
    base, other = np.asarray(base), np.asarray(other)
    np.testing.assert_array_equal(other[row, :t], base[row, :t])
    assert not np.allclose(other[row, t], base[row, t])
    for r in range(4):
        if r != row:
            np.testing.assert_array_equal(other[r], base[r])


def test_layers_have_distinct_weights():
    model = build_model(PRESETS["char"].model, vocab_size=40)
    params = init_params(model, jax.random.key(0))
    names = [f"cells_{i}" for i in range(3)]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for leaf in ("input_kernel", "recurrent_kernel"):
                assert not np.array_equal(params[a][leaf], params[b][leaf])


def count_params(params):
    return sum(x.size for x in jax.tree.leaves(params))


def test_word_preset_parameter_count():
    # embedding 8000 * 128 + LSTM (128 + 128) * 512 + 512
    # + output 128 * 8000 + 8000 = 1,024,000 + 131,584 + 1,032,000
    model = build_model(PRESETS["word"].model, vocab_size=8000)
    params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    assert count_params(params) == 2_187_584


def test_char_preset_parameter_count():
    # embedding 40 * 128 + 3 * ((128 + 128) * 512 + 512) + 128 * 40 + 40
    # = 5,120 + 394,752 + 5,160
    model = build_model(PRESETS["char"].model, vocab_size=40)
    params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    assert count_params(params) == 405_032

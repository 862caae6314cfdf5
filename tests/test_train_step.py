"""Tests of the optimiser, the loss and the jitted steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlstm.config import TrainConfig
from jaxlstm.data import Batch
from jaxlstm.model import LanguageModel, sequence_loss
from jaxlstm.train_step import (
    create_train_state,
    eval_step,
    make_optimizer,
    train_step,
)

VOCAB = 29
BATCH, TIME = 4, 6


def make_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (BATCH, TIME + 1)).astype(np.int32)
    return Batch(
        tokens[:, :-1], tokens[:, 1:], np.ones((BATCH, TIME), np.float32)
    )


@pytest.fixture(scope="module")
def model():
    return LanguageModel(vocab_size=VOCAB, embedding=8, hidden=12, layers=2)


def fresh_state(model, seed=0):
    return create_train_state(model, TrainConfig(), jax.random.key(seed))


def run_steps(model, num_steps):
    state = fresh_state(model)
    carry = model.initial_carry(BATCH)
    losses = []
    for step in range(num_steps):
        state, carry, metrics = train_step(state, make_batch(step), carry)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_sequence_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3)).astype(np.int32)
    weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    total, count = sequence_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
    )
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(total, -(picked * weights).sum(), rtol=1e-5)
    assert float(count) == 4.0


def test_every_parameter_changes(model):
    state = fresh_state(model)
    before = jax.device_get(state.params)
    state, _, _ = train_step(state, make_batch(0), model.initial_carry(BATCH))
    after = jax.device_get(state.params)
    flat_before = jax.tree_util.tree_leaves_with_path(before)
    flat_after = jax.tree.leaves(after)
    for (path, old), new in zip(flat_before, flat_after, strict=True):
        name = jax.tree_util.keystr(path)
        assert not np.array_equal(old, new), f"{name} did not change"


def test_step_counter_advances(model):
    state = fresh_state(model)
    state, _, _ = train_step(state, make_batch(0), model.initial_carry(BATCH))
    assert int(state.step) == 1


def test_same_seed_is_bitwise_identical(model):
    state_a, losses_a = run_steps(model, 4)
    state_b, losses_b = run_steps(model, 4)
    assert losses_a == losses_b
    leaves_a = jax.tree.leaves(jax.device_get(state_a.params))
    leaves_b = jax.tree.leaves(jax.device_get(state_b.params))
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(a, b)


def test_other_seed_differs(model):
    a = fresh_state(model, seed=0).params
    b = fresh_state(model, seed=1).params
    assert not np.array_equal(a["output"]["kernel"], b["output"]["kernel"])


def test_loss_decreases_on_repeated_batch(model):
    state = create_train_state(model, TrainConfig(lr=1e-2), jax.random.key(0))
    batch = make_batch(7)
    carry0 = model.initial_carry(BATCH)
    first = None
    for _ in range(30):
        state, _, metrics = train_step(state, batch, carry0)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first - 0.5


def test_returned_carry_is_forward_carry(model):
    state = fresh_state(model)
    batch = make_batch(1)
    carry = model.initial_carry(BATCH)
    _, want = model.apply({"params": state.params}, batch.inputs, carry)
    _, got, _ = train_step(state, batch, carry)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_eval_step_matches_train_loss(model):
    state = fresh_state(model)
    batch = make_batch(2)
    carry = model.initial_carry(BATCH)
    _, metrics = eval_step(state, batch, carry)
    _, _, train_metrics = train_step(state, batch, carry)
    mean = float(metrics["loss_sum"]) / float(metrics["count"])
    np.testing.assert_allclose(mean, train_metrics["loss"], rtol=1e-6)


def test_eval_step_ignores_padding(model):
    state = fresh_state(model)
    batch = make_batch(3)
    carry = model.initial_carry(BATCH)
    weights = np.ones((BATCH, TIME), np.float32)
    weights[:, -2:] = 0.0
    changed_targets = batch.targets.copy()
    changed_targets[:, -2:] = (changed_targets[:, -2:] + 1) % VOCAB
    _, plain = eval_step(state, batch._replace(weights=weights), carry)
    _, changed = eval_step(
        state, Batch(batch.inputs, changed_targets, weights), carry
    )
    assert float(plain["count"]) == BATCH * (TIME - 2)
    assert float(plain["loss_sum"]) == float(changed["loss_sum"])


def test_optimizer_clips_then_adam():
    # Adam's first step hardly depends on the gradient's scale, so compare
    # two steps whose gradients have very different norms: clipping changes
    # their relative weight in Adam's moments.
    grads = [
        {"w": jnp.array([30.0, -40.0])},  # norm 50
        {"w": jnp.array([0.3, 0.4])},  # norm 0.5, not clipped
    ]
    clip, lr = 1.0, 0.1
    tx = make_optimizer(lr, clip)
    reference = optax.adam(lr)
    params = {"w": jnp.zeros(2)}
    state, ref_state = tx.init(params), reference.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        scale = min(1.0, clip / float(optax.tree.norm(g)))
        clipped = {"w": g["w"] * scale}
        ref_updates, ref_state = reference.update(clipped, ref_state, params)
        np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-6)
    unclipped_state = reference.init(params)
    for g in grads:
        plain, unclipped_state = reference.update(g, unclipped_state, params)
    assert not np.allclose(plain["w"], updates["w"], rtol=1e-3)


def test_grad_norm_is_before_clipping(model):
    state = create_train_state(model, TrainConfig(clip=1e-4), jax.random.key(0))
    _, _, metrics = train_step(state, make_batch(0), model.initial_carry(BATCH))
    assert float(metrics["grad_norm"]) > 1e-3


def test_train_step_compiles_once(model):
    state = fresh_state(model)
    carry = model.initial_carry(BATCH)
    state, carry, _ = train_step(state, make_batch(0), carry)
    compiled = train_step._cache_size()
    for step in range(1, 5):
        state, carry, _ = train_step(state, make_batch(step), carry)
    assert train_step._cache_size() == compiled

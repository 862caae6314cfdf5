"""Train state, loss, and the jitted training and evaluation steps."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxlstm.config import TrainConfig
from jaxlstm.data import Batch
from jaxlstm.model import Carry, LanguageModel, init_params

# params, opt_state and step, with the model's apply_fn and the optimiser as
# static fields, so `train_step` needs no other argument.
TrainState = train_state.TrainState


def make_optimizer(lr: float, clip: float) -> optax.GradientTransformation:
    """Return Adam at `lr` after clipping gradients to global norm `clip`.

    Clipping by the global norm of all gradients follows Pascanu et al. 2013,
    "On the difficulty of training recurrent neural networks".
    """
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr))


def create_train_state(
    model: LanguageModel, config: TrainConfig, key: jax.Array
) -> TrainState:
    """Initialise parameters from `key` and an optimiser state for them."""
    params = init_params(model, key)
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=make_optimizer(config.lr, config.clip),
    )
    # create() starts the step as a Python int, which jit sees as a weakly
    # typed scalar; after one step it is an int32 array. Start it as one so
    # the second step does not compile train_step again.
    return state.replace(step=jnp.zeros((), jnp.int32))


def sequence_loss(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum the weighted token cross-entropy of a window.

    Args:
      logits: `<float32>[batch, time, vocab]`.
      targets: `<int32>[batch, time]` next-token ids.
      weights: `<float32>[batch, time]`, 1 for scored tokens, 0 for padding.

    Returns:
      The summed loss in nats and the summed weights, both scalars.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights), jnp.sum(weights)


@jax.jit
def train_step(
    state: TrainState, batch: Batch, carry: Carry
) -> tuple[TrainState, Carry, dict[str, Any]]:
    """Take one optimiser step on a window, starting from `carry`.

    Gradients stop at the window's start: the incoming carry is an input, not
    a function of earlier parameters (truncated backpropagation through time).

    Returns:
      The new state, the carry at the window's end, and metrics: `loss`, the
      mean token cross-entropy in nats, and `grad_norm`, the global gradient
      norm before clipping.
    """

    def loss_fn(params):
        logits, new_carry = state.apply_fn(
            {"params": params}, batch.inputs, carry
        )
        total, count = sequence_loss(logits, batch.targets, batch.weights)
        return total / count, new_carry

    (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    state = state.apply_gradients(grads=grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state, new_carry, metrics


@jax.jit
def eval_step(
    state: TrainState, batch: Batch, carry: Carry
) -> tuple[Carry, dict[str, Any]]:
    """Score a window without updating parameters.

    Returns:
      The carry at the window's end and metrics `loss_sum` (nats) and
      `count` (scored tokens), to be summed over windows.
    """
    logits, new_carry = state.apply_fn(
        {"params": state.params}, batch.inputs, carry
    )
    total, count = sequence_loss(logits, batch.targets, batch.weights)
    return new_carry, {"loss_sum": total, "count": count}

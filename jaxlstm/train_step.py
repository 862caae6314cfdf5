"""Train state, loss, and the compiled training and evaluation steps.

`train_step` and `eval_step` run on one device under `jax.jit`; `Placement`
runs the same steps data-parallel over several devices under `jax.pmap`.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils

from jaxlstm.config import TrainConfig
from jaxlstm.data import Batch
from jaxlstm.errors import InputError
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
    # create() starts the step as a Python int, which jit treats as a weakly
    # typed scalar; after one step it is an int32 array. Start it as one so
    # the second step does not compile train_step again.
    return state.replace(step=jnp.zeros((), jnp.int32))


def _train_step(
    state: TrainState,
    batch: Batch,
    carry: Carry,
    axis_name: str | None = None,
) -> tuple[TrainState, Carry, dict[str, Any]]:
    def loss_fn(params):
        (total, count), new_carry = state.apply_fn(
            {"params": params}, *batch, carry, method="loss"
        )
        return total / count, new_carry

    (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    if axis_name is not None:
        # Every device has the same number of rows and tokens, so the mean
        # of the per-device means is the mean over the whole batch.
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
    state = state.apply_gradients(grads=grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state, new_carry, metrics


def _eval_step(
    state: TrainState,
    batch: Batch,
    carry: Carry,
    axis_name: str | None = None,
) -> tuple[Carry, dict[str, Any]]:
    (total, count), new_carry = state.apply_fn(
        {"params": state.params}, *batch, carry, method="loss"
    )
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
        count = jax.lax.psum(count, axis_name)
    return new_carry, {"loss_sum": total, "count": count}


@jax.jit
def train_step(
    state: TrainState, batch: Batch, carry: Carry
) -> tuple[TrainState, Carry, dict[str, Any]]:
    """Take one optimiser step on a window, starting from `carry`.

    Gradients stop at the window's start: the incoming carry is an input, not
    a function of earlier parameters (truncated backpropagation through time).

    Args:
      state: the train state.
      batch: `<int32>[batch, seq]` inputs and targets, `<float32>` weights.
      carry: the LSTM state of every layer for the batch rows.

    Returns:
      The new state, the carry at the window's end, and metrics: `loss`, the
      mean token cross-entropy in nats, and `grad_norm`, the global gradient
      norm before clipping.
    """
    return _train_step(state, batch, carry)


@jax.jit
def eval_step(
    state: TrainState, batch: Batch, carry: Carry
) -> tuple[Carry, dict[str, Any]]:
    """Score a window without updating parameters.

    Returns:
      The carry at the window's end and metrics `loss_sum` (nats) and
      `count` (scored tokens), to be summed over windows.
    """
    return _eval_step(state, batch, carry)


def nearest_divisible(batch_size: int, count: int) -> list[int]:
    """Return the multiples of `count` just below and above `batch_size`."""
    below = batch_size // count * count
    sizes = [below, below + count] if below else [count]
    return sizes


def fit_batch_size(batch_size: int, count: int) -> int:
    """Return `batch_size` rounded to the nearest multiple of `count`.

    Ties round down, and the result is at least `count`.
    """
    sizes = nearest_divisible(batch_size, count)
    if batch_size % count == 0:
        return batch_size
    return min(sizes, key=lambda s: (abs(s - batch_size), s))


def _blocking(step):
    @functools.wraps(step)
    def run(*args):
        return jax.block_until_ready(step(*args))

    return run


class Placement:
    """The devices of a run's arrays and the compiled steps that use them.

    One device: `train_step` and `eval_step` under `jax.jit`, and the
    placement functions return their input. Several devices: the same steps
    under `jax.pmap`, with parameters and optimiser state replicated on every
    device and the batch rows split evenly, device d holding rows
    d * rows_per_device .. (d + 1) * rows_per_device - 1 and the carried
    state of exactly those rows. Gradients and the loss are averaged with
    `jax.lax.pmean`; evaluation sums are added with `jax.lax.psum`.

    Under JAX's multi-process runtime, process p feeds its local devices
    rows p * rows_per_process .. (p + 1) * rows_per_process - 1, and the
    collectives span the devices of every process.
    """

    AXIS = "devices"

    def __init__(self, devices: Sequence[jax.Device], batch_size: int):
        self.devices = list(devices)
        self.processes = jax.process_count()
        self.process = jax.process_index()
        count = len(self.devices) * self.processes
        if batch_size % count:
            sizes = " or ".join(
                str(s) for s in nearest_divisible(batch_size, count)
            )
            where = (
                f"{count} devices ({self.processes} processes x "
                f"{len(self.devices)})"
                if self.processes > 1
                else f"{count} devices"
            )
            raise InputError(
                f"--batch-size {batch_size} does not divide evenly across "
                f"{where}; pass --batch-size {sizes} (multiples of "
                f"{count}), or fewer --devices"
            )
        self.rows = batch_size // self.processes  # rows this process feeds
        self.parallel = count > 1
        if not self.parallel:
            self.train_step, self.eval_step = train_step, eval_step
            return
        mesh = jax.sharding.Mesh(np.array(self.devices), (self.AXIS,))
        self._sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(self.AXIS)
        )
        # Under several processes, pmap must span the devices of all of
        # them (its default), so that pmean and psum reach every process.
        pmap_devices = self.devices if self.processes == 1 else None
        self.train_step = jax.pmap(
            functools.partial(_train_step, axis_name=self.AXIS),
            axis_name=self.AXIS,
            devices=pmap_devices,
        )
        self.eval_step = jax.pmap(
            functools.partial(_eval_step, axis_name=self.AXIS),
            axis_name=self.AXIS,
            devices=pmap_devices,
        )
        if self.processes > 1:
            # NOTE: with Gloo collectives on CPU, steps dispatched ahead
            # of each other hung two processes at random. Waiting for each
            # step avoids that, at some cost in speed. Untested on TPU or GPU.
            self.train_step = _blocking(self.train_step)
            self.eval_step = _blocking(self.eval_step)

    def _put(self, x: Any) -> jax.Array:
        return jax.device_put(x, self._sharding)

    def replicate(self, tree: Any) -> Any:
        """Copy every leaf to every device, under a new leading axis."""
        if not self.parallel:
            return tree
        count = len(self.devices)
        return jax.tree.map(
            lambda x: self._put(
                np.broadcast_to(np.asarray(x), (count, *np.shape(x)))
            ),
            tree,
        )

    def unreplicate(self, tree: Any) -> Any:
        """Return one copy of a replicated tree."""
        if not self.parallel:
            return tree
        return jax.tree.map(lambda x: np.asarray(x[0]), tree)

    def shard(self, tree: Any) -> Any:
        """Split the leading batch axis of every leaf across the devices.

        Each leaf contains all rows of the batch; this process keeps its
        own.
        """
        if not self.parallel:
            return tree
        count = len(self.devices)
        lo = self.process * self.rows

        def put(x):
            rows = np.asarray(x)[lo : lo + self.rows]
            return self._put(np.reshape(rows, (count, -1, *rows.shape[1:])))

        return jax.tree.map(put, tree)

    def unshard(self, tree: Any) -> Any:
        """Join the device axis back into the batch axis, rows in order.

        Under several processes, the rows of every process are gathered, so
        each returns all rows of the batch.
        """
        if not self.parallel:
            return tree

        def join(x):
            local = np.asarray(x)
            local = np.reshape(local, (-1, *local.shape[2:]))
            if self.processes == 1:
                return local
            gathered = multihost_utils.process_allgather(local)
            return np.reshape(gathered, (-1, *local.shape[1:]))

        return jax.tree.map(join, tree)

"""Hand-written gradients for the two costliest parts of a training step.

Autodiff through `jax.lax.scan` and through a dense softmax is correct but
slow on a CPU. These functions compute the same values with `jax.custom_vjp`
rules that do less work; `tests/test_fused.py` checks them against autodiff
within float32 round-off.

`lstm_recurrence` runs the recurrent half of an LSTM layer over a window.
Its backward pass is one reverse scan that multiplies by the recurrent
kernel once per step. The kernel's gradient is then one matrix product over
all steps, instead of one small product per step inside the loop.

`linear_cross_entropy` applies the output layer and the softmax
cross-entropy a block of rows at a time, and works out the gradient in the
same pass. The `<float32>[rows, vocab]` logits are never held whole, which
for the word model (5,000 rows by 8,000 words) saves a 160 MB array and the
memory traffic of writing and reading it several times.
"""

import jax
import jax.numpy as jnp

# The maximum number of rows whose logits `linear_cross_entropy` works out
# at once. For the word model, blocks of 256 to 1,024 rows (8 to 32 MB of
# logits) trained at 15-17.6k tokens/s, within the noise of each other, and
# 2,500 rows ran slower. `python benchmarks/speed.py --preset word
# --chunk-rows N` measures a value.
CHUNK_ROWS = 1024


def _gate_affine(hidden: int) -> tuple[jax.Array, jax.Array]:
    """Return the scale and shift that turn one tanh into all four gates.

    sigmoid(z) = 0.5 * tanh(0.5 * z) + 0.5, so with a = scale * tanh(scale *
    z) + shift, a is sigmoid(z) on the i, f and o gates and tanh(z) on g.
    That is one elementwise pass over `[batch, 4 * hidden]` instead of
    four over its quarters.
    """
    halves, ones = jnp.full(hidden, 0.5), jnp.ones(hidden)
    zeros = jnp.zeros(hidden)
    scale = jnp.concatenate([halves, halves, ones, halves])
    shift = jnp.concatenate([halves, halves, zeros, halves])
    return scale, shift


def lstm_update(
    z: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Apply the gates to pre-activations `z` `<float32>[batch, 4H]`.

    Returns:
      The activated gates `[batch, 4H]`, the new cell state, its tanh and the
      new hidden state, each `[batch, H]`.
    """
    scale, shift = _gate_affine(c.shape[-1])
    gates = jnp.tanh(z * scale) * scale + shift
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = f * c + i * g
    tanh_c = jnp.tanh(c)
    return gates, c, tanh_c, o * tanh_c


def _recurrence_forward(projected, kernel, c0, h0):
    def step(state, p):
        c, h = state
        gates, c, tanh_c, h = lstm_update(p + h @ kernel, c)
        return (c, h), (gates, c, tanh_c, h)

    (c, h), saved = jax.lax.scan(step, (c0, h0), projected)
    return (c, h), saved


@jax.custom_vjp
def lstm_recurrence(
    projected: jax.Array, kernel: jax.Array, c0: jax.Array, h0: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run the LSTM recurrence over a window, time-major.

    With z_t = projected_t + h_{t-1} @ kernel split into the i, f, g, o
    gates, each step computes c_t = f * c_{t-1} + i * g and
    h_t = o * tanh(c_t), the equations in `jaxlstm.model`.

    Args:
      projected: `<float32>[time, batch, 4 * hidden]` input projections,
        bias included.
      kernel: `<float32>[hidden, 4 * hidden]` recurrent kernel.
      c0: `<float32>[batch, hidden]` cell state before the first step.
      h0: `<float32>[batch, hidden]` hidden state before the first step.

    Returns:
      The hidden states `<float32>[time, batch, hidden]`, and the cell and
      hidden state after the last step.
    """
    (c, h), (_, _, _, hs) = _recurrence_forward(projected, kernel, c0, h0)
    return hs, c, h


def _recurrence_fwd(projected, kernel, c0, h0):
    (c, h), (gates, cs, tanh_cs, hs) = _recurrence_forward(
        projected, kernel, c0, h0
    )
    # The state before each step: the initial state, then all but the last.
    c_prev = jnp.concatenate([c0[None], cs[:-1]])
    h_prev = jnp.concatenate([h0[None], hs[:-1]])
    return (hs, c, h), (kernel, gates, c_prev, tanh_cs, h_prev)


def _recurrence_bwd(saved, cotangents):
    kernel, gates, c_prev, tanh_cs, h_prev = saved
    d_hs, d_c_last, d_h_last = cotangents
    hidden = kernel.shape[0]
    kernel_t = kernel.T
    scale, shift = _gate_affine(hidden)

    # Whatever does not depend on the gradients flowing back in time is
    # worked out for all steps at once, outside the loop. With dc and dh the
    # gradients of a step's c and h, the gradient of its pre-activation
    # gates z is [dc * a_i, dc * a_f, dc * a_g, dh * b], and dh adds
    # dh * o_slope to dc. `benchmarks/profile_step.py --preset char` timed
    # the three layers' recurrences at 83 ms against 95-101 ms without it.
    t = (gates - shift) / scale  # tanh(scale * z)
    slope = (scale * scale) * (1.0 - t * t)  # d gates / dz
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    slope_i, slope_f, slope_g, slope_o = jnp.split(slope, 4, axis=-1)
    a = (g * slope_i, c_prev * slope_f, i * slope_g)
    b = tanh_cs * slope_o
    o_slope = o * (1.0 - tanh_cs * tanh_cs)

    def step(state, inputs):
        dc_next, dh_next = state
        d_h, (a_i, a_f, a_g), b, o_slope, f = inputs
        dh = d_h + dh_next
        dc = dc_next + dh * o_slope
        dz = jnp.concatenate([dc * a_i, dc * a_f, dc * a_g, dh * b], -1)
        return (dc * f, dz @ kernel_t), dz

    (d_c0, d_h0), dz = jax.lax.scan(
        step, (d_c_last, d_h_last), (d_hs, a, b, o_slope, f), reverse=True
    )
    # One product over every step and row for the kernel's gradient.
    d_kernel = h_prev.reshape(-1, hidden).T @ dz.reshape(-1, 4 * hidden)
    return dz, d_kernel, d_c0, d_h0


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad)


def _chunked(features, targets, weights):
    """Split rows into equal blocks, padding with zero-weight rows."""
    rows = features.shape[0]
    count = -(-rows // CHUNK_ROWS)
    # Equal blocks of a multiple of 8 rows: 5,000 rows and CHUNK_ROWS 1,024
    # make 5 blocks of 1,000.
    chunk = -(-rows // (8 * count)) * 8
    padded = count * chunk
    features = _pad_rows(features, padded).reshape(count, chunk, -1)
    targets = _pad_rows(targets, padded).reshape(count, chunk)
    weights = _pad_rows(weights, padded).reshape(count, chunk)
    return features, targets, weights


def _block_loss(x, t, kernel, bias):
    """Return the softmax and the unweighted per-row losses of one block."""
    logits = x @ kernel + bias  # [chunk, V]
    top = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    losses = jnp.log(total[:, 0]) + top[:, 0] - target_logit
    return exp / total, losses


@jax.custom_vjp
def linear_cross_entropy(
    features: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
) -> jax.Array:
    """Sum the weighted softmax cross-entropy of `features @ kernel + bias`.

    Args:
      features: `<float32>[rows, hidden]` inputs of the output layer.
      kernel: `<float32>[hidden, vocab]` output kernel.
      bias: `<float32>[vocab]` output bias.
      targets: `<int32>[rows]` target ids.
      weights: `<float32>[rows]` weight of each row's loss.

    Returns:
      The scalar sum over rows of weight * cross-entropy, in nats.
    """
    blocks = _chunked(features, targets, weights)

    def add(total, block):
        x, t, w = block
        _, losses = _block_loss(x, t, kernel, bias)
        return total + jnp.sum(losses * w), None

    total, _ = jax.lax.scan(add, jnp.zeros((), features.dtype), blocks)
    return total


def _cross_entropy_fwd(features, kernel, bias, targets, weights):
    rows, vocab = features.shape[0], kernel.shape[1]
    blocks = _chunked(features, targets, weights)

    # Each block adds its share of the loss and of the kernel and bias
    # gradients, and yields the gradient of its own rows.
    def add(sums, block):
        x, t, w = block
        probs, losses = _block_loss(x, t, kernel, bias)
        d_logits = (probs - jax.nn.one_hot(t, vocab, dtype=probs.dtype)) * w[
            :, None
        ]
        total, d_kernel, d_bias = sums
        sums = (
            total + jnp.sum(losses * w),
            d_kernel + x.T @ d_logits,
            d_bias + jnp.sum(d_logits, axis=0),
        )
        return sums, (d_logits @ kernel.T, losses)

    zeros = (jnp.zeros((), features.dtype), jnp.zeros_like(kernel))
    (total, d_kernel, d_bias), (d_features, per_row) = jax.lax.scan(
        add, (*zeros, jnp.zeros_like(bias)), blocks
    )
    d_features = d_features.reshape(-1, features.shape[1])[:rows]
    per_row = per_row.reshape(-1)[:rows]
    return total, (d_features, d_kernel, d_bias, per_row)


def _cross_entropy_bwd(saved, d_total):
    d_features, d_kernel, d_bias, per_row = saved
    # Integer targets have no gradient: None stands for it.
    return (
        d_total * d_features,
        d_total * d_kernel,
        d_total * d_bias,
        None,
        d_total * per_row,
    )


linear_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)

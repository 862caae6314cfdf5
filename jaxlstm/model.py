"""The LSTM language model: embedding, stacked LSTM layers, output logits.

Each layer computes the standard LSTM equations (Hochreiter and Schmidhuber
1997, with the forget gate of Gers et al. 2000). With x the layer input and
h, c the previous hidden and cell state, all four gates read both x and h:

    i = sigmoid(x W_xi + h W_hi + b_i)     input gate
    f = sigmoid(x W_xf + h W_hf + b_f)     forget gate
    g = tanh(x W_xg + h W_hg + b_g)        input node
    o = sigmoid(x W_xo + h W_ho + b_o)     output gate
    c' = f * c + i * g
    h' = o * tanh(c')

The four gates share one input kernel `<float32>[input, 4 * hidden]` and one
recurrent kernel `<float32>[hidden, 4 * hidden]`, in the order i, f, g, o.

`LanguageModel` has two ways to compute the same thing. By default
(`fused=True`) it runs time-major and takes its gradients from the
hand-written rules in `jaxlstm.fused`; with `fused=False` it is the
straightforward model, Flax's `nn.scan` over `LSTMCell.recur` and autodiff
through everything, kept as the reference the fast path is tested against.
Both have the same parameters, so a checkpoint of one loads into the other.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlstm.config import ModelConfig
from jaxlstm.fused import (
    linear_cross_entropy,
    lstm_recurrence,
    lstm_update,
)

# Starting the forget gate open keeps gradients flowing early in training, as
# TensorFlow's BasicLSTMCell does with forget_bias=1.0 (Jozefowicz et al. 2015).
FORGET_BIAS = 1.0


class LSTMState(NamedTuple):
    """The state of one LSTM layer."""

    c: jax.Array  # <float32>[batch, hidden] cell state
    h: jax.Array  # <float32>[batch, hidden] hidden state


# One LSTMState per layer, bottom layer first.
Carry = tuple[LSTMState, ...]


def _gate_bias_init(hidden: int):
    def init(key, shape, dtype=jnp.float32):
        del key
        bias = jnp.zeros(shape, dtype)
        return bias.at[hidden : 2 * hidden].set(FORGET_BIAS)

    return init


class LSTMCell(nn.Module):
    """One LSTM layer's weights and its step function.

    `project` applies the input kernel and bias, which do not depend on the
    state, so a layer can run it on all time steps in one matrix product;
    `recur` then adds the recurrent term and updates the state one step.
    """

    input_size: int
    hidden: int

    def setup(self):
        features = 4 * self.hidden
        self.input_kernel = self.param(
            "input_kernel",
            nn.initializers.lecun_normal(),
            (self.input_size, features),
        )
        self.recurrent_kernel = self.param(
            "recurrent_kernel",
            nn.initializers.orthogonal(),
            (self.hidden, features),
        )
        self.bias = self.param(
            "bias", _gate_bias_init(self.hidden), (features,)
        )

    def project(self, inputs: jax.Array) -> jax.Array:
        """Map `<float32>[..., input]` to gate inputs `[..., 4 * hidden]`."""
        return inputs @ self.input_kernel + self.bias

    def recur(
        self, state: LSTMState, projected: jax.Array
    ) -> tuple[LSTMState, jax.Array]:
        """Advance one step from projected inputs `<float32>[batch, 4H]`.

        NOTE: only the reference model (`fused=False`) calls this. The
        fused model computes the same step in `jaxlstm.fused`, so a change
        here needs the same change there. `tests/test_fused.py` compares
        the two.

        Returns:
          The new state and the new hidden state `<float32>[batch, hidden]`.
        """
        z = projected + state.h @ self.recurrent_kernel  # [B, 4H]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = nn.sigmoid(f) * state.c + nn.sigmoid(i) * jnp.tanh(g)
        h = nn.sigmoid(o) * jnp.tanh(c)
        return LSTMState(c, h), h

    def __call__(
        self, state: LSTMState, inputs: jax.Array
    ) -> tuple[LSTMState, jax.Array]:
        """Advance one step from layer inputs `<float32>[batch, input]`."""
        return self.recur(state, self.project(inputs))

    def step(
        self, state: LSTMState, inputs: jax.Array
    ) -> tuple[LSTMState, jax.Array]:
        """Advance one step like `__call__`, with one matrix product.

        The input and recurrent kernels are stacked so that `[x, h]` meets
        both in one product instead of two, for the few rows of generation.
        """
        kernel = jnp.concatenate([self.input_kernel, self.recurrent_kernel])
        z = jnp.concatenate([inputs, state.h], axis=-1) @ kernel + self.bias
        _, c, _, h = lstm_update(z, state.c)
        return LSTMState(c, h), h

    def run(
        self, state: LSTMState, projected: jax.Array
    ) -> tuple[LSTMState, jax.Array]:
        """Run a window of time-major projected inputs `[time, batch, 4H]`.

        Returns:
          The state after the last step and the hidden states
          `<float32>[time, batch, hidden]`.
        """
        hs, c, h = lstm_recurrence(
            projected, self.recurrent_kernel, state.c, state.h
        )
        return LSTMState(c, h), hs


def _scan_body(cell: LSTMCell, state: LSTMState, projected: jax.Array):
    return cell.recur(state, projected)


# Time is axis 1 of `<float32>[batch, time, 4H]`; scanning axis 0 would run
# the recurrence over the batch rows instead.
_scan_time = nn.scan(
    _scan_body,
    variable_broadcast="params",
    split_rngs={"params": False},
    in_axes=1,
    out_axes=1,
)


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


class LanguageModel(nn.Module):
    """Embedding, `layers` LSTM layers with their own weights, dense logits."""

    vocab_size: int
    embedding: int = 128
    hidden: int = 128
    layers: int = 1
    # Hand-written gradients and a time-major layout (jaxlstm.fused); False
    # gives the straightforward reference model with the same parameters.
    fused: bool = True

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embedding)
        self.cells = [
            LSTMCell(self.embedding if i == 0 else self.hidden, self.hidden)
            for i in range(self.layers)
        ]
        self.output = nn.Dense(self.vocab_size)

    def __call__(
        self, tokens: jax.Array, carry: Carry
    ) -> tuple[jax.Array, Carry]:
        """Run the model over a window of tokens.

        Args:
          tokens: `<int32>[batch, time]` token ids.
          carry: the state of every layer at the start of the window.

        Returns:
          `<float32>[batch, time, vocab]` logits and the carry at the end.
        """
        if not self.fused:
            x = self.embed(tokens)  # [B, T, E]
            new_carry = []
            for cell, state in zip(self.cells, carry, strict=True):
                projected = cell.project(x)  # [B, T, 4H], all steps at once
                state, x = _scan_time(cell, state, projected)  # [B, T, H]
                new_carry.append(state)
            return self.output(x), tuple(new_carry)
        hs, new_carry = self.hidden_states(tokens, carry)
        return self.output(jnp.swapaxes(hs, 0, 1)), new_carry

    def step(self, tokens: jax.Array, carry: Carry) -> tuple[jax.Array, Carry]:
        """Advance every layer by one token.

        Args:
          tokens: `<int32>[batch]` token ids.
          carry: the state of every layer before the token.

        Returns:
          `<float32>[batch, vocab]` logits and the carry after the token.
        """
        if not self.fused:
            logits, carry = self(tokens[:, None], carry)
            return logits[:, 0], carry
        x = self.embed(tokens)  # [B, E]
        new_carry = []
        for cell, state in zip(self.cells, carry, strict=True):
            state, x = cell.step(state, x)
            new_carry.append(state)
        return self.output(x), tuple(new_carry)

    def hidden_states(
        self, tokens: jax.Array, carry: Carry
    ) -> tuple[jax.Array, Carry]:
        """Run the LSTM layers time-major over a window of tokens.

        Args:
          tokens: `<int32>[batch, time]` token ids.
          carry: the state of every layer at the start of the window.

        Returns:
          The top layer's `<float32>[time, batch, hidden]` hidden states and
          the carry at the end.
        """
        first = self.cells[0]
        if self.vocab_size < tokens.size:
            # Fewer words than tokens in the window: project every word's
            # embedding once and look the rows up. For characters this
            # replaces three products over all B * T tokens with three over
            # the vocabulary and a gather.
            table = first.project(self.embed.embedding)  # [V, 4H]
            projected = jnp.take(table, tokens.T, axis=0)  # [T, B, 4H]
        else:
            projected = first.project(self.embed(tokens.T))  # [T, B, 4H]
        new_carry, x = [], None
        for cell, state in zip(self.cells, carry, strict=True):
            # Layer by layer: each input projection is one matrix product
            # over every step of the window.
            if x is not None:
                projected = cell.project(x)  # [T, B, 4H]
            state, x = cell.run(state, projected)  # [T, B, H]
            new_carry.append(state)
        return x, tuple(new_carry)

    def loss(
        self,
        tokens: jax.Array,
        targets: jax.Array,
        weights: jax.Array,
        carry: Carry,
    ) -> tuple[tuple[jax.Array, jax.Array], Carry]:
        """Sum the weighted next-token cross-entropy of a window.

        Args:
          tokens: `<int32>[batch, time]` inputs.
          targets: `<int32>[batch, time]` next-token ids.
          weights: `<float32>[batch, time]`, 1 for scored tokens, 0 for
            padding.
          carry: the state of every layer at the start of the window.

        Returns:
          The summed loss in nats and the summed weights, and the carry at
          the end of the window.
        """
        if not self.fused:
            logits, new_carry = self(tokens, carry)
            return sequence_loss(logits, targets, weights), new_carry
        hs, new_carry = self.hidden_states(tokens, carry)
        output = self.output.variables["params"]
        total = linear_cross_entropy(
            hs.reshape(-1, self.hidden),
            output["kernel"],
            output["bias"],
            targets.T.reshape(-1),
            weights.T.reshape(-1),
        )
        return (total, jnp.sum(weights)), new_carry

    @nn.nowrap
    def initial_carry(self, batch_size: int) -> Carry:
        """Return the all-zero state of every layer for `batch_size` rows."""

        # A separate buffer for each array, because donating the carry to a
        # step would need them distinct. No step donates it yet.
        def zeros():
            return jnp.zeros((batch_size, self.hidden), jnp.float32)

        return tuple(LSTMState(zeros(), zeros()) for _ in range(self.layers))


def build_model(
    config: ModelConfig, vocab_size: int, fused: bool = True
) -> LanguageModel:
    """Create the model that `config` describes for a vocabulary size."""
    return LanguageModel(
        vocab_size=vocab_size,
        embedding=config.embedding,
        hidden=config.hidden,
        layers=config.layers,
        fused=fused,
    )


def init_params(model: LanguageModel, key: jax.Array) -> dict:
    """Initialise the parameters of `model` from `key`."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(key, tokens, model.initial_carry(1))["params"]

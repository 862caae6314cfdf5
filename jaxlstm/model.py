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
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlstm.config import ModelConfig

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


class LanguageModel(nn.Module):
    """Embedding, `layers` LSTM layers with their own weights, dense logits."""

    vocab_size: int
    embedding: int = 128
    hidden: int = 128
    layers: int = 1

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
        x = self.embed(tokens)  # [B, T, E]
        new_carry = []
        for cell, state in zip(self.cells, carry, strict=True):
            projected = cell.project(x)  # [B, T, 4H], all steps at once
            state, x = _scan_time(cell, state, projected)  # x: [B, T, H]
            new_carry.append(state)
        return self.output(x), tuple(new_carry)

    @nn.nowrap
    def initial_carry(self, batch_size: int) -> Carry:
        """Return the all-zero state of every layer for `batch_size` rows."""
        zeros = jnp.zeros((batch_size, self.hidden), jnp.float32)
        return tuple(LSTMState(zeros, zeros) for _ in range(self.layers))


def build_model(config: ModelConfig, vocab_size: int) -> LanguageModel:
    """Create the model that `config` describes for a vocabulary size."""
    return LanguageModel(
        vocab_size=vocab_size,
        embedding=config.embedding,
        hidden=config.hidden,
        layers=config.layers,
    )


def init_params(model: LanguageModel, key: jax.Array) -> dict:
    """Initialise the parameters of `model` from `key`."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(key, tokens, model.initial_carry(1))["params"]

"""Text generation: a jitted loop that feeds each chosen token back in.

The prime texts of a call are padded to one length and run through the model
one token at a time. Each row keeps its state only up to its own last prime
token. Then `num` tokens are chosen and fed back, all inside one compiled
`jax.lax.scan`. Prime lengths and token counts are rounded up to
powers of two (`bucket`), so a new prime length reuses the compiled loop.
"""

import functools
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlstm.data import Vocab, clean_text, normalize_newlines, tokenize
from jaxlstm.errors import InputError
from jaxlstm.model import Carry, LanguageModel

logger = logging.getLogger(__name__)

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Round `n` up to a power of two of at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


class SampleSettings(NamedTuple):
    """Settings of the choice of each token from the logits."""

    temperature: float = 0.0  # 0 picks the most likely token (greedy)
    top_k: int = 0  # sample among the k most likely tokens; 0 means all
    seed: int = 0


def most_likely_tokens(logits: jax.Array) -> jax.Array:
    """Return the argmax of each row of `<float32>[batch, vocab]` logits.

    The unknown token (id 0) is never chosen.

    Returns:
      `<int32>[batch]` token ids.
    """
    return jnp.argmax(logits[:, 1:], axis=-1).astype(jnp.int32) + 1


def choose_tokens(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array
) -> jax.Array:
    """Pick one token per row of `<float32>[batch, vocab]` logits.

    The unknown token (id 0) is never chosen. With `temperature` 0 the
    choice is the argmax; otherwise it is a sample from softmax(logits / T)
    restricted to the `top_k` largest logits when `top_k` > 0.

    Returns:
      `<int32>[batch]` token ids.
    """
    greedy = most_likely_tokens(logits)
    logits = logits.at[:, 0].set(-jnp.inf)
    vocab = logits.shape[-1]
    k = jnp.clip(top_k, 1, vocab - 1)
    kth = jnp.sort(logits, axis=-1)[:, vocab - k]  # [B]
    keep = (top_k <= 0) | (logits >= kth[:, None])
    scaled = jnp.where(keep, logits, -jnp.inf) / jnp.where(
        temperature > 0, temperature, 1.0
    )
    # Mask the unknown token again: an infinite temperature turns -inf
    # into NaN.
    scaled = (
        jnp.where(jnp.isnan(scaled), -jnp.inf, scaled).at[:, 0].set(-jnp.inf)
    )
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "greedy"))
def generate_ids(
    model: LanguageModel,
    params: dict,
    prime_ids: jax.Array,
    prime_lengths: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    num_steps: int,
    greedy: bool = False,
) -> jax.Array:
    """Continue each prime with `num_steps` tokens.

    Args:
      model: the language model (static: one compile per model).
      params: its parameters.
      prime_ids: `<int32>[batch, prime]` primes, padded after their ends.
      prime_lengths: `<int32>[batch]` number of real tokens per row, >= 1.
      key: PRNG key for sampling, unused when greedy.
      temperature: scalar, 0 for greedy.
      top_k: scalar int, 0 for no restriction.
      num_steps: tokens to generate (static).
      greedy: (static) always take the most likely token and ignore
        `temperature`, `top_k` and `key`. This skips the sort and the
        sampling that each step would otherwise compute.

    Returns:
      `<int32>[batch, num_steps]` generated token ids.
    """
    batch = prime_ids.shape[0]

    def step(carry: Carry, tokens: jax.Array):
        return model.apply({"params": params}, tokens, carry, method="step")

    def feed_prime(loop, t):
        carry, last_logits = loop
        logits, new_carry = step(carry, prime_ids[:, t])
        live = t < prime_lengths  # [B]
        carry = jax.tree.map(
            lambda new, old: jnp.where(live[:, None], new, old),
            new_carry,
            carry,
        )
        last = (t == prime_lengths - 1)[:, None]
        last_logits = jnp.where(last, logits, last_logits)
        return (carry, last_logits), None

    vocab = model.vocab_size
    start = (model.initial_carry(batch), jnp.zeros((batch, vocab)))
    steps = jnp.arange(prime_ids.shape[1])
    (carry, logits), _ = jax.lax.scan(feed_prime, start, steps)

    def feed_back(loop, step_key):
        carry, logits = loop
        if greedy:
            tokens = most_likely_tokens(logits)
        else:
            tokens = choose_tokens(logits, step_key, temperature, top_k)
        logits, carry = step(carry, tokens)
        return (carry, logits), tokens

    keys = jax.random.split(key, num_steps)
    _, tokens = jax.lax.scan(feed_back, (carry, logits), keys)
    return tokens.T  # [B, num_steps]


def encode_prime(text: str, vocab: Vocab, clean: str) -> tuple[str, np.ndarray]:
    """Clean and encode a prime text exactly like the training text.

    Unknown tokens map to id 0, with a warning that names them.

    Returns:
      The cleaned prime and its `<int32>[tokens]` ids.

    Raises:
      InputError: if the prime is empty or cleans to nothing.
    """
    cleaned = clean_text(normalize_newlines(text), clean)
    tokens = tokenize(cleaned, vocab.level)
    if not tokens:
        raise InputError(
            f"prime text {text!r} is empty after cleaning; pass a prime with "
            "at least one word or letter, such as --prime 'thou art more'"
        )
    unknown = vocab.unknown_tokens(tokens)
    if unknown:
        shown = ", ".join(repr(t[:30]) for t in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        logger.warning(
            "prime %r: %s%s not in the vocabulary, fed as the unknown token",
            text if len(text) <= 60 else text[:57] + "...",
            shown,
            more,
        )
    return cleaned, vocab.encode(tokens)


def check_settings(settings: SampleSettings) -> None:
    """Raise `InputError` for a negative or NaN temperature or top-k."""
    t = settings.temperature
    if not isinstance(t, int | float) or math.isnan(t) or t < 0:
        raise InputError(
            f"--temperature must be a number of 0 or more, got {t!r}; "
            "0 picks the most likely token"
        )
    if not np.isfinite(np.float32(t)):
        raise InputError(
            f"--temperature {t!r} is too large for float32; pass a value "
            "below 1e38 (values above about 100 already sample uniformly)"
        )
    if settings.top_k < 0:
        raise InputError(
            f"--top-k must be 0 or more, got {settings.top_k!r}; 0 keeps "
            "every token"
        )


def generate_text(
    model: LanguageModel,
    params: dict,
    vocab: Vocab,
    clean: str,
    primes: Sequence[str],
    num: int,
    settings: SampleSettings | None = None,
) -> list[str]:
    """Continue each prime text with `num` tokens, all primes in one batch.

    Returns:
      One string per prime: the cleaned prime followed by its continuation.
    """
    settings = settings or SampleSettings()
    check_settings(settings)
    if num < 0:
        raise InputError(f"--num must be 0 or more, got {num!r}")
    encoded = [encode_prime(p, vocab, clean) for p in primes]
    if num == 0:
        return [cleaned for cleaned, _ in encoded]
    lengths = np.array([len(ids) for _, ids in encoded], np.int32)
    prime_ids = np.zeros((len(encoded), bucket(int(lengths.max()))), np.int32)
    for row, (_, ids) in enumerate(encoded):
        prime_ids[row, : len(ids)] = ids
    tokens = generate_ids(
        model,
        params,
        jnp.asarray(prime_ids),
        jnp.asarray(lengths),
        jax.random.key(settings.seed),
        jnp.float32(settings.temperature),
        jnp.int32(settings.top_k),
        num_steps=bucket(num),
        greedy=settings.temperature == 0,
    )
    tokens = np.asarray(tokens)[:, :num]
    sep = " " if vocab.level == "word" else ""
    return [
        cleaned + sep + vocab.decode(row.tolist())
        for (cleaned, _), row in zip(encoded, tokens, strict=True)
    ]

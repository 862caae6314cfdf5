"""Tests of prime encoding and the jitted generation loop."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlstm.data import Vocab
from jaxlstm.errors import InputError
from jaxlstm.model import LanguageModel, init_params
from jaxlstm.sampling import (
    SampleSettings,
    bucket,
    choose_tokens,
    encode_prime,
    generate_ids,
    generate_text,
)

WORDS = Vocab(
    ("thou", "art", "more", "to", "be", "or", "not", "wherefore", "the"),
    "word",
)
CHARS = Vocab(tuple(" abcdefghijklmnopqrstuvwxyz'-"), "char")


@pytest.fixture(scope="module")
def word_model():
    model = LanguageModel(vocab_size=WORDS.size, embedding=8, hidden=8)
    return model, init_params(model, jax.random.key(1))


@pytest.fixture(scope="module")
def char_model():
    model = LanguageModel(
        vocab_size=CHARS.size, embedding=8, hidden=16, layers=3
    )
    return model, init_params(model, jax.random.key(2))


def reference_greedy(model, params, prime_ids, num):
    """Feed tokens one call at a time and take the argmax, never id 0."""
    apply = jax.jit(model.apply)  # one token per call, compiled once
    carry = model.initial_carry(1)
    for token in prime_ids:
        logits, carry = apply(
            {"params": params}, jnp.array([[token]], jnp.int32), carry
        )
    out = []
    for _ in range(num):
        scores = np.asarray(logits[0, -1]).copy()
        scores[0] = -np.inf
        token = int(np.argmax(scores))
        out.append(token)
        logits, carry = apply(
            {"params": params}, jnp.array([[token]], jnp.int32), carry
        )
    return out


def run_greedy(model, params, primes, num):
    lengths = np.array([len(p) for p in primes], np.int32)
    padded = np.zeros((len(primes), bucket(int(lengths.max()))), np.int32)
    for row, ids in enumerate(primes):
        padded[row, : len(ids)] = ids
    tokens = generate_ids(
        model,
        params,
        jnp.asarray(padded),
        jnp.asarray(lengths),
        jax.random.key(0),
        jnp.float32(0.0),
        jnp.int32(0),
        num_steps=num,
    )
    return np.asarray(tokens)


def test_bucket_rounds_up_to_power_of_two():
    assert bucket(1) == 16
    assert bucket(16) == 16
    assert bucket(17) == 32
    assert bucket(100) == 128


def test_jitted_loop_matches_step_reference(char_model):
    model, params = char_model
    primes = [
        CHARS.encode(list("thou art more")),
        CHARS.encode(list("to be")),
        CHARS.encode(list("w")),
    ]
    got = run_greedy(model, params, primes, 24)
    for row, prime in enumerate(primes):
        want = reference_greedy(model, params, prime.tolist(), 24)
        assert got[row].tolist() == want, f"row {row} differs"


def test_new_prime_length_reuses_compile(word_model):
    model, params = word_model
    generate_text(model, params, WORDS, "lesson", ["thou"], 5)
    compiled = generate_ids._cache_size()
    for prime in ["thou art", "to be or not to", "wherefore art thou more"]:
        generate_text(model, params, WORDS, "lesson", [prime], 7)
    assert generate_ids._cache_size() == compiled


def test_unknown_token_never_chosen():
    logits = jnp.asarray([[50.0, 1.0, 2.0, 0.5], [9.0, -1.0, -2.0, 3.0]])
    greedy = choose_tokens(logits, jax.random.key(0), 0.0, 0)
    assert greedy.tolist() == [2, 3]
    for seed in range(20):
        sampled = choose_tokens(logits, jax.random.key(seed), 5.0, 0)
        assert 0 not in sampled.tolist()


def test_unknown_never_generated(word_model):
    model, params = word_model
    # Make id 0 by far the most likely output, then generate.
    biased = jax.tree.map(lambda x: x, params)
    biased["output"]["bias"] = params["output"]["bias"].at[0].set(100.0)
    texts = generate_text(model, biased, WORDS, "lesson", ["thou art"], 12)
    assert "<unk>" not in texts[0]


def test_top_k_one_is_greedy():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    greedy = choose_tokens(logits, jax.random.key(0), 0.0, 0)
    for seed in range(5):
        top1 = choose_tokens(logits, jax.random.key(seed), 2.0, 1)
        assert top1.tolist() == greedy.tolist()


def test_top_k_limits_choices():
    logits = jnp.asarray([[0.0, 5.0, 4.9, 4.8, 0.1, 0.2]] * 64)
    sampled = choose_tokens(logits, jax.random.key(3), 100.0, 2)
    assert set(sampled.tolist()) <= {1, 2}


def test_sampling_same_seed_same_text(char_model):
    model, params = char_model
    settings = SampleSettings(temperature=1.0, top_k=5, seed=11)
    a = generate_text(model, params, CHARS, "lesson", ["to be"], 30, settings)
    b = generate_text(model, params, CHARS, "lesson", ["to be"], 30, settings)
    assert a == b


def test_greedy_text_starts_with_clean_prime(char_model):
    model, params = char_model
    (text,) = generate_text(
        model, params, CHARS, "lesson", ["Thou  ART,\nmore"], 9
    )
    assert text.startswith("thou art more")
    assert len(text) == len("thou art more") + 9


def test_word_text_has_requested_words(word_model):
    model, params = word_model
    (text,) = generate_text(model, params, WORDS, "lesson", ["to be"], 10)
    assert len(text.split()) == 2 + 10


def test_unknown_prime_word_warns(caplog):
    caplog.set_level(logging.WARNING, logger="jaxlstm.sampling")
    _, ids = encode_prime("thou art zounds", WORDS, "lesson")
    assert ids.tolist()[-1] == 0
    assert "'zounds'" in caplog.text


@pytest.mark.parametrize("prime", ["", "   ", "?!..,"])
def test_empty_prime_rejected(prime):
    with pytest.raises(InputError, match="empty after cleaning"):
        encode_prime(prime, WORDS, "lesson")


@pytest.mark.parametrize("temperature", [-0.5, float("nan"), float("inf")])
def test_bad_temperature_rejected(word_model, temperature):
    model, params = word_model
    with pytest.raises(InputError, match="temperature"):
        generate_text(
            model,
            params,
            WORDS,
            "lesson",
            ["thou"],
            3,
            SampleSettings(temperature=temperature),
        )


def test_negative_top_k_rejected(word_model):
    model, params = word_model
    with pytest.raises(InputError, match="top-k"):
        generate_text(
            model,
            params,
            WORDS,
            "lesson",
            ["thou"],
            3,
            SampleSettings(temperature=1.0, top_k=-1),
        )


def test_infinite_temperature_never_unknown():
    logits = jnp.asarray([[50.0, 1.0, 2.0, 0.5]] * 32)
    sampled = choose_tokens(logits, jax.random.key(0), jnp.inf, 0)
    assert 0 not in sampled.tolist()

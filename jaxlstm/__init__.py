"""LSTM language models in JAX and Flax: train on Shakespeare, generate text."""

__version__ = "0.1.0"

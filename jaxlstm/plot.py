"""The loss plot of a run: training and validation loss against step."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(records: Sequence[dict], path: str | Path, title: str) -> None:
    """Write a PNG of `train_loss` and `val_loss` from metric records.

    Args:
      records: dicts with `step` and `train_loss` or `val_loss` (nats).
      path: where to write the PNG.
      title: the plot title, usually the preset and corpus.
    """
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="0.6", linewidth=0.8, label="training")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="C3", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

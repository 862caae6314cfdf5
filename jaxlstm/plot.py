"""The loss plot of a run: training and validation loss against step.

The figure is built with matplotlib's object-oriented API, without pyplot,
so it needs no display and leaves the caller's backend alone: scripts save
it, and notebooks show it inline.
"""

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure


def loss_figure(records: Sequence[dict], title: str) -> Figure:
    """Draw `train_loss` and `val_loss` from metric records against step.

    Args:
      records: dicts with `step` and `train_loss` or `val_loss` (nats), as
        in a run's metrics.jsonl.
      title: the plot title, usually the preset and corpus.
    """
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
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
    return fig


def plot_losses(records: Sequence[dict], path: str | Path, title: str) -> None:
    """Write the PNG of `loss_figure` to `path`."""
    loss_figure(records, title).savefig(path)

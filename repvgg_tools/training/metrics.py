"""Per-epoch metrics: CSV, JSON and a PNG plot (matplotlib, Agg backend), each rewritten atomically."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.checkpoint import atomic_write

__all__ = ["write_metrics", "plot_metrics"]

log = logging.getLogger(__name__)


def write_metrics(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, plot: bool = True) -> None:
    """Write ``metrics.csv``, ``metrics.json`` and (if ``plot``) ``metrics.png`` for the epochs so far."""
    out_dir = Path(out_dir)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out_dir / "metrics.csv", write_csv, force=True)
    atomic_write(out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(list(rows), indent=1)),
                 force=True)
    if plot:
        try:
            plot_metrics(rows, out_dir / "metrics.png")
        except ImportError:
            log.warning("matplotlib is not installed; skipping metrics.png")


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Loss (train/val), accuracy (val, EMA) and learning rate against the epoch, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("train_loss", "val_loss"):
        pts = [(e, r[key]) for e, r in zip(epochs, rows, strict=True) if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=key)
    for key in ("val_top1", "val_top5", "ema_top1"):
        pts = [(e, r[key]) for e, r in zip(epochs, rows, strict=True) if r.get(key) is not None]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=key)
    axes[2].plot(epochs, [r["lr"] for r in rows], marker="o")
    for ax, title in zip(axes, ("loss", "accuracy (%)", "learning rate"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()

    def save(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=90)

    try:
        atomic_write(path, save, force=True)
    finally:
        plt.close(fig)

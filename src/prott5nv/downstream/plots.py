"""PNG plots of a run (matplotlib from the `plots` extra, imported lazily): the confusion matrix and the
learning curves. Without matplotlib nothing is drawn and the caller is told so."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(
    directory: Path, history: Sequence[dict[str, float]], metrics: dict[str, Any] | None, *,
    split: str = "test", score_name: str = "accuracy",
) -> list[str]:  # fmt: skip
    """Write ``learning_curves.png`` and, for classification `metrics` (of `split`),
    ``confusion_matrix.png`` into `directory`. Returns the file names written (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        log.info("matplotlib is not installed (pip install 'prott5nv[plots]'): plots skipped")
        return []
    written = []
    if history:
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        epochs = [h["epoch"] for h in history]
        a.plot(epochs, [h["train_loss"] for h in history], label="train")
        a.plot(epochs, [h["val_loss"] for h in history], label="val")
        a.set(xlabel="epoch", ylabel="loss", title="loss")
        a.legend()
        b.plot(epochs, [h["val_score"] for h in history], color="C2")
        b.set(xlabel="epoch", ylabel=f"val {score_name}", title=f"validation {score_name}")
        fig.tight_layout()
        fig.savefig(directory / "learning_curves.png", dpi=100)
        plt.close(fig)
        written.append("learning_curves.png")
    if metrics and "confusion_matrix" in metrics:
        m, classes = metrics["confusion_matrix"], metrics["classes"]
        size = max(4.0, 0.6 * len(classes) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({split})")
        peak = max((max(r) for r in m), default=0)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > peak / 2 else "black")  # fmt: skip
        fig.tight_layout()
        fig.savefig(directory / "confusion_matrix.png", dpi=100)
        plt.close(fig)
        written.append("confusion_matrix.png")
    return written

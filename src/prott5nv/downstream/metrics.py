"""Metrics (numpy only): accuracy, macro-F1, per-class report, confusion matrix, Q3/Q8 for per-residue
classification; Spearman, Pearson, RMSE, MAE for regression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[i, j]`` = how many of true class i were predicted j."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return m


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (mean over classes present in `y_true` or `y_pred`), per-class precision /
    recall / F1 / support and the confusion matrix."""
    m = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(m).astype(np.float64)
    predicted, support = m.sum(0), m.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    present = (support + predicted) > 0
    total = int(m.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "n": total,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
            for i, c in enumerate(classes)
        },  # fmt: skip
        "confusion_matrix": m.tolist(),
        "classes": list(classes),
    }


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    ends = np.r_[first[1:], len(x)]
    avg = (first + ends + 1) / 2.0  # mean of ranks first+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = avg[group]
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Spearman, Pearson, RMSE, MAE over finite targets (1-D arrays)."""
    y_true, y_pred = np.asarray(y_true, np.float64).ravel(), np.asarray(y_pred, np.float64).ravel()
    ok = np.isfinite(y_true)
    t, p = y_true[ok], y_pred[ok]
    if len(t) == 0:
        return {"n": 0}
    err = p - t
    return {"spearman": _pearson(rankdata(t), rankdata(p)), "pearson": _pearson(t, p),
            "rmse": float(np.sqrt((err**2).mean())), "mae": float(np.abs(err).mean()), "n": int(len(t))}  # fmt: skip


def task_metrics(task: Any, y_true: list[Any], y_pred: list[Any]) -> dict[str, Any]:
    """Metrics of encoded labels vs predictions (class indices / values, per protein or per residue;
    masked residues (-1 / nan) are left out, and so are the residues of a protein past its predictions,
    e.g. beyond the model's length limit)."""
    if task.per_residue:
        y_true = [np.asarray(y)[: len(p)] for y, p in zip(y_true, y_pred, strict=True)]
    if task.classification:
        t = np.concatenate([np.atleast_1d(np.asarray(y, np.int64)) for y in y_true]) if y_true else np.zeros(0, int)
        p = np.concatenate([np.atleast_1d(np.asarray(y, np.int64)) for y in y_pred]) if y_pred else np.zeros(0, int)
        keep = t >= 0
        out = classification_metrics(t[keep], p[: len(t)][keep], task.classes)
        if task.per_residue and len(task.classes) in (3, 8):
            out[f"q{len(task.classes)}"] = out["accuracy"]  # per-residue accuracy over the resolved mask
        return out
    k = task.out_dim
    t = np.concatenate([np.asarray(y, np.float64).reshape(-1, k) for y in y_true])
    p = np.concatenate([np.asarray(y, np.float64).reshape(-1, k) for y in y_pred])
    if k == 1:
        return regression_metrics(t[:, 0], p[:, 0])
    per = {name: regression_metrics(t[:, i], p[:, i]) for i, name in enumerate(task.targets)}
    mean = {m: float(np.mean([v[m] for v in per.values()])) for m in ("spearman", "pearson", "rmse", "mae")}
    return {**mean, "per_target": per, "n": int(len(t))}


def score(task: Any, metrics: dict[str, Any]) -> float:
    """The number early stopping maximises: accuracy (classification), Spearman (regression)."""
    return float(metrics["accuracy"] if task.classification else metrics.get("spearman", -1.0))


def summary_line(task: Any, metrics: dict[str, Any], split: str) -> str:
    if task.classification:
        q = next((f", Q{k[1:]} {metrics[k]:.4f}" for k in ("q3", "q8") if k in metrics), "")
        return f"{split}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}{q} (n={metrics['n']})"
    return (f"{split}: Spearman {metrics['spearman']:.4f}, RMSE {metrics['rmse']:.4g}, "
            f"Pearson {metrics['pearson']:.4f} (n={metrics['n']})")  # fmt: skip

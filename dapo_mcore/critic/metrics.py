"""Critic quality: Brier, BCE, ECE, Pearson r, AUC, and a reliability-diagram PNG.

``pred`` are predicted values V in [0, 1] (sigmoid of the head), ``target`` the MC values (floats).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def brier(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((pred - target) ** 2)) if len(pred) else float("nan")


def bce(pred: np.ndarray, target: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(pred, eps, 1 - eps)
    return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))) if len(p) else float("nan")


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    if len(pred) < 2 or np.std(pred) == 0 or np.std(target) == 0:
        return float("nan")
    return float(np.corrcoef(pred, target)[0, 1])


def ece(pred: np.ndarray, target: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: bin by prediction, |mean pred - mean target| weighted by bin size."""
    if not len(pred):
        return float("nan")
    idx = np.minimum((pred * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(pred[m].mean() - target[m].mean())
    return float(total / len(pred))


def auc(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> float:
    """ROC AUC of ``pred`` for the label ``target >= threshold`` (rank formula, ties averaged)."""
    y = target >= threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(pred, kind="mergesort")
    ranks = np.empty(len(pred))
    sp = pred[order]
    i = 0
    while i < len(sp):  # average ranks of ties
        j = i
        while j + 1 < len(sp) and sp[j + 1] == sp[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def critic_metrics(pred: Sequence[float], target: Sequence[float], train_mean: float) -> dict:
    """All metrics, plus the constant-predictor baseline (predicting the training-set mean MC value)."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    const = np.full_like(t, train_mean)
    return {"n": int(len(p)), "brier": brier(p, t), "brier_baseline": brier(const, t), "bce": bce(p, t),
            "bce_baseline": bce(const, t), "ece": ece(p, t), "pearson": pearson(p, t), "auc": auc(p, t),
            "mean_pred": float(p.mean()) if len(p) else math.nan, "mean_target": float(t.mean()) if len(t) else math.nan}


def calibration_plot(pred: Sequence[float], target: Sequence[float], path: str | Path, title: str = "critic",
                     bins: int = 10) -> Path:
    """Reliability diagram (mean MC value per prediction bin) + histogram of predictions, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    idx = np.minimum((p * bins).astype(int), bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        m = idx == b
        if m.any():
            xs.append(p[m].mean())
            ys.append(t[m].mean())
            ns.append(int(m.sum()))
    ax1.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax1.plot(xs, ys, "o-", label="critic")
    for x, y, n in zip(xs, ys, ns):
        ax1.annotate(str(n), (x, y), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax1.set(xlabel="predicted V(s)", ylabel="mean MC value", xlim=(0, 1), ylim=(0, 1),
            title=f"{title}: reliability (ECE {ece(p, t):.3f})")
    ax1.legend(loc="upper left")
    ax2.hist(p, bins=20, range=(0, 1), alpha=0.7, label="predicted")
    ax2.hist(t, bins=20, range=(0, 1), alpha=0.5, label="MC value")
    ax2.set(xlabel="value", ylabel="states", title="distribution")
    ax2.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

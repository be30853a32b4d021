"""Classification metrics shared by zero-shot and few-shot methods.

Every method that scores images against classes ends with the same report: top-1,
top-5, mean per-class recall (balanced accuracy: the number to read on imbalanced
data), per-class accuracy and the confusion matrix. Computing them in one place
keeps methods comparable; the confusion matrix comes from scikit-learn.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def topk_accuracy(scores: Any, labels: Any, k: int) -> float:
    """Fraction of rows whose true label is among the `k` highest scores.

    `k` is clamped to the number of classes (then every row counts as a hit), the
    same convention scikit-learn's `top_k_accuracy_score` follows.
    """
    s = torch.as_tensor(_as_numpy(scores))
    y = torch.as_tensor(_as_numpy(labels)).long()
    if s.ndim != 2 or s.shape[0] != y.shape[0]:
        raise ValueError(f"scores must be [N, C] with N == len(labels); got {tuple(s.shape)} and {tuple(y.shape)}")
    if s.shape[0] == 0:
        return float("nan")
    k = max(1, min(k, s.shape[1]))
    top = s.topk(k, dim=1).indices
    return float((top == y[:, None]).any(dim=1).float().mean())


def confusion_matrix(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """[C, C] counts; row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix as _cm

    y = _as_numpy(labels).astype(np.int64)
    p = _as_numpy(predictions).astype(np.int64)
    if y.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return _cm(y, p, labels=np.arange(num_classes)).astype(np.int64)


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class with no samples."""
    support = cm.sum(axis=1)
    return [float(cm[i, i] / support[i]) if support[i] else None for i in range(cm.shape[0])]


def mean_per_class_recall(cm: np.ndarray) -> float:
    """Mean recall over the classes that have samples (balanced accuracy)."""
    recalls = [r for r in per_class_accuracy(cm) if r is not None]
    return float(np.mean(recalls)) if recalls else float("nan")


def classification_metrics(scores: Any, labels: Sequence[int] | Any, classnames: Sequence[str]) -> dict[str, Any]:
    """The full report for [N, C] scores (logits or probabilities) and N true label indices.

    Keys: n, num_classes, top1, top5, mean_per_class_recall, per_class_accuracy
    (class name -> recall or None), support (class name -> count), confusion_matrix
    (list of rows; row = true class).
    """
    s = _as_numpy(scores)
    y = _as_numpy(labels).astype(np.int64)
    num_classes = len(classnames)
    if s.ndim != 2 or s.shape[1] != num_classes:
        raise ValueError(f"scores must be [N, {num_classes}]; got {s.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]")
    predictions = s.argmax(axis=1) if s.shape[0] else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(y, predictions, num_classes)
    per_class = per_class_accuracy(cm)
    return {
        "n": int(y.size),
        "num_classes": num_classes,
        "top1": topk_accuracy(s, y, 1),
        "top5": topk_accuracy(s, y, 5),
        "mean_per_class_recall": mean_per_class_recall(cm),
        "per_class_accuracy": {name: acc for name, acc in zip(classnames, per_class)},
        "support": {name: int(n) for name, n in zip(classnames, cm.sum(axis=1))},
        "confusion_matrix": cm.tolist(),
    }

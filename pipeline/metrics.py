"""Classification metrics (scikit-learn), shared by training, evaluation and the baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.metrics import (
    confusion_matrix as sk_confusion_matrix,
)


def _classes(t: np.ndarray, p: np.ndarray, num_classes: int) -> int:
    return max(int(num_classes), int(t.max(initial=-1)) + 1, int(p.max(initial=-1)) + 1)


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """Counts with rows = true label, columns = predicted label (int64 [n, n])."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} items but y_pred has {p.shape[0]}")
    labels = list(range(_classes(t, p, num_classes)))
    return sk_confusion_matrix(t, p, labels=labels).astype(np.int64)


def _report(t: np.ndarray, p: np.ndarray, n: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support.

    Macro-F1 averages over the classes that occur in the labels or the
    predictions (scikit-learn's default labels), so an unused output of the
    model does not drag it down; ``per_class`` lists every class id below ``n``.
    An undefined ratio counts as 0 (``zero_division=0``).
    """
    if t.size == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "per_class": {}}
    labels = list(range(n))
    precision, recall, f1, support = precision_recall_fscore_support(
        t, p, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
        "per_class": {
            str(i): {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in labels
        },
    }


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    num_classes: int,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix as a list of lists.

    With ``names`` (the name of each class id) ``per_class`` is keyed by name,
    ``labels`` lists the matrix's rows and columns by name, and
    ``confusion_by_label`` is the matrix as ``{true name: {predicted name: count}}``.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    truth = np.asarray(y_true, dtype=np.int64)
    out = _report(truth, np.asarray(y_pred, dtype=np.int64), cm.shape[0])
    out["confusion_matrix"] = cm.tolist()
    if names is not None:
        axis = [*names, *(str(i) for i in range(len(names), cm.shape[0]))][: cm.shape[0]]
        out["per_class"] = {axis[int(k)]: v for k, v in out["per_class"].items()}
        out["labels"] = axis
        out["confusion_by_label"] = {
            t: {p: int(cm[i, j]) for j, p in enumerate(axis)} for i, t in enumerate(axis)
        }
    return out

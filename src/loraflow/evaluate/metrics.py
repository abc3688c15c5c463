"""Classification metrics and perplexity, computed with scikit-learn from labels and probabilities.

No model code lives here: a caller runs its model, gathers the true labels and the class
probabilities (``softmax`` of the logits), and gets back plain Python numbers that can be written
to JSON as they are. Every metric but top-k accuracy is scikit-learn's own, so that the numbers
match what other projects report with the same library. Top-k accuracy is counted here from the
same ranking as the predictions (``argmax``: a tie goes to the lower class index), so that top-1
accuracy is the accuracy; scikit-learn's ``top_k_accuracy_score`` breaks ties the other way and
can disagree with the accuracy on tied rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from loraflow.atomic import atomic_write

TOP_K = (1, 3, 5)
# how far a row of probabilities may sum from 1 (half-precision softmax) before it is refused
_SUM_TOLERANCE = 1e-2
# exp(50) ~ 5e21: far beyond any vocabulary size, so a capped perplexity still reads as "diverged"
_MAX_LOG_PPL = 50.0


def _as_labels(values: Sequence[int], n_classes: int, what: str) -> np.ndarray:
    """``values`` as a 1-D int64 array, checked to lie in ``[0, n_classes)``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise ValueError(
                f"{what} must hold integer class indices, got dtype {arr.dtype}: map class names to indices"
            )
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n_classes)]
    if bad.size:
        raise ValueError(
            f"{what} holds class index {int(bad[0])}, outside range(0, {n_classes}) for {n_classes} classes: "
            "pass 0-based indices into class_names"
        )
    return arr


def _as_probs(probs: np.ndarray | torch.Tensor, n_classes: int) -> np.ndarray:
    """``probs`` as a float64 ``(n, K)`` array whose rows sum to 1, as scikit-learn's multiclass AUC requires.

    Rows off by more than scikit-learn accepts but within ``_SUM_TOLERANCE`` (a half-precision softmax)
    are renormalized; well-formed probabilities are left exactly as given."""
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"probs must be 2-D (n_examples, n_classes), got shape {arr.shape}")
    if arr.shape[1] != n_classes:
        raise ValueError(f"probs has {arr.shape[1]} columns but class_names names {n_classes} classes: they must match")
    if not np.all(np.isfinite(arr)):
        raise ValueError("probs holds NaN or infinite values: check the model's logits")
    sums = arr.sum(axis=1)
    if arr.size and (arr.min() < 0 or np.any(np.abs(sums - 1) > _SUM_TOLERANCE)):
        raise ValueError(
            "probs rows must be probabilities (non-negative, summing to 1); got row sums "
            f"from {sums.min():.4g} to {sums.max():.4g}: apply softmax to the logits first"
        )
    if not np.allclose(sums, 1):  # within our tolerance but not scikit-learn's (which AUC enforces)
        arr = arr / sums[:, None]
    return arr


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """The share of rows whose true class is among the ``k`` most probable, ranked as ``argmax``
    ranks them: by probability, a tie towards the lower class index. ``k = 1``: the accuracy of
    ``probs.argmax(1)``."""
    rows = np.arange(labels.size)
    true = probs[rows, labels][:, None]
    lower = np.arange(probs.shape[1])[None, :] < labels[:, None]
    ahead = (probs > true).sum(axis=1) + ((probs == true) & lower).sum(axis=1)  # classes ranked above the true one
    return float((ahead < k).mean())


def _macro_auc(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> tuple[float | None, str | None]:
    """One-vs-rest macro AUC (the positive class's AUC when K == 2), or None and the reason why not."""
    n_classes = len(class_names)
    present = np.unique(y)
    if present.size < 2:
        name = class_names[int(present[0])] if present.size else "none"
        return None, f"only one class ({name!r}) is present in labels: AUC needs positive and negative examples"
    missing = [class_names[c] for c in range(n_classes) if c not in present]
    if missing:
        return None, (
            f"no example of class(es) {missing} in labels: their one-vs-rest AUC is undefined, "
            "so the macro average over all classes is too"
        )
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1])), None
    auc = roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    return float(auc), None


def classification_metrics(labels: Sequence[int], probs: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> dict:
    """Accuracy, top-k accuracy, F1, AUC, a per-class report and the confusion matrix of one classifier.

    ``labels`` are the true 0-based class indices, ``probs`` the ``(n, K)`` class probabilities and
    ``class_names`` the K names in index order. Predictions are ``argmax(probs)``. All values are
    plain Python numbers, lists and dicts (JSON-ready):

    - ``n``, ``accuracy``;
    - ``top_k_accuracy``: ``{"1": ..., "3": ..., "5": ...}`` for each k < K (only ``"1"`` when K <= 3),
      ranked as the predictions are (a tie towards the lower class index), so ``"1"`` equals ``accuracy``;
    - ``macro_f1``, ``micro_f1``: over all K classes, a class never predicted nor present scoring 0;
    - ``macro_auc``: one-vs-rest macro ROC AUC (K > 2) or the positive class's AUC (K == 2), or None
      when a class has no example in ``labels``; ``macro_auc_note`` then says why (else None);
    - ``per_class``: ``{name: {"precision", "recall", "f1-score", "support"}}``;
    - ``confusion``: K x K counts as nested lists, rows = true class, columns = predicted class.
    """
    class_names = [str(c) for c in class_names]
    n_classes = len(class_names)
    if n_classes == 0:
        raise ValueError("class_names is empty: name every class, in index order")
    if len(set(class_names)) != n_classes:
        raise ValueError(f"class_names must be distinct, got {class_names}")
    p = _as_probs(probs, n_classes)
    y = _as_labels(labels, n_classes, "labels")
    if y.size == 0:
        raise ValueError("labels is empty: metrics need at least one example")
    if p.shape[0] != y.size:
        raise ValueError(f"probs has {p.shape[0]} rows but labels has {y.size} entries: one row per label")
    pred = p.argmax(axis=1)
    class_ids = list(range(n_classes))

    accuracy = float(accuracy_score(y, pred))
    top_k = {"1": accuracy}  # the same predictions (a single class: every one is right)
    for k in TOP_K[1:]:
        if k < n_classes:
            top_k[str(k)] = top_k_accuracy(y, p, k)

    auc, note = _macro_auc(y, p, class_names)
    report = classification_report(
        y, pred, labels=class_ids, target_names=class_names, output_dict=True, zero_division=0
    )
    per_class = {
        name: {key: (int(v) if key == "support" else float(v)) for key, v in report[name].items()}
        for name in class_names
    }
    return {
        "n": int(y.size),
        "accuracy": accuracy,
        "top_k_accuracy": top_k,
        "macro_f1": float(f1_score(y, pred, labels=class_ids, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y, pred, labels=class_ids, average="micro", zero_division=0)),
        "macro_auc": auc,
        "macro_auc_note": note,
        "per_class": per_class,
        "confusion": confusion_matrix(y, pred, labels=class_ids).tolist(),
    }


def joint_accuracy(labels_per_head: list[Sequence[int]], preds_per_head: list[Sequence[int]]) -> float:
    """The fraction of examples on which every head of a multi-head classifier is right.

    ``labels_per_head[h][i]`` and ``preds_per_head[h][i]`` are head h's true and predicted class for
    example i. Computed with NumPy: scikit-learn's ``accuracy_score`` refuses multiclass-multioutput
    targets, which is what several heads with their own class sets are.
    """
    if len(labels_per_head) != len(preds_per_head):
        raise ValueError(
            f"{len(labels_per_head)} heads of labels but {len(preds_per_head)} heads of predictions: "
            "pass one list per head to each"
        )
    if not labels_per_head:
        raise ValueError("no heads given: pass one list of labels and one of predictions per head")
    rows = [np.asarray(h).reshape(-1) for h in labels_per_head]
    preds = [np.asarray(h).reshape(-1) for h in preds_per_head]
    n = rows[0].size
    for h, (y, p) in enumerate(zip(rows, preds)):
        if y.size != n or p.size != n:
            raise ValueError(
                f"head {h} has {y.size} labels and {p.size} predictions, head 0 has {n} labels: "
                "every head must cover the same examples"
            )
    if n == 0:
        raise ValueError("no examples: joint accuracy needs at least one row")
    all_right = np.all(np.stack(rows) == np.stack(preds), axis=0)
    return float(all_right.mean())


def confusion_matrix_png(
    labels: Sequence[int],
    preds: Sequence[int],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Draw the confusion matrix (rows = true class, counts in each cell) to a PNG file; return its path.

    Drawn on a standalone Agg figure (matplotlib imported here, so that importing this module needs no
    plotting library and never touches the user's pyplot backend), and written atomically: to a
    temporary file in the same folder, then renamed over ``path`` (missing parent folders are made).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    class_names = [str(c) for c in class_names]
    n_classes = len(class_names)
    if n_classes == 0:
        raise ValueError("class_names is empty: name every class, in index order")
    y = _as_labels(labels, n_classes, "labels")
    p = _as_labels(preds, n_classes, "preds")
    if y.size != p.size:
        raise ValueError(f"{y.size} labels but {p.size} predictions: one prediction per label")
    if y.size == 0:
        raise ValueError("labels is empty: a confusion matrix needs at least one example")

    long_names = max(len(c) for c in class_names) > 8
    side = max(4.0, 0.9 * n_classes + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    counts = confusion_matrix(y, p, labels=list(range(n_classes)))
    display = ConfusionMatrixDisplay(counts, display_labels=class_names)
    display.plot(ax=ax, cmap="Blues", values_format="d", colorbar=True, xticks_rotation=40 if long_names else 0)
    if long_names:
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    ax.set_title(title)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``: the perplexity of a language model from its summed token NLL (nats).

    The exponent is capped at 50 (a perplexity of about 5.2e21), so that a diverged model reports a
    huge but finite number instead of raising ``OverflowError``; any value that high means "diverged".
    """
    total_nll = float(total_nll)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}: perplexity is undefined without tokens")
    if math.isnan(total_nll) or total_nll < 0:
        raise ValueError(
            f"total_nll must be a non-negative sum of -log p (nats), got {total_nll}: check the loss reduction"
        )
    return math.exp(min(total_nll / n_tokens, _MAX_LOG_PPL))

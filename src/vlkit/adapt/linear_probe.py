"""Linear probe: logistic regression on frozen, L2-normalised image features.

The baseline CoOp and the CLIP paper compare against. The inverse regularisation
strength C is chosen on the few-shot *validation* split only, the way CoOp's
`lpclip` script does it: a coarse sweep over powers of ten, then a bisection in
log-space around the best value. The probe sees exactly the training shots the
other methods see (the harness hands every method the same split), and never
the test set.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from vlkit.errors import VlkitError

COARSE_GRID: tuple[float, ...] = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


@dataclass
class LinearProbe:
    """A fitted probe; `logits` gives class scores for any (unnormalised) features."""

    classifier: LogisticRegression
    num_classes: int
    C: float
    val_accuracy: float
    search: list[tuple[float, float]] = field(default_factory=list)

    def logits(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[N, D] features -> [N, num_classes] decision scores (absent classes get -inf)."""
        scores = self.classifier.decision_function(_normalise(_as_numpy(features)))
        if scores.ndim == 1:  # binary problem: sklearn returns one column
            scores = np.stack([-scores, scores], axis=1)
        out = np.full((scores.shape[0], self.num_classes), -np.inf, dtype=np.float32)
        out[:, self.classifier.classes_] = scores
        return torch.from_numpy(out)

    def predict(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.logits(features).argmax(dim=1)


def _fit(
    x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int, start: LogisticRegression | None = None
) -> LogisticRegression:
    """One L2 logistic regression (lbfgs); `start` warm-starts from a fit at a nearby C
    (the problem is convex, so only the time to reach the optimum changes)."""
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed, warm_start=start is not None)
    if start is not None:
        clf.coef_, clf.intercept_ = start.coef_.copy(), start.intercept_.copy()
    with warnings.catch_warnings():
        # 1-shot problems have as many classes as samples: sklearn's "regression?" hint and
        # lbfgs non-convergence at huge C are expected there, not news for the user.
        warnings.filterwarnings("ignore", message="The number of unique classes")
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        return clf.fit(x, y)


def fit_linear_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    val_features: torch.Tensor | np.ndarray,
    val_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    coarse_grid: tuple[float, ...] = COARSE_GRID,
    refine_steps: int = 8,
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearProbe:
    """Fit a probe, choosing C on the validation split (coarse grid, then log-bisection).

    `coarse_grid` must be ascending. Choices compare exact counts of correctly classified validation images,
    never float accuracies. Ties, each settled by a fixed rule: on the coarse grid the smaller C wins (the more
    regularised probe); a bisection step whose two ends tie moves toward the smaller C; the final pick among
    every C tried keeps the most correct, then the C closest to the coarse peak in log10 (distances rounded to
    1e-9 decades, so float noise in 10**x cannot decide), then the smaller C. Deterministic for a seed.
    """
    x_tr, x_va = _normalise(_as_numpy(train_features)), _normalise(_as_numpy(val_features))
    y_tr, y_va = _as_numpy(train_labels).astype(np.int64), _as_numpy(val_labels).astype(np.int64)
    if x_tr.ndim != 2 or len(x_tr) != len(y_tr) or len(x_tr) == 0:
        raise VlkitError(f"train features {x_tr.shape}: need a non-empty [N, D] matrix with one label per row")
    if x_va.ndim != 2 or len(x_va) != len(y_va) or len(x_va) == 0:
        raise VlkitError(
            f"validation features {x_va.shape}: the linear probe chooses C on a few-shot validation split; "
            "give a non-empty [N, D] matrix with one label per row"
        )
    if len(np.unique(y_tr)) < 2:
        raise VlkitError("train labels: the linear probe needs shots from at least 2 classes")
    if list(coarse_grid) != sorted(coarse_grid) or not coarse_grid:
        raise VlkitError(f"coarse grid {coarse_grid}: give ascending positive values of C")
    n_cls = int(num_classes if num_classes is not None else max(y_tr.max(), y_va.max()) + 1)
    tried: dict[float, tuple[int, LogisticRegression]] = {}  # C -> (correct validation images, fit)

    def evaluate(C: float) -> int:
        if C not in tried:
            near = min(tried, key=lambda c: abs(math.log10(c) - math.log10(C)), default=None)
            clf = _fit(x_tr, y_tr, C, max_iter, seed, tried[near][1] if near is not None else None)
            tried[C] = (int((clf.predict(x_va) == y_va).sum()), clf)
        return tried[C][0]

    # the coarse sweep runs from strong to weak regularisation, each fit warm-started
    # from the previous one: large-C fits then start near their optimum.
    correct = [evaluate(C) for C in coarse_grid]
    peak = math.log10(coarse_grid[int(np.argmax(correct))])  # argmax: the first, smallest C of a tie
    # Bisection in log10(C) around the coarse peak, as CoOp's lpclip search.
    lo, hi = peak - 1.0, peak + 1.0
    for _ in range(refine_steps):
        if evaluate(10.0**lo) >= evaluate(10.0**hi):
            lo, hi = lo, (lo + hi) / 2
        else:
            lo, hi = (lo + hi) / 2, hi

    def preference(c: float) -> tuple[int, float, float]:
        return tried[c][0], -round(abs(math.log10(c) - peak), 9), -c

    best_c = max(tried, key=preference)
    n_val = len(y_va)
    return LinearProbe(tried[best_c][1], n_cls, best_c, tried[best_c][0] / n_val, sorted((c, k / n_val) for c, (k, _) in tried.items()))

"""Classification metrics against numbers worked out by hand."""

import math

import numpy as np
import pytest
import torch

from vlkit import metrics

# 3 classes, 7 samples. Scores are built so the ranking per row is explicit.
LABELS = [0, 0, 0, 1, 1, 2, 2]
#         pred   second  third
RANKS = [
    (0, 1, 2),  # true 0: top-1 hit
    (0, 2, 1),  # true 0: top-1 hit
    (1, 0, 2),  # true 0: wrong, true class second
    (1, 0, 2),  # true 1: hit
    (2, 0, 1),  # true 1: wrong, true class third
    (2, 1, 0),  # true 2: hit
    (0, 1, 2),  # true 2: wrong, true class third
]


def _scores() -> torch.Tensor:
    s = torch.zeros(len(RANKS), 3)
    for i, order in enumerate(RANKS):
        for rank, c in enumerate(order):
            s[i, c] = 3.0 - rank
    return s


def test_report_matches_hand_computation():
    m = metrics.classification_metrics(_scores(), LABELS, ["cat", "dog", "fox"])
    # confusion: rows = true, cols = predicted
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert m["top1"] == pytest.approx(4 / 7)
    assert m["top5"] == 1.0  # k clamps to 3 classes
    assert m["per_class_accuracy"] == {"cat": pytest.approx(2 / 3), "dog": 0.5, "fox": 0.5}
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    assert m["support"] == {"cat": 3, "dog": 2, "fox": 2}
    assert m["n"] == 7 and m["num_classes"] == 3


def test_topk_two():
    # top-2 hits: rows 0,1,2 (true second),3,5 -> 5 of 7
    assert metrics.topk_accuracy(_scores(), LABELS, 2) == pytest.approx(5 / 7)


def test_top5_with_many_classes_is_not_trivial():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 10))
    labels = rng.integers(0, 10, size=50)
    ranks = (-scores).argsort(axis=1)
    expected = np.mean([labels[i] in ranks[i, :5] for i in range(50)])
    assert metrics.topk_accuracy(scores, labels, 5) == pytest.approx(expected)
    assert 0 < expected < 1


def test_class_without_samples_is_none_and_left_out_of_mean():
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.0, 0.0, 1.0]])
    m = metrics.classification_metrics(s, [0, 1, 1], ["a", "b", "c"])
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": None}
    assert m["mean_per_class_recall"] == pytest.approx(0.75)  # (1 + 0.5) / 2, c has no support
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_empty_input_gives_nan_not_crash():
    m = metrics.classification_metrics(torch.zeros(0, 2), [], ["a", "b"])
    assert math.isnan(m["top1"]) and math.isnan(m["mean_per_class_recall"])
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]


def test_bad_shapes_and_labels_raise():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        metrics.classification_metrics(torch.zeros(2, 2), [0, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.classification_metrics(torch.zeros(2, 2), [0, 2], ["a", "b"])

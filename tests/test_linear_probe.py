"""Linear probe: C chosen on the validation split only, deterministic, sound logits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlkit.adapt.linear_probe import COARSE_GRID, fit_linear_probe
from vlkit.errors import VlkitError


def _task(seed: int, classes: int = 5, dim: int = 16, per_class: int = 8, noise: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)

    def draw(n):
        y = torch.arange(classes).repeat_interleave(n)
        return protos[y] + noise * torch.randn(len(y), dim, generator=g) / dim**0.5, y

    return draw(per_class), draw(4), draw(40)


def test_probe_selects_c_with_best_validation_accuracy_and_generalises():
    (xtr, ytr), (xva, yva), (xte, yte) = _task(0)
    probe = fit_linear_probe(xtr, ytr, xva, yva, seed=0)
    tried = dict(probe.search)
    assert probe.val_accuracy == max(tried.values())
    assert tried[probe.C] == probe.val_accuracy
    assert set(COARSE_GRID) <= set(tried) and len(tried) > len(COARSE_GRID)  # refined beyond the grid
    # the reported validation accuracy is the returned classifier's
    assert (probe.predict(xva) == yva).float().mean().item() == pytest.approx(probe.val_accuracy)
    assert (probe.predict(xte) == yte).float().mean().item() > 0.8


def test_probe_choice_follows_the_validation_split():
    (xtr, ytr), (xva, yva), _ = _task(1, noise=1.5)
    good = fit_linear_probe(xtr, ytr, xva, yva, seed=0)
    # Validation labels that contradict the data: the search must chase them, not the truth.
    flipped = fit_linear_probe(xtr, ytr, xva, (yva + 1) % 5, seed=0)
    assert good.val_accuracy > flipped.val_accuracy
    assert flipped.val_accuracy == max(a for _, a in flipped.search)


class _ScoredByC:
    """Stands in for sklearn's fit: validation accuracy is a known function of C."""

    def __init__(self, y_va: np.ndarray, score) -> None:
        self.y_va, self.score, self.fitted = y_va, score, []

    def __call__(self, x, y, C, max_iter, seed, start=None):
        self.fitted.append(C)
        wrong = round(len(self.y_va) * (1.0 - self.score(C)))
        fake = type("Fit", (), {})()
        fake.predict = lambda _x: np.where(np.arange(len(self.y_va)) < wrong, -1, self.y_va)
        return fake


def test_bisection_moves_toward_the_better_c(monkeypatch):
    """Accuracy peaks at log10 C = 0.37 (off the coarse grid) and falls 0.1 per decade on
    either side: the bisection must close in on the peak from the coarse best C = 1."""
    import vlkit.adapt.linear_probe as lp

    (xtr, ytr), (xva, yva), _ = _task(0)
    yva = np.tile(yva.numpy(), 50)  # 1000 rows: accuracy resolves 0.001
    xva = np.tile(xva.numpy(), (50, 1))
    fake = _ScoredByC(yva, lambda C: max(0.0, 1.0 - 0.1 * abs(np.log10(C) - 0.37)))
    monkeypatch.setattr(lp, "_fit", fake)
    probe = fit_linear_probe(xtr, ytr, xva, yva, refine_steps=8)
    assert abs(np.log10(probe.C) - 0.37) < 0.02, probe.search  # 8 halvings of 2 decades: within 0.008
    assert probe.val_accuracy == pytest.approx(1.0 - 0.1 * abs(np.log10(probe.C) - 0.37), abs=1e-3)


def _probe_scored_by(monkeypatch, score, refine_steps, **kw):
    """fit_linear_probe with validation accuracy a known function of log10 C, on 100 images."""
    import vlkit.adapt.linear_probe as lp

    (xtr, ytr), (xva, yva), _ = _task(0)
    yva, xva = np.tile(yva.numpy(), 5), np.tile(xva.numpy(), (5, 1))
    fake = _ScoredByC(yva, lambda C: score(round(float(np.log10(C)), 6)))
    monkeypatch.setattr(lp, "_fit", fake)
    return fit_linear_probe(xtr, ytr, xva, yva, refine_steps=refine_steps, **kw), fake


def test_coarse_grid_tie_keeps_the_smaller_c(monkeypatch):
    """1e-2, 1 and 1e2 all score best: the most regularised of them, also as the bisection's centre."""
    probe, _ = _probe_scored_by(monkeypatch, lambda x: 0.9 if -2 <= x <= 2 else 0.5, refine_steps=0)
    assert probe.C == 1e-2 and probe.val_accuracy == 0.9
    probe, fake = _probe_scored_by(monkeypatch, lambda x: 0.9 if -2 <= x <= 2 else 0.5, refine_steps=1)
    assert fake.fitted[len(COARSE_GRID):] == [1e-3, 1e-1]  # bisection around 1e-2, not 1 or 1e2
    assert probe.C == 1e-2  # refined points that tie lose to the coarse peak itself


def test_refined_tie_keeps_the_c_closest_to_the_coarse_peak(monkeypatch):
    """Coarse peak at C = 1; the bisection finds 0.9 at log10 C = 1 and then at 0.5: the nearer one wins,
    though the farther one was found first."""
    def score(x):
        return 0.9 if 0.45 <= x <= 1.05 else 0.8 if -0.05 <= x < 0.45 else 0.7 if -1.05 <= x < -0.05 else 0.5

    probe, fake = _probe_scored_by(monkeypatch, score, refine_steps=3)
    assert [round(float(np.log10(c)), 6) for c in fake.fitted[len(COARSE_GRID):]] == [-1.0, 1.0, 0.5]  # (0: C = 1, tried already)
    assert probe.C == pytest.approx(10**0.5) and probe.val_accuracy == 0.9


def test_refined_tie_at_equal_distance_keeps_the_smaller_c(monkeypatch):
    """0.1 and 10 both beat the coarse peak C = 1 and lie one decade from it: the smaller wins. The
    bisection step between them ties too and moves toward the smaller C (its third step then tries 10**-0.5)."""
    probe, fake = _probe_scored_by(monkeypatch, lambda x: 0.9 if x in (-1.0, 1.0) else 0.8 if x == 0.0 else 0.5, refine_steps=3)
    assert [round(float(np.log10(c)), 6) for c in fake.fitted[len(COARSE_GRID):]] == [-1.0, 1.0, -0.5]
    assert probe.C == 0.1 and probe.val_accuracy == 0.9


def test_equal_distance_is_decided_by_the_rule_not_by_float_noise(monkeypatch):
    """Around a coarse peak at C = 5, 10**(log10(5) + 1) lands 1 - 1e-16 decades away and 0.5 exactly 1:
    the rounding keeps them equally near, so the smaller C wins."""
    import math

    near = {round(math.log10(0.5), 6): 0.9, round(math.log10(50.0), 6): 0.9, round(math.log10(5.0), 6): 0.8}
    probe, fake = _probe_scored_by(monkeypatch, lambda x: near.get(x, 0.5), refine_steps=1, coarse_grid=(0.05, 5.0, 500.0))
    peak = math.log10(5.0)
    assert abs(math.log10(fake.fitted[-1]) - peak) != abs(math.log10(fake.fitted[-2]) - peak)  # the noise is there
    assert probe.C == pytest.approx(0.5) and probe.val_accuracy == 0.9


def test_probe_is_deterministic_and_normalises_inputs():
    (xtr, ytr), (xva, yva), (xte, _) = _task(2)
    a = fit_linear_probe(xtr, ytr, xva, yva, seed=3)
    b = fit_linear_probe(xtr * 7.0, ytr, xva * 0.1, yva, seed=3)  # scale must not matter
    assert a.C == b.C
    assert torch.allclose(a.logits(xte), b.logits(xte * 5.0), atol=1e-4)


def test_classes_without_shots_get_minus_inf_and_binary_works():
    (xtr, ytr), (xva, yva), (xte, _) = _task(3, classes=2)
    probe = fit_linear_probe(xtr, ytr, xva, yva, num_classes=4, refine_steps=1)
    logits = probe.logits(xte)
    assert logits.shape == (len(xte), 4)
    assert torch.isinf(logits[:, 2:]).all() and torch.isfinite(logits[:, :2]).all()
    assert np.array_equal(probe.predict(xte).numpy(), (logits[:, 1] > logits[:, 0]).long().numpy())


def test_probe_rejects_missing_validation_and_single_class():
    (xtr, ytr), _, _ = _task(4)
    with pytest.raises(VlkitError, match="validation features"):
        fit_linear_probe(xtr, ytr, torch.empty(0, 16), torch.empty(0))
    with pytest.raises(VlkitError, match="at least 2 classes"):
        fit_linear_probe(xtr[:3], torch.zeros(3), xtr[:3], torch.zeros(3))

"""Tip-Adapter(-F): exact zero-shot limit, cache behaviour, validation-only search."""

import pytest
import torch
import torch.nn.functional as F

from vlkit.adapt.tip_adapter import TipAdapter, build_cache, fit_tip_adapter, fit_tip_adapter_f, search_alpha_beta
from vlkit.errors import VlkitError

C, D, SCALE = 6, 24, 50.0


def _task(seed: int, zs_noise: float = 3.0, shots: int = 4, views: int = 3):
    """Class prototypes; zero-shot weights are noisy prototypes (a weak prior); the
    shots (with augmented views) carry the truth."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    zs = F.normalize(protos + zs_noise * torch.randn(C, D, generator=g) / D**0.5, dim=-1)

    def draw(n, v=None):
        y = torch.arange(C).repeat_interleave(n)
        shape = (len(y), D) if v is None else (len(y), v, D)
        base = protos[y] if v is None else protos[y][:, None, :]
        return F.normalize(base + 0.5 * torch.randn(*shape, generator=g) / D**0.5, dim=-1), y

    return zs, draw(shots, views), draw(4), draw(50)


def _acc(logits, y):
    return (logits.argmax(1) == y).float().mean().item()


def test_alpha_zero_is_exactly_zero_shot_and_large_beta_vanishes():
    zs, (xtr, ytr), _, (xte, _) = _task(0)
    keys, values = build_cache(xtr, ytr, C)
    zero_shot = SCALE * F.normalize(xte, dim=-1) @ zs.T
    assert torch.equal(TipAdapter(keys, values, zs, SCALE, alpha=0.0, beta=5.0)(xte), zero_shot)
    far = TipAdapter(keys, values, zs, SCALE, alpha=1.0, beta=1e4)(xte)
    assert torch.allclose(far, zero_shot, atol=1e-6, rtol=0)


def test_cache_keys_average_views_and_recall_shots():
    zs, (xtr, ytr), _, _ = _task(1)
    keys, values = build_cache(xtr, ytr, C)
    assert torch.allclose(keys, F.normalize(xtr.mean(1), dim=-1))
    assert torch.equal(values.argmax(1), ytr) and torch.equal(values.sum(1), torch.ones(len(ytr)))
    # a query equal to a key, with a sharp cache, gets that key's class whatever the prior says
    model = TipAdapter(keys, values, -zs, SCALE, alpha=1e3, beta=50.0)
    assert torch.equal(model(keys).argmax(1), ytr)


def test_search_uses_validation_and_beats_a_weak_zero_shot():
    zs, (xtr, ytr), (xva, yva), (xte, yte) = _task(1)
    model, found = fit_tip_adapter(xtr, ytr, xva, yva, zs, SCALE, beta_range=(0.1, 7, 15), alpha_range=(0.1, 3, 8))
    assert (model.alpha, model.beta) == (found.alpha, found.beta)
    assert _acc(model(xva), yva) == pytest.approx(found.val_accuracy)
    zs_acc = _acc(SCALE * xte @ zs.T, yte)
    assert _acc(model(xte), yte) > zs_acc + 0.1
    # the grid's first best is kept: no other grid point is strictly better on validation
    for beta in torch.linspace(0.1, 7, 15).tolist():
        for alpha in torch.linspace(0.1, 3, 8).tolist():
            probe = TipAdapter(model.keys.detach(), model.values, zs, SCALE, alpha, beta)
            assert _acc(probe(xva), yva) <= found.val_accuracy + 1e-9


def test_search_ties_go_to_the_smallest_beta_then_the_smallest_alpha():
    """Six validation images leave many grid points tied at the best count; the search keeps
    the first in (beta, alpha) order, found here by scoring the whole grid independently."""
    import numpy as np

    zs, (xtr, ytr), (xva, yva), _ = _task(5, zs_noise=6.0)
    xva, yva = xva[::4], yva[::4]
    keys, values = build_cache(xtr, ytr, C)
    betas, alphas = np.linspace(0.1, 7.0, 12), np.linspace(0.1, 3.0, 9)
    correct = {
        (b, a): int((TipAdapter(keys, values, zs, SCALE, float(a), float(b))(xva).argmax(1) == yva).sum())
        for b in betas for a in alphas
    }
    best = max(correct.values())
    tied = sorted(k for k, v in correct.items() if v == best)
    assert len(tied) > 1 and tied[0] != (betas[0], alphas[0])  # a real tie, and not simply the first grid point
    assert len({a for _, a in tied}) > 1 and len({b for b, _ in tied}) > 1
    found = search_alpha_beta(TipAdapter(keys, values, zs, SCALE), xva, yva, beta_range=(0.1, 7.0, 12), alpha_range=(0.1, 3.0, 9))
    assert (found.beta, found.alpha) == tied[0] and found.val_accuracy == best / len(yva)


def test_search_changes_with_validation_labels_only():
    zs, (xtr, ytr), (xva, yva), _ = _task(3)
    keys, values = build_cache(xtr, ytr, C)
    a = search_alpha_beta(TipAdapter(keys, values, zs, SCALE), xva, yva, beta_range=(0.1, 7, 10), alpha_range=(0.1, 3, 5))
    b = search_alpha_beta(TipAdapter(keys, values, zs, SCALE), xva, (yva + 1) % C, beta_range=(0.1, 7, 10), alpha_range=(0.1, 3, 5))
    assert a.val_accuracy > b.val_accuracy


def test_tip_adapter_f_trains_keys_deterministically_and_improves_on_training_free():
    zs, (xtr, ytr), (xva, yva), (xte, yte) = _task(4)
    grid = dict(beta_range=(0.1, 7, 10), alpha_range=(0.1, 3, 6))
    base, base_found = fit_tip_adapter(xtr, ytr, xva, yva, zs, SCALE, **grid)
    m1, f1 = fit_tip_adapter_f(xtr, ytr, xva, yva, zs, SCALE, epochs=10, batch_size=8, lr=1e-2, seed=0, **grid)
    m2, f2 = fit_tip_adapter_f(xtr, ytr, xva, yva, zs, SCALE, epochs=10, batch_size=8, lr=1e-2, seed=0, **grid)
    assert torch.equal(m1.keys, m2.keys) and f1 == f2
    assert not torch.equal(m1.keys.detach(), base.keys.detach())
    assert f1.val_accuracy > base_found.val_accuracy
    assert _acc(m1(xte), yte) > _acc(base(xte), yte) + 0.1


def test_tip_adapter_f_keeps_the_best_epoch_on_validation_not_the_last():
    """At lr 0.5 the keys overfit: validation accuracy peaks at epochs 1-2 and ends lower.
    The returned keys are the earliest best epoch's: their accuracy (at the initial
    alpha = beta = 1 that chose them) is the peak, not the last epoch's."""
    zs, (xtr, ytr), (xva, yva), _ = _task(3)
    grid = dict(beta_range=(0.1, 7, 5), alpha_range=(0.1, 3, 3))
    model, found = fit_tip_adapter_f(xtr, ytr, xva, yva, zs, SCALE, epochs=10, batch_size=8, lr=0.5, seed=0, **grid)
    history = found.epoch_val_accuracy
    assert len(history) == 11 and history[-1] < max(history)
    assert found.epoch == history.index(max(history)) == 1  # epochs 1 and 2 tie: the earlier one
    kept = TipAdapter(model.keys.detach(), model.values, zs, SCALE, alpha=1.0, beta=1.0)
    assert _acc(kept(xva), yva) == max(history)
    assert not torch.equal(model.keys.detach(), build_cache(xtr, ytr, C)[0])


def test_tip_adapter_f_ties_keep_the_earliest_epoch_down_to_the_untrained_cache():
    """A validation accuracy that no epoch improves (0.5 throughout at lr 0.01) keeps
    epoch 0: the training-free cache, bit for bit."""
    zs, (xtr, ytr), (xva, yva), _ = _task(2)
    grid = dict(beta_range=(0.1, 7, 5), alpha_range=(0.1, 3, 3))
    model, found = fit_tip_adapter_f(xtr, ytr, xva, yva, zs, SCALE, epochs=10, batch_size=8, lr=1e-2, seed=0, **grid)
    assert set(found.epoch_val_accuracy) == {0.5} and found.epoch == 0
    assert torch.equal(model.keys.detach(), build_cache(xtr, ytr, C)[0])


def test_bad_inputs_name_the_input():
    zs, (xtr, ytr), _, _ = _task(5)
    with pytest.raises(VlkitError, match="train labels"):
        build_cache(xtr, ytr[:-1], C)
    with pytest.raises(VlkitError, match="train labels"):
        build_cache(xtr, ytr + C, C)
    keys, values = build_cache(xtr, ytr, C)
    with pytest.raises(VlkitError, match="zero-shot weights"):
        TipAdapter(keys, values, zs[:, :5], SCALE)
    with pytest.raises(VlkitError, match="validation features"):
        search_alpha_beta(TipAdapter(keys, values, zs, SCALE), torch.empty(0, D), torch.empty(0))

"""CLIP-Adapter: ratio 0 is exactly zero-shot; training helps; ratio picked on validation."""

import pytest
import torch
import torch.nn.functional as F

from vlkit.adapt.clip_adapter import CLIPAdapter, fit_clip_adapter
from vlkit.errors import VlkitError

C, D, SCALE = 5, 32, 30.0


def _task(seed: int):
    """Images live near their class prototypes; the text classifier is a rotated,
    noisy copy, so a learned image-side map can do better than zero-shot."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    zs = F.normalize(protos + 3.0 * torch.randn(C, D, generator=g) / D**0.5, dim=-1)

    def draw(n, v=None):
        y = torch.arange(C).repeat_interleave(n)
        shape = (len(y), D) if v is None else (len(y), v, D)
        base = protos[y] if v is None else protos[y][:, None, :]
        return F.normalize(base + 0.6 * torch.randn(*shape, generator=g) / D**0.5, dim=-1), y

    return zs, draw(8, 2), draw(4), draw(40)


def _acc(logits, y):
    return (logits.argmax(1) == y).float().mean().item()


def test_ratio_zero_is_exactly_zero_shot():
    zs, _, _, (xte, _) = _task(0)
    model = CLIPAdapter(zs, SCALE, ratio=0.0)
    assert torch.equal(model(xte), SCALE * F.normalize(xte, dim=-1) @ zs.T)
    # bottleneck of a quarter of the width, no biases
    assert [tuple(p.shape) for p in model.adapter.parameters()] == [(D // 4, D), (D, D // 4)]


def test_training_beats_zero_shot_and_ratio_is_chosen_on_validation():
    zs, (xtr, ytr), (xva, yva), (xte, yte) = _task(1)
    model, res = fit_clip_adapter(xtr, ytr, xva, yva, zs, SCALE, ratios=(0.2, 0.6), epochs=30, lr=0.05, batch_size=8)
    assert res.val_accuracy == max(a for _, a in res.search) and model.ratio == res.ratio
    assert _acc(model(xva), yva) == pytest.approx(res.val_accuracy)
    assert dict(res.search)[0.2] < res.val_accuracy and res.ratio == 0.6  # not merely the first ratio
    assert _acc(model(xte), yte) > _acc(SCALE * xte @ zs.T, yte) + 0.2


def test_ratio_ties_go_to_the_smaller_ratio_in_any_listed_order(monkeypatch):
    """Correct validation images by ratio: 0.2 -> 3, 0.4 -> 5, 0.6 -> 5, 0.8 -> 4 of 8; listed
    high to low, the tie between 0.4 and 0.6 still keeps 0.4."""
    import vlkit.adapt.clip_adapter as ca

    zs, (xtr, ytr), _, _ = _task(4)
    yva = torch.arange(8) % C
    hits = {0.2: 3, 0.4: 5, 0.6: 5, 0.8: 4}

    class Scored(torch.nn.Module):
        def __init__(self, ratio):
            super().__init__()
            self.ratio = ratio

        def forward(self, x):  # right on the first hits[ratio] images, wrong on the rest
            pred = torch.where(torch.arange(len(x)) < hits[self.ratio], yva, (yva + 1) % C)
            return F.one_hot(pred, C).float()

    monkeypatch.setattr(ca, "_train_one", lambda *args, **kw: Scored(args[4]))
    model, res = fit_clip_adapter(xtr, ytr, torch.zeros(8, D), yva, zs, SCALE, ratios=(0.8, 0.6, 0.4, 0.2))
    assert res.ratio == 0.4 and model.ratio == 0.4 and res.val_accuracy == 5 / 8
    assert res.search == [(0.2, 3 / 8), (0.4, 5 / 8), (0.6, 5 / 8), (0.8, 4 / 8)]


def test_training_is_deterministic_for_a_seed():
    zs, (xtr, ytr), (xva, yva), (xte, _) = _task(2)
    kw = dict(ratios=(0.4,), epochs=3, lr=0.05, batch_size=8, seed=7)
    a, _ = fit_clip_adapter(xtr, ytr, xva, yva, zs, SCALE, **kw)
    b, _ = fit_clip_adapter(xtr, ytr, xva, yva, zs, SCALE, **kw)
    assert torch.equal(a(xte), b(xte))


def test_bad_inputs_name_the_input():
    zs, (xtr, ytr), (xva, yva), _ = _task(3)
    with pytest.raises(VlkitError, match="residual ratio"):
        CLIPAdapter(zs, SCALE, ratio=1.5)
    with pytest.raises(VlkitError, match="validation features"):
        fit_clip_adapter(xtr, ytr, xva[:0], yva[:0], zs, SCALE)
    with pytest.raises(VlkitError, match="train features"):
        fit_clip_adapter(xtr, ytr[:-1], xva, yva, zs, SCALE)

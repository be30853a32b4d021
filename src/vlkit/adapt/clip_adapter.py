"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with
Feature Adapters"), visual-branch variant.

A two-layer bottleneck MLP (reduction 4, no biases, ReLU after each layer) maps
the frozen image feature to a new one; the result is blended with the original
by a residual ratio r:  f' = r * adapter(f) + (1 - r) * f, then L2-normalised and
matched against the frozen zero-shot text classifier. With r = 0 the logits are
exactly the zero-shot logits. Only the adapter trains, so training runs on
cached image features (one random augmented view per shot per epoch).

The ratio is chosen on the few-shot validation split from `ratios` (the
official code fixes it at 0.2: `ratios=(0.2,)`). The learning rate follows a
cosine stepped per step without warm-up, or (`schedule="dassl"`, the Dassl
trainer the official code runs in) one constant warm-up epoch at 1e-5, then a
cosine stepped per epoch, as CoOp's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.adapt.coop import lr_at_epoch
from vlkit.errors import VlkitError

Schedule = Literal["step-cosine", "dassl"]
SCHEDULES: tuple[str, ...] = ("step-cosine", "dassl")


class CLIPAdapter(nn.Module):
    """Bottleneck adapter + residual blend + frozen text classifier."""

    def __init__(self, clip_weights: torch.Tensor, logit_scale: float, ratio: float = 0.2, reduction: int = 4) -> None:
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise VlkitError(f"residual ratio {ratio}: must lie in [0, 1]")
        dim = clip_weights.shape[1]
        self.adapter = nn.Sequential(
            nn.Linear(dim, max(1, dim // reduction), bias=False),
            nn.ReLU(),
            nn.Linear(max(1, dim // reduction), dim, bias=False),
            nn.ReLU(),
        )
        self.register_buffer("clip_weights", clip_weights.detach().float().clone())
        self.logit_scale = float(logit_scale)
        self.ratio = float(ratio)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        mixed = self.ratio * self.adapter(f) + (1.0 - self.ratio) * f
        return self.logit_scale * F.normalize(mixed, dim=-1) @ self.clip_weights.T

    logits = forward


@dataclass
class CLIPAdapterResult:
    ratio: float
    val_accuracy: float
    search: list[tuple[float, float]] = field(default_factory=list)
    epochs: int = 0


def _train_one(
    views: torch.Tensor,
    labels: torch.Tensor,
    clip_weights: torch.Tensor,
    logit_scale: float,
    ratio: float,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    schedule: Schedule,
) -> CLIPAdapter:
    torch.manual_seed(seed)  # adapter initialisation
    model = CLIPAdapter(clip_weights, logit_scale, ratio)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(views) / batch_size)
    opt = torch.optim.SGD(model.adapter.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if schedule == "step-cosine" else None
    for epoch in range(epochs):
        if sched is None:  # Dassl: set once per epoch
            for group in opt.param_groups:
                group["lr"] = lr_at_epoch(epoch, epochs, lr)
        order = torch.randperm(len(views), generator=gen)
        pick = torch.randint(views.shape[1], (len(views),), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(views[idx, pick[idx]]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()


def fit_clip_adapter(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    clip_weights: torch.Tensor,
    logit_scale: float,
    *,
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8),
    epochs: int = 200,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
    schedule: Schedule = "step-cosine",
) -> tuple[CLIPAdapter, CLIPAdapterResult]:
    """Train one adapter per residual ratio (SGD, momentum 0.9, weight decay 5e-4,
    the optimiser of the Dassl recipe CoOp and CLIP-Adapter share; lr by `schedule`)
    and keep the ratio with the best validation accuracy, compared as exact counts of
    correct validation images (ties: the smaller ratio, whatever order `ratios` lists
    them in). `train_features` is [N, D] or [N, views, D]."""
    views = train_features.float()
    views = views[:, None, :] if views.ndim == 2 else views
    labels = torch.as_tensor(train_labels).long()
    val_labels = torch.as_tensor(val_labels).long()
    if views.ndim != 3 or len(views) == 0 or len(labels) != len(views):
        raise VlkitError(f"train features {tuple(train_features.shape)}: need [N, D] or [N, views, D] and N labels")
    if len(val_features) == 0 or len(val_labels) != len(val_features):
        raise VlkitError("validation features: CLIP-Adapter picks its ratio on a non-empty few-shot validation split")
    if not ratios:
        raise VlkitError("ratios: give at least one residual ratio to try")
    if schedule not in SCHEDULES:
        raise VlkitError(f"schedule {schedule!r}: unknown; use one of {', '.join(SCHEDULES)}")
    best: tuple[int, CLIPAdapter, float] | None = None
    search = []
    for ratio in sorted(ratios):
        model = _train_one(
            views, labels, clip_weights, logit_scale, ratio, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule=schedule
        )
        with torch.no_grad():
            correct = int((model(val_features).argmax(1) == val_labels).sum())
        search.append((ratio, correct / len(val_labels)))
        if best is None or correct > best[0]:
            best = (correct, model, ratio)
    correct, model, ratio = best
    return model, CLIPAdapterResult(ratio, correct / len(val_labels), search, epochs)

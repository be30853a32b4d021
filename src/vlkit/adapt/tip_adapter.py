"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free
Adaption of CLIP for Few-shot Classification").

A key-value cache built from the few-shot training features: keys are the
L2-normalised image features of the shots, values their one-hot labels. A test
feature f gets

    logits = logit_scale * f W^T + alpha * exp(-beta * (1 - f K^T)) V

where W holds the zero-shot text classifier. alpha weighs the cache against the
zero-shot prior, beta sharpens the affinities. With alpha = 0 the logits are
exactly the zero-shot logits. Tip-Adapter-F additionally fine-tunes the keys.

Every hyper-parameter (alpha, beta, and Tip-Adapter-F's best epoch) is chosen on
the few-shot validation split; the reference code picks the epoch on the test
set, which vlkit does not do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.errors import VlkitError


def _views(train_features: torch.Tensor) -> torch.Tensor:
    """Accept [N, D] or [N, V, D] (augmented views); return [N, V, D] float32."""
    x = train_features.float()
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[0] == 0:
        raise VlkitError(f"train features {tuple(train_features.shape)}: need [N, D] or [N, views, D] with N > 0")
    return x


def build_cache(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache keys (the per-shot mean over augmented views, L2-normalised, as the
    paper averages its augmentation epochs; given raw, unnormalised views this is
    exactly the official key) and one-hot values."""
    x = _views(train_features)
    labels = torch.as_tensor(train_labels).long()
    if len(labels) != len(x):
        raise VlkitError(f"train labels: {len(labels)} labels for {len(x)} feature rows; give one label per shot")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise VlkitError(f"train labels: values must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}")
    keys = F.normalize(x.mean(dim=1), dim=-1)
    values = F.one_hot(labels, num_classes).float()
    return keys, values


class TipAdapter(nn.Module):
    """The cache model. `keys` is a parameter so Tip-Adapter-F can train it."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        clip_weights: torch.Tensor,
        logit_scale: float,
        alpha: float = 1.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        if clip_weights.shape[0] != values.shape[1] or clip_weights.shape[1] != keys.shape[1]:
            raise VlkitError(
                f"zero-shot weights {tuple(clip_weights.shape)}: need [classes={values.shape[1]}, dim={keys.shape[1]}]"
            )
        self.keys = nn.Parameter(keys.detach().clone().float())
        self.register_buffer("values", values.float())
        self.register_buffer("clip_weights", clip_weights.detach().float().clone())
        self.logit_scale = float(logit_scale)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def clip_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ self.clip_weights.T

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1) @ self.keys.T

    def cache_logits(self, features: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        beta = self.beta if beta is None else beta
        return torch.exp(-beta * (1.0 - self.affinity(features))) @ self.values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.clip_logits(features)
        if self.alpha == 0.0:
            return logits
        return logits + self.alpha * self.cache_logits(features)

    logits = forward


@dataclass
class SearchResult:
    """The chosen (alpha, beta) and their validation accuracy; for Tip-Adapter-F also the
    kept epoch (0: the untrained cache) and the validation accuracy after every epoch
    (index 0 before training) at the initial alpha and beta, which chose it."""

    alpha: float
    beta: float
    val_accuracy: float
    epoch: int = 0
    epoch_val_accuracy: tuple[float, ...] = ()


@torch.no_grad()
def search_alpha_beta(
    model: TipAdapter,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    beta_range: tuple[float, float, int] = (0.1, 7.0, 200),
    alpha_range: tuple[float, float, int] = (0.1, 3.0, 20),
    endpoint: bool = True,
) -> SearchResult:
    """Grid search of (alpha, beta) on validation features, as the paper's
    `search_hp`: beta outer, alpha inner, both ascending, and only a strictly larger
    count of correct validation images (an exact integer, not a float accuracy)
    replaces the best, so ties go to the smallest beta, then the smallest alpha.
    Each range (lo, hi, n) is n evenly spaced values from lo to hi; the official
    grid (`endpoint=False`) stops one step short of hi. Sets them on `model`."""
    labels = torch.as_tensor(val_labels).long()
    if len(val_features) == 0 or len(labels) != len(val_features):
        raise VlkitError(
            f"validation features: {len(val_features)} rows, {len(labels)} labels; Tip-Adapter searches alpha/beta "
            "on a non-empty few-shot validation split with one label per row"
        )
    clip = model.clip_logits(val_features)
    aff = model.affinity(val_features)
    best, best_correct = SearchResult(model.alpha, model.beta, 0.0), -1
    for beta in np.linspace(*beta_range[:2], int(beta_range[2]), endpoint=endpoint):
        cache = torch.exp(-float(beta) * (1.0 - aff)) @ model.values
        for alpha in np.linspace(*alpha_range[:2], int(alpha_range[2]), endpoint=endpoint):
            correct = int(((clip + float(alpha) * cache).argmax(1) == labels).sum())
            if correct > best_correct:
                best, best_correct = SearchResult(float(alpha), float(beta), correct / len(labels)), correct
    model.alpha, model.beta = best.alpha, best.beta
    return best


def fit_tip_adapter(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    clip_weights: torch.Tensor,
    logit_scale: float,
    **search: Any,
) -> tuple[TipAdapter, SearchResult]:
    """Training-free Tip-Adapter: build the cache, search alpha/beta on validation."""
    keys, values = build_cache(train_features, train_labels, clip_weights.shape[0])
    model = TipAdapter(keys, values, clip_weights, logit_scale)
    return model, search_alpha_beta(model, val_features, val_labels, **search)


def fit_tip_adapter_f(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    clip_weights: torch.Tensor,
    logit_scale: float,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    init_alpha: float = 1.0,
    init_beta: float = 1.0,
    seed: int = 0,
    **search: Any,
) -> tuple[TipAdapter, SearchResult]:
    """Tip-Adapter-F: fine-tune the cache keys with AdamW (lr 1e-3, eps 1e-4,
    cosine schedule), one random augmented view per shot per epoch; keep the keys
    of the epoch with the best validation accuracy (at `init_alpha`, `init_beta`;
    the untrained cache counts as epoch 0; epochs compare counts of correct
    validation images and ties go to the earliest epoch), then search alpha/beta on
    validation."""
    views = _views(train_features)
    labels = torch.as_tensor(train_labels).long()
    keys, values = build_cache(views, labels, clip_weights.shape[0])
    model = TipAdapter(keys, values, clip_weights, logit_scale, init_alpha, init_beta)
    val_labels = torch.as_tensor(val_labels).long()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(views) / batch_size)
    opt = torch.optim.AdamW([model.keys], lr=lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps_per_epoch))

    def val_correct() -> int:
        with torch.no_grad():
            return int((model(val_features).argmax(1) == val_labels).sum())

    history = [val_correct()]
    best_epoch, best_keys = 0, model.keys.detach().clone()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(views), generator=gen)
        pick = torch.randint(views.shape[1], (len(views),), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            feats = F.normalize(views[idx, pick[idx]], dim=-1)
            loss = F.cross_entropy(model(feats), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        history.append(val_correct())
        if history[-1] > history[best_epoch]:
            best_epoch, best_keys = epoch, model.keys.detach().clone()
    with torch.no_grad():
        model.keys.copy_(best_keys)
    found = search_alpha_beta(model, val_features, val_labels, **search)
    found.epoch, found.epoch_val_accuracy = best_epoch, tuple(k / len(val_labels) for k in history)
    return model, found

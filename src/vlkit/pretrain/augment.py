"""Batched image augmentation on tensors (no torchvision): random resized crop and flip.

All random parameters of a global batch are drawn up front from one generator, so
a rank that augments only its slice gets exactly what a single process would.
The crop is an affine resampling (bilinear, border padding) of the whole batch
in one `grid_sample` call: cheap enough for CPU training.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def draw_params(
    n: int,
    g: torch.Generator,
    scale: Sequence[float] = (0.6, 1.0),
    ratio: Sequence[float] = (0.8, 1.25),
    flip: bool = True,
) -> torch.Tensor:
    """[n, 5] = (crop width, crop height, centre x, centre y, flip sign), in [-1, 1] units."""
    area = torch.empty(n, dtype=torch.float64).uniform_(scale[0], scale[1], generator=g)
    log_r = torch.empty(n, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (1 - h)
    coin = torch.rand(n, generator=g, dtype=torch.float64)
    sign = torch.where((coin < 0.5) & flip, -1.0, 1.0).to(torch.float64)
    return torch.stack([w, h, cx, cy, sign], dim=1).float()


def apply(images: torch.Tensor, params: torch.Tensor, flip_ok: torch.Tensor | None = None) -> torch.Tensor:
    """Crop-resize-flip float images [B, 3, S, S] per `params`; rows with flip_ok False are not flipped."""
    w, h, cx, cy, sign = params.to(device=images.device, dtype=images.dtype).unbind(1)
    if flip_ok is not None:
        sign = torch.where(flip_ok.to(images.device), sign, torch.ones_like(sign))
    theta = torch.zeros(images.shape[0], 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def draw_color(n: int, g: torch.Generator, strength: float) -> torch.Tensor:
    """[n, 3] brightness, contrast and saturation factors, uniform in [1 - s, 1 + s]."""
    return 1.0 + (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1).float() * strength


def apply_color(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Jitter brightness, contrast and saturation of images in [0, 1]; hue is kept (emoji colours are names)."""
    f = factors.to(device=x.device, dtype=x.dtype)
    b, c, s = (f[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey) * s + grey
    return x.clamp(0.0, 1.0)


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, S, S] (or float already in [0, 1]) -> float, standardised per channel."""
    x = images_uint8.float() / 255.0 if images_uint8.dtype == torch.uint8 else images_uint8
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s

"""Cached image features of several augmented views per training image.

CoOp trains only the context vectors; the image tower is frozen, so an image's
feature depends on nothing but its augmentation. The reference code still runs
the image tower on every training step. vlkit encodes `views` augmented views of
each training image once (random resized crop + horizontal flip, as CoOp's
recipe) and a training step samples one cached view per image, so a step runs
only the text tower. Flip can be turned off for images whose meaning flips with
them (flags, text, arrows).

The augmentation is CoOp's `random_resized_crop` (scale 0.08-1, ratio 3/4-4/3,
bicubic, output a square of the model's input size) and `random_flip`, driven by
a seeded generator so the same seed gives the same views.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from vlkit.adapt import DEFAULT_VIEWS
from vlkit.models.base import VLModel


@dataclass(frozen=True)
class AugmentOptions:
    """How training views are drawn. `views` augmented views are cached per image."""

    views: int = DEFAULT_VIEWS
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def crop_box(width: int, height: int, opts: AugmentOptions, gen: torch.Generator) -> tuple[int, int, int, int]:
    """A random-resized-crop box (left, top, right, bottom), torchvision's sampling rule.

    Ten tries at a box of random area and log-uniform aspect ratio that fits; else
    the largest centre box within the ratio range.
    """
    area = width * height
    log_lo, log_hi = math.log(opts.ratio[0]), math.log(opts.ratio[1])
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(opts.scale[0], opts.scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_lo, log_hi, generator=gen)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < opts.ratio[0]:
        w, h = width, int(round(width / opts.ratio[0]))
    elif in_ratio > opts.ratio[1]:
        h, w = height, int(round(height * opts.ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment(image: Image.Image, size: int, opts: AugmentOptions, gen: torch.Generator) -> Image.Image:
    """One training view: random resized crop to size x size (bicubic), then maybe a flip."""
    box = crop_box(image.width, image.height, opts, gen)
    view = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    # Draw the flip coin even when flipping is off, so views stay aligned across settings.
    coin = float(torch.rand(1, generator=gen))
    if opts.flip and coin < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


def _open(item: str | os.PathLike | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    from vlkit.data.images import load_image

    return load_image(item)


def _cache_key(model: VLModel, images: Sequence[str | os.PathLike], opts: AugmentOptions) -> str:
    files = []
    for p in images:
        st = os.stat(p)
        files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {"model": model.fingerprint(), "preprocess": model.preprocess.describe(), "augment": opts.to_dict(), "files": files},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@torch.no_grad()
def augmented_features(
    model: VLModel,
    images: Sequence[str | os.PathLike | Image.Image],
    opts: AugmentOptions = AugmentOptions(),
    *,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    raw: bool = False,
) -> torch.Tensor:
    """Normalised features [N, views, D] (float32, CPU) of `opts.views` augmented views per image.

    raw: return the image tower's features before L2 normalisation instead (Tip-Adapter's
        official cache averages those); the cache stores the normalised features plus
        each view's norm, so both forms come from one entry.
    With `cache_dir` (and images given as paths) the tensor is stored there as
    safetensors keyed by model fingerprint, preprocessing, augmentation options and
    each file's size and mtime, so a rerun skips the image tower entirely.
    """
    disk = None
    if cache_dir is not None and images and not any(isinstance(i, Image.Image) for i in images):
        disk = Path(cache_dir) / "coop-views" / f"{_cache_key(model, images, opts)}.safetensors"  # type: ignore[arg-type]
        if disk.is_file():
            from safetensors.torch import load_file

            try:
                cached = load_file(str(disk))
                feats = cached["features"]
                if feats.shape[:2] == (len(images), opts.views):
                    if not raw:
                        return feats
                    if "norms" in cached:  # entries written before norms were kept are recomputed
                        return feats * cached["norms"][..., None]
            except Exception:  # a damaged cache entry is recomputed and overwritten
                pass

    gen = torch.Generator().manual_seed(opts.seed)
    size = int(model.preprocess.image_size)
    device = model.device
    out = torch.empty(len(images), opts.views, model.embed_dim)
    pending: list[torch.Tensor] = []
    slots: list[tuple[int, int]] = []

    def flush() -> None:
        feats = model.encode_image(torch.stack(pending).to(device), normalize=False).float().cpu()
        for (i, v), f in zip(slots, feats):
            out[i, v] = f
        pending.clear()
        slots.clear()

    iterator = range(len(images))
    if progress:
        from rich.progress import track

        iterator = track(iterator, description="encoding augmented views")
    for i in iterator:
        image = _open(images[i])
        for v in range(opts.views):
            pending.append(model.preprocess(augment(image, size, opts, gen)))
            slots.append((i, v))
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()
    norms = out.norm(dim=-1)
    normed = torch.nn.functional.normalize(out, dim=-1)
    if disk is not None:
        from vlkit import io

        io.save_safetensors(disk, {"features": normed, "norms": norms}, metadata={"augment": json.dumps(opts.to_dict())})
    return out if raw else normed

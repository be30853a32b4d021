"""Image loading that survives real-world files.

Real folders hold truncated downloads, zero-byte files, text saved as `.png`,
CMYK JPEGs, 16-bit scans, palette and alpha artwork, 1x1 pixels and PNGs of
hundreds of megapixels. `load_image` turns every one of them into either an RGB
`PIL.Image` or a `BadImage` with a short reason, so a run can skip and report
the file instead of crashing, hanging or silently feeding garbage (black where
alpha was, white where a 16-bit image was clipped) to a model.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vlkit.errors import VlkitError

# File extensions treated as images when scanning folders (lower case, with dot).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)

# Largest image decoded at full size. 100 MP is above any camera photo; a larger
# JPEG is decoded at 1/2, 1/4 or 1/8 scale (bounded memory), anything else refused.
DEFAULT_MAX_PIXELS = 100_000_000

# Alpha is composited onto this colour: white matches how artwork (emoji,
# clip-art) is shown, and a fixed colour keeps features deterministic.
DEFAULT_BACKGROUND = (255, 255, 255)

_OPEN_LOCK = threading.Lock()


class BadImage(VlkitError):
    """A file that cannot be used as an image; `reason` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (the file is not opened)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def load_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Decode `path` into an RGB image, or raise `BadImage(path, reason)`.

    The header is read first: an image over `max_pixels` is decoded at reduced
    scale when the format allows it (JPEG) and refused otherwise, so a
    decompression bomb costs a header read, not gigabytes. EXIF orientation is
    applied; alpha is composited onto `background`; 16-bit and float images are
    rescaled to 8 bits rather than clipped. `background=None` keeps transparency
    (an RGBA image, RGB when opaque) for preprocessing that applies its own
    alpha policy, e.g. open_clip's resize-then-`convert("RGB")`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except OSError as e:
        raise BadImage(path, f"cannot read file ({e.strerror or e})") from None
    if not path.is_file():
        raise BadImage(path, "not a regular file")
    if size == 0:
        raise BadImage(path, "empty file (0 bytes)")

    im = _open_header(path)
    try:
        _bound_pixels(path, im, max_pixels)
        try:
            im.load()
            im = _apply_exif_orientation(im)
            return _to_rgb(path, im, background)
        except BadImage:
            raise
        except MemoryError:
            raise BadImage(path, f"out of memory decoding {im.size[0]}x{im.size[1]} image") from None
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib/struct errors...
            raise BadImage(path, f"cannot decode {im.format or 'image'}: {_short(e)}") from None
    finally:
        im.close()


def _open_header(path: Path) -> Image.Image:
    """Identify the file and read its header without PIL's global bomb check.

    PIL refuses (or warns about) large images inside `Image.open`, before we can
    see the size; vlkit applies its own `max_pixels` policy instead, so the check
    is switched off for the header read only. The lock keeps the switch from
    racing with other loader threads.
    """
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        except Image.UnidentifiedImageError:
            kind = _sniff(path)
            reason = f"corrupt {kind} header" if kind else "not an image (unrecognised format)"
            raise BadImage(path, reason) from None
        except Exception as e:
            raise BadImage(path, f"cannot read header: {_short(e)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _bound_pixels(path: Path, im: Image.Image, max_pixels: int) -> None:
    """Refuse, or arrange a reduced-scale decode for, images above `max_pixels`."""
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImage(path, f"invalid size {w}x{h}")
    pixels = w * h
    if pixels <= max_pixels:
        return
    if im.format == "JPEG":
        for scale in (2, 4, 8):
            if pixels / (scale * scale) <= max_pixels:
                # draft picks the largest DCT scale whose output is >= the requested size
                im.draft(im.mode, (-(-w // scale), -(-h // scale)))
                if im.size[0] * im.size[1] <= max_pixels:
                    return
                break
    raise BadImage(
        path,
        f"too large: {w}x{h} = {pixels / 1e6:.0f} MP exceeds max_pixels={max_pixels / 1e6:g} MP "
        "(decompression-bomb guard; raise max_pixels to load it)",
    )


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate camera photos upright; a broken EXIF block is ignored, not fatal."""
    try:
        if im.getexif().get(0x0112, 1) in (1, None):
            return im
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _to_rgb(path: Path, im: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """Any PIL mode -> RGB (RGBA when `background` is None and alpha is used), keeping what the pixels mean."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        im = _high_depth_to_grey(im)
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # fully opaque: nothing to composite
            return rgba.convert("RGB")
        if background is None:
            return rgba
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        raise BadImage(path, f"unsupported colour mode {im.mode}") from None


def _high_depth_to_grey(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit L (or LA when a colour key is set).

    PIL's own conversion clips everything above 255 to white; scale instead.
    """
    arr = np.asarray(im)
    if im.mode == "F":
        values = arr.astype(np.float64)
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 0.0
        values = np.nan_to_num(values, nan=0.0)
        scaled = values * 255.0 if top <= 1.0 else values
    else:
        values = arr.astype(np.float64)
        top = float(values.max()) if values.size else 0.0
        if im.mode.startswith("I;16") or 255 < top <= 65535:
            scaled = values / 257.0
        elif top > 65535:
            scaled = values * (255.0 / top)
        else:
            scaled = values
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    transparency = im.info.get("transparency")
    if isinstance(transparency, int):
        alpha = Image.fromarray(np.where(arr == transparency, 0, 255).astype(np.uint8))
        grey = Image.merge("LA", (grey, alpha))
    return grey


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(path: Path) -> str | None:
    """The format a file claims by its magic bytes, to tell "corrupt PNG" from "not an image"."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _short(e: BaseException, limit: int = 120) -> str:
    """One line of an exception message, trimmed for a skip list."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

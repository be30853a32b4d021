"""Image loading that survives real-world files.

Real folders hold truncated downloads, zero-byte files, text saved as `.png`,
CMYK JPEGs, 16-bit scans, palette and alpha artwork, 1x1 pixels and PNGs of
hundreds of megapixels. `load_image` turns every one of them into either an RGB
`PIL.Image` or a `BadImage` with a short reason, so a run can skip and report
the file instead of crashing, hanging or silently feeding garbage (black where
alpha was, white where a 16-bit image was clipped) to a model.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Sequence

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


# What went wrong, for callers that answer differently per kind (the server's HTTP codes).
MISSING, NOT_A_FILE, EMPTY, NOT_AN_IMAGE, TOO_LARGE, CORRUPT = "missing", "not-a-file", "empty", "not-an-image", "too-large", "corrupt"


class BadImage(VlkitError):
    """A file that cannot be used as an image; `reason` says why in a few words, `kind` which class of problem."""

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = CORRUPT) -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across process pools
        return (BadImage, (self.path, self.reason, self.kind))


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (the file is not opened)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


ImageSource = str | os.PathLike | bytes | bytearray | memoryview


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = DEFAULT_BACKGROUND,
    *,
    name: str | None = None,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode `source` (a path, or the bytes of an upload) into an RGB image, or raise `BadImage`.

    This is vlkit's one road from a file to pixels: every command, the feature
    extractor and the server call it, so a file is judged the same way everywhere.
    The header is read first: an image over `max_pixels` is decoded at reduced
    scale when the format allows it (JPEG) and refused otherwise, so a
    decompression bomb costs a header read, not gigabytes. EXIF orientation is
    applied; alpha is composited onto `background`; 16-bit and float images are
    rescaled to 8 bits rather than clipped. `background=None` keeps transparency
    (an RGBA image, RGB when opaque) for preprocessing that applies its own
    alpha policy, e.g. open_clip's resize-then-`convert("RGB")`. `name` labels
    bytes in messages (default "upload"). `formats` restricts the PIL formats tried
    (e.g. a server's accepted uploads); by default every raster format PIL reads
    except EPS, which PIL renders by running Ghostscript.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "upload"
        data = bytes(source)
        if not data:
            raise BadImage(label, "empty file (0 bytes)", EMPTY)
        fp: IO[bytes] | Path = io.BytesIO(data)
        head = data[:512]
    else:
        label = name or os.fspath(source)
        fp = Path(source)
        _check_file(fp, label)
        head = _head(fp)
    im = _open_header(fp, label, head, formats)
    try:
        _bound_pixels(label, im, max_pixels)
        try:
            im.load()
            im = _apply_exif_orientation(im)
            return _to_rgb(label, im, background)
        except BadImage:
            raise
        except MemoryError:
            raise BadImage(label, f"out of memory decoding {im.size[0]}x{im.size[1]} image", TOO_LARGE) from None
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib/struct errors...
            raise BadImage(label, f"cannot decode {im.format or 'image'}: {_short(e)}") from None
    finally:
        im.close()


def probe_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str | None = None) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, or `BadImage` as `load_image` would say it.

    For checking a query image before a model is loaded: everything but the pixel
    data is judged (missing, folder, link loop, empty, not an image, too large).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, fp, head = name or "upload", io.BytesIO(bytes(source)), bytes(source[:512])
        if not head:
            raise BadImage(label, "empty file (0 bytes)", EMPTY)
    else:
        label, fp = name or os.fspath(source), Path(source)
        _check_file(fp, label)
        head = _head(fp)
    im = _open_header(fp, label, head)
    try:
        w, h = im.size
        _bound_pixels(label, im, max_pixels)
        return str(im.format), w, h
    finally:
        im.close()


def _check_file(path: Path, label: str) -> None:
    """A path must name a readable, non-empty regular file; say precisely what it is otherwise.

    Checked before opening: opening a FIFO would block, a folder or a link loop has
    no bytes. Why a path does not lead to a file (a loop, a dangling link) is told by
    `vlkit.data.paths.check_path`, the one place that judges paths.
    """
    try:
        st = path.stat()
    except OSError as e:
        from vlkit.data.paths import check_path

        reason = check_path(path) or f"cannot read file ({e.strerror or e})"
        raise BadImage(label, reason, MISSING) from None
    if path.is_dir():
        raise BadImage(label, "is a folder, not an image file", NOT_A_FILE)
    if not path.is_file():
        raise BadImage(label, "not a regular file", NOT_A_FILE)
    if st.st_size == 0:
        raise BadImage(label, "empty file (0 bytes)", EMPTY)


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except OSError:
        return b""


def readable_images(
    paths: Sequence[str | os.PathLike], max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split `paths` into those `load_image` decodes and (path, reason) for the rest, input order kept.

    For code that must know the good files before it starts (a training run whose
    classes must each keep an image); decoding is done, not guessed from headers.
    """
    names = [os.fspath(p) for p in paths]

    def check(name: str) -> str | None:
        try:
            load_image(name, max_pixels=max_pixels).close()
            return None
        except BadImage as e:
            return e.reason

    if workers > 1 and len(names) > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlkit-check") as pool:
            reasons = list(pool.map(check, names))
    else:
        reasons = [check(n) for n in names]
    ok = [n for n, r in zip(names, reasons) if r is None]
    return ok, [(n, r) for n, r in zip(names, reasons) if r is not None]


def _default_formats() -> list[str]:
    Image.init()
    return [f for f in Image.OPEN if f not in _EXTERNAL_PROGRAM_FORMATS]


# Formats PIL decodes by running another program: never on files vlkit is handed.
_EXTERNAL_PROGRAM_FORMATS = frozenset({"EPS"})


def _open_header(fp: "Path | IO[bytes]", label: str, head: bytes, formats: Sequence[str] | None = None) -> Image.Image:
    """Identify the file and read its header without PIL's global bomb check.

    PIL refuses (or warns about) large images inside `Image.open`, before we can
    see the size; vlkit applies its own `max_pixels` policy instead, so the check
    is switched off for the header read only. The lock keeps the switch from
    racing with other loader threads, and every image vlkit opens comes through
    here, so no other vlkit code can open an image while the check is off.
    """
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(fp, formats=list(formats) if formats is not None else _default_formats())
        except Image.UnidentifiedImageError:
            kind = _sniff(head)
            if formats is not None and kind and kind.upper() not in formats and kind not in _VECTOR_OR_TEXT:
                raise BadImage(label, f"a {kind} image; accepted formats: {', '.join(formats)}", NOT_AN_IMAGE) from None
            if kind in _VECTOR_OR_TEXT:
                hint = "not an image" if kind == "an HTML file" else "not a raster image (rasterise it to PNG first)"
                raise BadImage(label, f"{kind}, {hint}", NOT_AN_IMAGE) from None
            if kind:
                raise BadImage(label, f"corrupt {kind} header", CORRUPT) from None
            raise BadImage(label, "not an image (unrecognised format)", NOT_AN_IMAGE) from None
        except Exception as e:
            raise BadImage(label, f"cannot read header: {_short(e)}", CORRUPT) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _bound_pixels(path: str, im: Image.Image, max_pixels: int) -> None:
    """Refuse, or arrange a reduced-scale decode for, images above `max_pixels`."""
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImage(path, f"invalid size {w}x{h}", CORRUPT)
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
        TOO_LARGE,
    )


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate camera photos upright; a broken EXIF block is ignored, not fatal."""
    try:
        if im.getexif().get(0x0112, 1) in (1, None):
            return im
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _to_rgb(path: str, im: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
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
        raise BadImage(path, f"unsupported colour mode {im.mode}", CORRUPT) from None


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


_VECTOR_OR_TEXT = ("an SVG file", "an HTML file", "a PDF file")


def _sniff(head: bytes) -> str | None:
    """The format a file claims by its magic bytes, to tell "corrupt PNG" from "not an image"."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith(b"%PDF"):
        return "a PDF file"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG file"
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML file"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _short(e: BaseException, limit: int = 120) -> str:
    """One line of an exception message, trimmed for a skip list."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

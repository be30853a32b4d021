"""Fixed-size square thumbnails on a white background, written as PNG.

Every built image has the same size and background so that features never
depend on a source's canvas size or on what a decoder does with alpha. Raster
sources go through `vlkit.data.images.load_image` (bounded memory: an image
over `max_pixels` is refused from its header, never decoded); SVG sources are
rasterised with resvg (the `svg` extra).
"""

from __future__ import annotations

import io as _io
from pathlib import Path

from PIL import Image

from vlkit import io
from vlkit.data.images import BadImage, load_image
from vlkit.errors import VlkitError

THUMB_SIZE = 64
BACKGROUND = (255, 255, 255)
# Above this a PNG is skipped (counted, not decoded): 100 MP of RGBA is 400 MB.
MAX_PIXELS = 100_000_000


def square(im: Image.Image, size: int = THUMB_SIZE) -> Image.Image:
    """Fit an RGB image inside size x size (aspect kept) and centre it on the background."""
    im = im.copy() if im.size == (size, size) else im
    if im.size != (size, size):
        im.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if im.size == (size, size):
        return im
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def save_png(im: Image.Image, path: Path) -> None:
    """Write atomically, so an interrupted build never leaves a torn thumbnail behind."""
    with io.atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def raster_thumbnail(src: Path, dst: Path, size: int = THUMB_SIZE, max_pixels: int = MAX_PIXELS) -> None:
    """Thumbnail a raster image; raises `BadImage` (e.g. over `max_pixels`) without writing."""
    im = load_image(src, max_pixels=max_pixels, background=BACKGROUND)
    save_png(square(im, size), dst)


def svg_thumbnail(src: Path, dst: Path, size: int = THUMB_SIZE) -> None:
    """Rasterise an SVG straight at the target size onto the background."""
    try:
        import resvg_py
    except ImportError:
        raise VlkitError(
            f"{src}: rendering SVG needs resvg; install the svg extra (`pip install 'vlkit[svg]'`)"
        ) from None
    try:
        png = resvg_py.svg_to_bytes(svg_path=str(src), width=size, height=size, background="#ffffff")
    except ValueError as e:
        raise BadImage(src, f"cannot render SVG ({e})") from None
    im = Image.open(_io.BytesIO(bytes(png)))
    im.load()
    flat = Image.new("RGB", im.size, BACKGROUND)
    flat.paste(im, mask=im.getchannel("A") if im.mode == "RGBA" else None)
    save_png(square(flat, size), dst)

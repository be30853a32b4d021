"""load_image: every real-world file becomes RGB pixels that mean the same thing, or a BadImage."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkit.data.images import DEFAULT_BACKGROUND, BadImage, is_image_file, load_image
from vlkit.errors import VlkitError


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_huge_png(path: Path, width: int = 32768, height: int = 20000) -> Path:
    """A valid 1-bit all-black PNG of width*height pixels (655 MP by default).

    Written by hand, a block of zero rows at a time, so it costs ~80 kB of disk
    and well under a second, yet its header is exactly what a real giant scan says.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows_per_block = 1000
    parts = [comp.compress(row * rows_per_block) for _ in range(height // rows_per_block)]
    parts.append(comp.compress(row * (height % rows_per_block)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")
    )
    return path


def make_truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is intact but whose scan data stops at 60%."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    return make_huge_png(tmp_path_factory.mktemp("huge") / "huge.png")


# ------------------------------------------------------------------ colour modes


def test_rgb_roundtrip_and_tiny(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    im = load_image(tmp_path / "one.png")
    assert im.mode == "RGB" and im.size == (1, 1) and im.getpixel((0, 0)) == (1, 2, 3)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg", quality=100)  # pure magenta ink
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 245 and g < 10 and b > 245


def test_16bit_grey_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 100, 65535, 257 * 200]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    im = load_image(tmp_path / "g16.png")
    assert [im.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255), (200, 200, 200)]


def test_32bit_int_and_float_images(tmp_path):
    Image.fromarray(np.array([[0, 257 * 50]], dtype=np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert load_image(tmp_path / "i32.tif").getpixel((1, 0)) == (50, 50, 50)
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    im = load_image(tmp_path / "f.tif")
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_transparency_uses_background(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)  # red, opaque
    pal.putpixel((1, 0), 1)  # blue, but index 1 is transparent
    pal.save(tmp_path / "p.png", transparency=1)
    im = load_image(tmp_path / "p.png")
    assert im.getpixel((0, 0)) == (255, 0, 0)
    assert im.getpixel((1, 0)) == DEFAULT_BACKGROUND  # not blue, not black
    pal.save(tmp_path / "p.gif", transparency=1)
    assert load_image(tmp_path / "p.gif").getpixel((1, 0)) == DEFAULT_BACKGROUND


def test_opaque_palette_keeps_colours(tmp_path):
    pal = Image.new("P", (1, 1))
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)


def test_alpha_is_composited_on_background(tmp_path):
    Image.new("RGBA", (2, 2), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGBA", (2, 2), (0, 0, 0, 128)).save(tmp_path / "half.png")
    Image.new("LA", (2, 2), (0, 128)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # hidden red stays hidden
    assert load_image(tmp_path / "half.png").getpixel((0, 0)) == (127, 127, 127)  # 50% black over white
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (127, 127, 127)
    grey_bg = load_image(tmp_path / "clear.png", background=(10, 20, 30)).getpixel((0, 0))
    assert grey_bg == (10, 20, 30)


def test_colour_key_transparency_in_rgb_and_grey_png(tmp_path):
    rgb = Image.new("RGB", (2, 1), (0, 0, 0))
    rgb.putpixel((1, 0), (9, 8, 7))
    rgb.save(tmp_path / "key.png", transparency=(0, 0, 0))  # tRNS: black means transparent
    im = load_image(tmp_path / "key.png", background=(50, 60, 70))
    assert im.getpixel((0, 0)) == (50, 60, 70) and im.getpixel((1, 0)) == (9, 8, 7)
    grey = Image.new("L", (2, 1), 0)
    grey.putpixel((1, 0), 200)
    grey.save(tmp_path / "gkey.png", transparency=0)
    im = load_image(tmp_path / "gkey.png", background=(50, 60, 70))
    assert im.getpixel((0, 0)) == (50, 60, 70) and im.getpixel((1, 0)) == (200, 200, 200)
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "k16.png", transparency=0)
    im = load_image(tmp_path / "k16.png", background=(50, 60, 70))  # 16-bit grey with a colour key
    assert im.getpixel((0, 0)) == (50, 60, 70) and im.getpixel((1, 0)) == (255, 255, 255)


def test_background_none_keeps_transparency(tmp_path):
    Image.new("LA", (2, 2), (40, 0)).save(tmp_path / "la.png")
    im = load_image(tmp_path / "la.png", background=None)
    assert im.mode == "RGBA" and im.getpixel((0, 0)) == (40, 40, 40, 0)
    Image.new("RGBA", (2, 2), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    assert load_image(tmp_path / "opaque.png", background=None).mode == "RGB"


def test_opaque_rgba_and_bilevel(tmp_path):
    Image.new("RGBA", (2, 2), (5, 6, 7, 255)).save(tmp_path / "o.png")
    assert load_image(tmp_path / "o.png").getpixel((1, 1)) == (5, 6, 7)
    Image.new("1", (2, 2), 1).save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    im = load_image(tmp_path / "rot.jpg")
    assert im.size == (2, 4)
    assert im.getpixel((1, 0))[0] > 200  # top-left white pixel moved to the top-right


# ------------------------------------------------------------------ bad files


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not an image"), "not an image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "corrupt PNG header"),
    ],
    ids=["zero-byte", "text-as-png", "png-signature-junk"],
)
def test_bad_files_raise_badimage_with_reason(tmp_path, make, reason):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(BadImage) as info:
        load_image(path)
    assert reason in info.value.reason
    assert str(path) in str(info.value) and isinstance(info.value, VlkitError)


def test_truncated_jpeg_is_bad_not_grey(tmp_path):
    with pytest.raises(BadImage, match="truncated"):
        load_image(make_truncated_jpeg(tmp_path / "t.jpg"))


def test_missing_and_directory(tmp_path):
    with pytest.raises(BadImage, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(BadImage, match="is a folder, not an image file"):
        load_image(tmp_path)


def test_huge_png_is_refused_quickly_from_its_header(huge_png):
    before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with pytest.raises(BadImage) as info:
        load_image(huge_png)
    assert time.perf_counter() - start < 2.0
    assert "32768x20000" in info.value.reason and "too large" in info.value.reason
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global setting is left as it was


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    Image.new("RGB", (2000, 1600), (200, 30, 30)).save(tmp_path / "big.jpg", quality=95)
    im = load_image(tmp_path / "big.jpg", max_pixels=1_000_000)
    assert im.size == (1000, 800)
    r, g, b = im.getpixel((500, 400))
    assert abs(r - 200) <= 3 and abs(g - 30) <= 3 and abs(b - 30) <= 3
    with pytest.raises(BadImage, match="too large"):  # even 1/8 scale is over the limit
        load_image(tmp_path / "big.jpg", max_pixels=40_000)


def test_large_png_over_limit_is_refused(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(BadImage, match="max_pixels=0.1 MP"):
        load_image(tmp_path / "big.png", max_pixels=100_000)
    assert load_image(tmp_path / "big.png", max_pixels=120_000).size == (400, 300)


def test_pil_bomb_limit_does_not_override_vlkit_policy(tmp_path, monkeypatch):
    """A low global PIL limit would raise DecompressionBombError inside Image.open;
    vlkit decides by its own max_pixels instead."""
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "m.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(tmp_path / "m.png").getpixel((0, 0)) == (9, 9, 9)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_is_image_file():
    assert is_image_file("a/B.JPG") and is_image_file("x.webp")
    assert not is_image_file("notes.txt") and not is_image_file("noext")

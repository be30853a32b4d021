"""A corpus of hostile inputs, built here (no file from outside the repository), and a
harness that runs `vlkit` in-process and reads its exit code and output.

Builders return bytes or create files; `hypothesis` strategies draw from them and
mutate good files (truncation, flipped bytes, junk prefixes), so the property suite
(test_reliability_property.py) and the server burst (bench/reliability_server.py)
see the same kinds of file. Everything is small: the "huge" images are a few KB of
compressed zero rows whose headers declare tens of thousands of pixels a side.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

# ---------------------------------------------------------------- image bytes


def png_bytes(size: tuple[int, int] = (16, 16), color=(200, 40, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_jpeg(size: int = 64, seed: int = 0) -> bytes:
    """A JPEG of noise: its scan data is large, so a truncation really cuts pixels."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noise_png(size: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def truncated_jpeg(fraction: float = 0.5) -> bytes:
    data = noise_jpeg()
    return data[: max(4, int(len(data) * fraction))]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A valid PNG of width x height zero pixels: a few KB whose header declares megapixels."""
    bytes_per_row = 1 + (width * bit_depth * (3 if colour_type == 2 else 1) + 7) // 8
    comp = zlib.compressobj(9)
    row_block = b"\x00" * bytes_per_row * 256
    parts = [comp.compress(row_block) for _ in range(height // 256)]
    parts.append(comp.compress(b"\x00" * bytes_per_row * (height % 256)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data holds almost nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b"")


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>\n'


def tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="TIFF")
    return buf.getvalue()


# name -> bytes for every kind of bad image file the suites use (each one a different way to fail)
def bad_image_files() -> dict[str, bytes]:
    return {
        "empty.png": b"",
        "text.png": b"just some text, not an image\n",
        "svg.png": SVG,
        "html.jpg": b"<!DOCTYPE html><html><body>404</body></html>",
        "truncated.jpg": truncated_jpeg(0.5),
        "header-only.jpg": noise_jpeg()[:200],
        "signature-only.png": b"\x89PNG\r\n\x1a\n",
        "cut-idat.png": noise_png()[: len(noise_png()) // 2],
        "bomb-30000.png": header_only_png(30000, 30000),
        "bomb-12000.png": bomb_png(12000, 12000),
        "random.bin.png": bytes(range(256)) * 4,
    }


# ---------------------------------------------------------------- files and links


def write_bad_files(folder: Path) -> dict[str, Path]:
    """Every bad image file above, plus a folder, a symlink loop, a dangling link and a FIFO named as images."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in bad_image_files().items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    (folder / "folder.png").mkdir(exist_ok=True)
    out["folder.png"] = folder / "folder.png"
    for link, target in (("loop-a.png", "loop-b.png"), ("loop-b.png", "loop-a.png"), ("dangling.png", "nowhere.png")):
        if not os.path.lexists(folder / link):
            os.symlink(target, folder / link)
        out[link] = folder / link
    if hasattr(os, "mkfifo") and not (folder / "fifo.png").exists():
        os.mkfifo(folder / "fifo.png")  # opening it would block: must be refused without opening
    if (folder / "fifo.png").exists():
        out["fifo.png"] = folder / "fifo.png"
    return out


def make_class_folder(root: Path, classes: Sequence[str] = ("cat", "dog"), per_class: int = 2) -> Path:
    """root/<class>/<i>.png, solid colours with a stripe, readable by any model."""
    colours = [(230, 40, 40), (40, 40, 230), (40, 200, 40), (200, 200, 40)]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (24, 24), colours[c % len(colours)])
            im.paste((255, 255, 255), (2 * i, 2 * i, 6 + 2 * i, 20))
            im.save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------- hypothesis strategies


def strategies():
    """Hypothesis strategies (imported lazily so plain tests need no hypothesis)."""
    from hypothesis import strategies as st

    good = st.sampled_from([png_bytes(), noise_jpeg(), png_bytes((9, 3), (0, 0, 0, 0), "RGBA")])

    @st.composite
    def mutated(draw) -> bytes:
        data = bytearray(draw(good))
        how = draw(st.sampled_from(["truncate", "flip", "prefix", "zero-tail"]))
        if how == "truncate":
            return bytes(data[: draw(st.integers(0, len(data) - 1))])
        if how == "flip":
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= draw(st.integers(1, 255))
            return bytes(data)
        if how == "prefix":
            return draw(st.binary(min_size=1, max_size=16)) + bytes(data)
        cut = draw(st.integers(8, len(data)))
        return bytes(data[:cut]) + b"\x00" * (len(data) - cut)

    declared = st.builds(header_only_png, st.integers(1, 40000), st.integers(1, 40000))
    known_bad = st.sampled_from(list(bad_image_files().values()))
    image_bytes = st.one_of(mutated(), declared, known_bad, st.binary(max_size=64))

    table_text = st.one_of(
        st.text(max_size=80),
        st.just("image,label\n"),
        st.just('{"image": "a.png", "label": "x"}\n{broken\n'),
        st.just("image,label\na.png,x,extra,fields\n"),
        st.just("image,label\n\x00\n"),
    )
    table_bytes = st.one_of(
        table_text.map(lambda t: t.encode("utf-8")),
        table_text.map(lambda t: t.encode("utf-16-le")),  # UTF-16 without its byte-order mark
        st.just("image,label\ncafé.png,crème\n".encode("latin-1")),
        st.binary(max_size=64),
    )
    template = st.one_of(
        st.sampled_from(["{", "}", "{}", "{label.__class__}", "{label[0]}", "{label!r}", "{label:>10}", "{0}", "no field", "{{label}}"]),
        st.text(alphabet="{}!.:[]abl0 ", min_size=1, max_size=12),
    )
    return {"image_bytes": image_bytes, "table_bytes": table_bytes, "template": template}


# ---------------------------------------------------------------- running the CLI in-process


@dataclass
class Run:
    code: int | str | None
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def failed_cleanly(self) -> bool:
        """Exit 2, exactly one `error:` line, no traceback anywhere."""
        return self.code == 2 and len(self.error_lines) == 1 and "Traceback" not in self.err + self.out

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out[-1500:]}\n--- stderr\n{self.err[-3000:]}"


def run_cli(argv: Sequence[str | os.PathLike]) -> Run:
    """`vlkit ARGV` in this process: exit code, stdout, stderr; an escaping exception is recorded, not raised."""
    from vlkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if e.code is not None else 0
        except BaseException:  # noqa: BLE001 - a traceback is exactly what the suites look for
            traceback.print_exc(file=sys.stderr)
            code = "exception"
    return Run(code, out.getvalue(), err.getvalue())


def leaf_commands() -> list[tuple[str, ...]]:
    """Every command `vlkit --help` lists, as paths of names (groups expanded), found from the app itself."""
    import typer

    from vlkit.cli import _register, app

    if not app.registered_groups:
        _register()
    root = typer.main.get_command(app)
    out: list[tuple[str, ...]] = []

    def walk(cmd, path: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                walk(sub, (*path, name))
        else:
            out.append(path)

    walk(root, ())
    return out


def forbid_model_loading(monkeypatch) -> None:
    """Make any model load fail loudly: a check that runs after it is a check that ran too late."""
    import vlkit.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(vlkit.models, "load_model", refuse)


def memoise_model_loading(monkeypatch) -> Callable[[], int]:
    """Load each model spec once per test (the property suite calls commands many times); returns a load counter."""
    import vlkit.models

    real = vlkit.models.load_model
    cache: dict = {}
    loads = [0]

    def cached(spec, *args, **kwargs):
        key = (str(spec), str(kwargs.get("device", "cpu")))
        if key not in cache:
            loads[0] += 1
            cache[key] = real(spec, *args, **kwargs)
        return cache[key]

    monkeypatch.setattr(vlkit.models, "load_model", cached)
    return lambda: loads[0]

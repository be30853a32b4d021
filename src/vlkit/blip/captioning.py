"""Captioning image files with BLIP: inputs, decoding, batches, captions.jsonl.

This is the layer over the model's generation (`vlkit.blip.generate`) that a
command needs: the inputs may be image files, folders (searched recursively) and
CSV/JSONL tables with an image column (paths relative to the table); every file
is decoded through vlkit's one image-opening path, a few threads ahead of the
model; a file that cannot be read is skipped and listed with its reason; the
captions are written to captions.jsonl atomically.

    from vlkit.blip.captioning import caption_files, resolve_images
    from vlkit.blip.generate import settings_for
    run = caption_files("path/to/blip", resolve_images(["photos/"]), settings_for("beam", prompt="a picture of "))
    run.records[0]["caption"], run.skipped
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from vlkit.data.images import DEFAULT_MAX_PIXELS
from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.blip.checkpoint import LoadedBlip
    from vlkit.blip.generate import CaptionSettings
    from vlkit.models.base import ImagePreprocess

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


# ---------------------------------------------------------------- inputs


def resolve_images(inputs: Sequence[str | os.PathLike], image_column: str | None = None) -> list[str]:
    """The image paths named by `inputs`, in order, each once.

    A folder gives every image file under it (sorted); a .csv/.tsv/.jsonl table the
    paths in its image column (`image_column`, else the first of image, path, file, ...),
    relative ones resolved against the table's folder; any other file is taken as an
    image (decoded later; an unreadable one is skipped and listed then). A path that
    does not exist is an error, raised before anything is loaded.
    """
    from vlkit.data.datasets import IMAGE_COLUMNS, find_images, read_table

    if not inputs:
        raise VlkitError("no images given; pass image files, folders or a .csv/.jsonl table")
    out: dict[str, None] = {}
    for given in inputs:
        p = Path(given).expanduser()
        if not p.exists() and not p.is_symlink():
            raise VlkitError(f"{p}: does not exist; pass image files, folders or a .csv/.jsonl table")
        if p.is_dir():
            found = find_images(p)
            if not found:
                raise VlkitError(f"{p}: no image files found (searched recursively); check the folder")
            out.update(dict.fromkeys(os.path.normpath(os.path.abspath(f)) for f in found))
        elif p.suffix.lower() in TABLE_SUFFIXES:
            rows, columns = read_table(p)
            if not rows:
                raise VlkitError(f"{p}: the table has no rows")
            col = image_column if image_column is not None else next((c for c in IMAGE_COLUMNS if c in columns), None)
            if col is None or col not in columns:
                what = f"no column {image_column!r} (--image-column)" if image_column else f"no image column (tried {', '.join(IMAGE_COLUMNS)})"
                raise VlkitError(f"{p}: {what}; columns present: {', '.join(columns)}")
            base = p.resolve().parent
            for line, row in rows:
                value = row.get(col)
                if value is None or not str(value).strip():
                    raise VlkitError(f"{p}:{line}: empty {col!r}; every row needs an image path")
                q = Path(str(value).strip()).expanduser()
                out[os.path.normpath(str(q if q.is_absolute() else base / q))] = None
        else:
            out[os.path.normpath(os.path.abspath(p))] = None
    return list(out)


# ---------------------------------------------------------------- decoding


@dataclass
class PixelBatch:
    """Positions (in the input list) of the decoded images and their pixels [B, 3, H, W]."""

    index: list[int]
    pixels: torch.Tensor


class _Preprocessing:
    """What `vlkit.features`' loader needs of a model: its `preprocess`."""

    def __init__(self, preprocess: "ImagePreprocess") -> None:
        self.preprocess = preprocess


def pixel_batches(
    paths: Sequence[str | os.PathLike],
    preprocess: "ImagePreprocess",
    batch_size: int,
    skipped: list[tuple[str, str]],
    *,
    num_workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[PixelBatch]:
    """Batches of decoded, preprocessed images in input order; unusable files are appended to `skipped` as (path, reason)."""
    from vlkit.data.paths import check_path
    from vlkit.features import _loader, _ordered

    names = [os.fspath(p) for p in paths]
    decode = _loader(_Preprocessing(preprocess), max_pixels)  # type: ignore[arg-type]

    def load(name: str) -> tuple[torch.Tensor | None, str | None]:
        reason = check_path(name)  # symlink loops, dangling links, folders: vlkit's one path judge
        return (None, reason) if reason is not None else decode(name)

    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="vlkit-blip-decode") if num_workers > 0 and names else None
    try:
        index: list[int] = []
        xs: list[torch.Tensor] = []
        for i, (x, reason) in _ordered(load, names, list(range(len(names))), pool, window=2 * batch_size + 2 * max(num_workers, 1)):
            if x is None:
                skipped.append((names[i], str(reason)))
                continue
            index.append(i)
            xs.append(x)
            if len(xs) == batch_size:
                yield PixelBatch(index, torch.stack(xs))
                index, xs = [], []
        if xs:
            yield PixelBatch(index, torch.stack(xs))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr counting images (or nothing); yields `advance(k)`."""
    if not enabled or total == 0:
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda k: bar.advance(task, k)


# ---------------------------------------------------------------- captioning


@dataclass
class CaptionRun:
    """Captions of the readable images (input order), the skipped files with reasons, and the time taken."""

    records: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    settings: "CaptionSettings"
    batch_size: int
    seconds: float

    def metrics(self) -> dict[str, Any]:
        return {
            "images": len(self.records) + len(self.skipped),
            "captioned": len(self.records),
            "skipped_count": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "seconds": self.seconds,
            "images_per_s": len(self.records) / self.seconds if self.seconds > 0 else None,
        }


def settings_record(settings: "CaptionSettings") -> dict[str, Any]:
    """The decoding settings that shape a caption, as written on every captions.jsonl line."""
    common = {
        "max_length": settings.max_length,
        "min_length": settings.min_length,
        "repetition_penalty": settings.repetition_penalty,
        "prompt": settings.prompt,
        "num_captions": settings.num_return_sequences,
    }
    if settings.precision != "fp32":
        common["precision"] = settings.precision
    if settings.method == "beam":
        return {"num_beams": settings.num_beams, **common}
    return {"top_p": settings.top_p, "top_k": settings.top_k, "seed": settings.seed, **common}


@torch.no_grad()
def caption_files(
    loaded: "LoadedBlip | str",
    paths: Sequence[str | os.PathLike],
    settings: "CaptionSettings",
    *,
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = False,
) -> CaptionRun:
    """Caption image files with a loaded BLIP model (or a spec), in batches (the ViT runs once per batch).

    `settings.num_return_sequences` = K > 1 gives K captions per image (the K best beams,
    or K samples), the first in `caption`, all in `captions`.

    Nucleus sampling draws from one stream seeded once per run with `settings.seed`, each
    batch reseeded from it (as `vlkit.blip.generate.caption_images`), so the same files,
    batch size and seed give the same captions.
    """
    from dataclasses import replace

    from vlkit.blip.generate import decode, generate

    settings.validate()
    if batch_size < 1:
        raise VlkitError(f"--batch-size {batch_size}: must be at least 1")
    if isinstance(loaded, str):
        from vlkit.blip.checkpoint import load_blip

        loaded = load_blip(loaded)
    model = loaded.model
    model._need_decoder("captioning")
    device = next(model.parameters()).device
    records: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    names = [os.fspath(p) for p in paths]
    method = settings_record(settings)
    num_captions = settings.num_return_sequences
    start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), progress_bar(progress, len(names), "captioning") as advance:
        torch.manual_seed(settings.seed)
        seen = 0
        for batch in pixel_batches(names, loaded.preprocess, batch_size, skipped, num_workers=num_workers):
            run = settings
            if settings.method == "nucleus":
                run = replace(settings, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            with settings.autocast(device):
                embeds = model.image_embeds(batch.pixels.to(device))
            texts = decode(loaded.tokenizer, generate(model, embeds, loaded.tokenizer, run))
            for k, i in enumerate(batch.index):
                caps = texts[k * num_captions : (k + 1) * num_captions]
                rec: dict[str, Any] = {"path": names[i], "caption": caps[0]}
                if num_captions > 1:
                    rec["captions"] = caps
                records.append({**rec, "method": settings.method, "settings": method})
            advance(len(batch.index) + len(skipped) - seen)
            seen = len(skipped)
    return CaptionRun(records, skipped, settings, batch_size, time.perf_counter() - start)


def write_captions(run_dir: str | os.PathLike, run: CaptionRun) -> Path:
    """captions.jsonl (one JSON object per captioned image), written atomically."""
    import json

    from vlkit import io

    path = Path(run_dir) / "captions.jsonl"
    io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in run.records))
    return path

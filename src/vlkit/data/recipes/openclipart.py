"""Openclipart recipe: public-domain clip-art with folder categories and noisy file-name captions.

Source: the Debian package `openclipart-png` (pinned, SHA256-checked), unpacked
with `dpkg-deb -x` (nothing is installed). Each PNG's folder under
`usr/share/openclipart/png/` is its category path (`food/vegetables`); its file
name (`paprika_mateya_01.png`: subject, author, counter) is kept as a noisy
caption, the kind of web text CapFilt exists to clean. Symbolic links in the
package file an image under a second category; they become `also_in`.
Some PNGs exceed 600 megapixels: anything over `MAX_PIXELS` is refused from
its header (never decoded) and counted as skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from vlkit import io
from vlkit.data.images import BadImage
from vlkit.data.recipes import built_dir, raw_dir, write_jsonl
from vlkit.data.recipes.fetch import DebPackage, fetch_deb, unpack_deb
from vlkit.data.recipes.thumbs import MAX_PIXELS, THUMB_SIZE, raster_thumbnail
from vlkit.errors import VlkitError

PACKAGE = DebPackage(
    "openclipart-png",
    "1:0.18+dfsg-19",
    "f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02",
    "public domain (Openclipart)",
)
STYLE = "openclipart"
LICENCES = {STYLE: PACKAGE.licence}
PNG_ROOT = Path("usr/share/openclipart/png")


def unpacked_dir(data_dir: Path) -> Path:
    return raw_dir(data_dir, "openclipart") / "root"


def fetch(data_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """apt-get download the pinned .deb, verify it, unpack it with dpkg-deb; skip what is there."""
    t0 = time.perf_counter()
    archive, downloaded = fetch_deb(PACKAGE, raw_dir(data_dir, "openclipart"))
    unpack_deb(archive, unpacked_dir(data_dir))
    log(f"{PACKAGE.name} {PACKAGE.version}: {'fetched' if downloaded else 'present'}, verified, unpacked")
    return {"bytes": archive.stat().st_size, "downloaded": downloaded, "seconds": round(time.perf_counter() - t0, 2)}


def caption_from_name(name: str) -> str:
    """File name -> noisy caption: the stem with separators as spaces (author and counter kept)."""
    return " ".join(Path(name).stem.replace("_", " ").replace("-", " ").split())


def scan(png_root: Path) -> tuple[list[tuple[str, str]], dict[str, list[str]], int]:
    """Real PNG files as (category, file name), the extra categories symlinks give them, broken links."""
    files: list[tuple[str, str]] = []
    also: dict[str, list[str]] = {}
    broken = 0
    for dirpath, dirnames, filenames in os.walk(png_root):
        dirnames.sort()
        category = Path(dirpath).relative_to(png_root).as_posix()
        for name in sorted(filenames):
            if not name.lower().endswith(".png"):
                continue
            path = Path(dirpath) / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_file() or png_root.resolve() not in target.parents:
                    broken += 1
                    continue
                rel = target.relative_to(png_root.resolve()).as_posix()
                also.setdefault(rel, []).append(category)
            elif category != ".":
                files.append((category, name))
    return files, also, broken


def build(
    data_dir: Path,
    size: int = THUMB_SIZE,
    max_pixels: int = MAX_PIXELS,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Thumbnail every clip-art PNG (bounded memory) and write metadata.jsonl; keeps existing thumbnails."""
    t0 = time.perf_counter()
    png_root = unpacked_dir(data_dir) / PNG_ROOT
    if not png_root.is_dir():
        raise VlkitError(f"{png_root}: not found; run `vlkit data fetch openclipart` first (with the same --data-dir)")
    out_dir = built_dir(data_dir, "openclipart")
    files, also, broken = scan(png_root)
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    made = kept = 0
    for category, name in _progress(files, progress):
        stem = Path(name).stem
        rel = f"images/{category}/{stem}.png"
        dst = out_dir / rel
        if dst.exists():
            kept += 1
        else:
            try:
                raster_thumbnail(png_root / category / name, dst, size, max_pixels)
                made += 1
            except BadImage as e:
                skipped.append((f"{category}/{name}", e.reason))
                continue
        rows.append(
            {
                "id": f"{STYLE}/{category}/{stem}",
                "image": rel,
                "style": STYLE,
                "licence": PACKAGE.licence,
                "category": category,
                "category_top": category.split("/")[0],
                "also_in": sorted(set(also.get(f"{category}/{name}", []))),
                "caption": caption_from_name(name),
                "file_name": name,
            }
        )
    n = write_jsonl(out_dir / "metadata.jsonl", rows)
    report = {
        "dataset": "openclipart",
        "recipe": "openclipart",
        "rows": n,
        "size": size,
        "max_pixels": max_pixels,
        "sources": {"openclipart-png": PACKAGE.version},
        "licences": LICENCES,
        "report": {
            STYLE: {
                "images": n,
                "thumbnails_made": made,
                "thumbnails_kept": kept,
                "symlinked_extra_categories": sum(len(v) for v in also.values()),
                "broken_links": broken,
                "skipped": len(skipped),
                "skipped_files": skipped,
            }
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    io.write_json(out_dir / "build.json", report)
    log(f"openclipart: {n} images ({made} new), {len(skipped)} skipped, {broken} broken links")
    return report


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description="openclipart", transient=True)

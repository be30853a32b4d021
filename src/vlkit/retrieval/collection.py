"""What to index: an image folder or a caption table (CSV/JSONL), read into items.

An item is one image (absolute path), the row's other fields as metadata, and the
captions that describe it. Several rows naming the same image (COCO-style, five
captions per image) become one item with several captions, so retrieval metrics can
count a hit when *any* true caption is found. Paths that cannot be files (symlink
loops, dangling links, folders) are listed in `Source.skipped`, never fatal
(`vlkit.data.paths`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.data.datasets import caption_fields, fill_caption, find_images, read_table
from vlkit.data.paths import check_path, real_path
from vlkit.errors import VlkitError

TABLE_EXTENSIONS = frozenset({".csv", ".jsonl"})


@dataclass
class SourceItem:
    """One image to index, with its row metadata and its captions (possibly none)."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    listed: str | None = None  # the path as the folder or table gave it, before links were followed


@dataclass
class Source:
    """Items read from one folder or table, and the folder their paths are relative to."""

    items: list[SourceItem]
    root: Path
    description: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path as listed, reason)


def _captions(row: dict[str, Any], caption_field: str | None, template: str | None, where: str) -> list[str]:
    """The row's captions: the template filled from the row, or the field (a string or a list of strings)."""
    if template is not None:
        return [fill_caption(template, row, where)]
    if caption_field is None:
        return []
    value = row.get(caption_field)
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def read_source(
    source: str | Path,
    *,
    image_field: str = "image",
    caption_field: str | None = "caption",
    caption_template: str | None = None,
) -> Source:
    """Read an image folder (recursively) or a CSV/JSONL caption table.

    Table image paths are relative to the table's folder (absolute ones are kept).
    `caption_template` (e.g. "an emoji of {label}") formats each row into its caption
    and takes precedence over `caption_field`; a table without captions is fine.
    """
    src = Path(source).expanduser()
    if caption_template is not None:
        caption_fields(caption_template)  # a bad template fails before any file is read
    if not src.exists():
        raise VlkitError(f"{src}: does not exist; pass an image folder or a .csv/.jsonl caption table")
    desc: dict[str, Any] = {"source": str(src.resolve())}
    if src.is_dir():
        root = src.resolve()
        paths = find_images(src)
        if not paths:
            raise VlkitError(f"{src}: no image files found (searched recursively); check the folder")
        items, skipped = [], []
        for p in paths:
            reason = check_path(p)
            if reason is None:
                items.append(SourceItem(_absolute(p), listed=str(p)))
            else:
                skipped.append((str(p), reason))
        _check_any(src, items, skipped)
        return Source(items, root, desc, skipped)
    if src.suffix.lower() not in TABLE_EXTENSIONS:
        raise VlkitError(f"{src}: not a folder, .csv or .jsonl; pass an image folder or a caption table")
    rows = [row for _, row in read_table(src)[0]]
    if not rows:
        raise VlkitError(f"{src}: the table has no rows")
    if image_field not in rows[0]:
        raise VlkitError(f"{src}: no '{image_field}' column (has {sorted(rows[0])}); pass --image-field")
    desc.update(image_field=image_field, caption_field=caption_field, caption_template=caption_template)
    base = src.resolve().parent
    by_path: dict[Path, SourceItem] = {}
    skipped: list[tuple[str, str]] = []
    for n, row in enumerate(rows, start=1):
        rel = row.get(image_field)
        if not rel or not str(rel).strip():
            raise VlkitError(f"{src}: row {n} has an empty '{image_field}'; fill it or remove the row")
        listed = base / str(rel).strip()
        texts = _captions(row, caption_field, caption_template, f"{src} row {n}")  # row errors first, files second
        reason = check_path(listed)
        if reason is not None:
            skipped.append((str(listed), reason))
            continue
        path = _absolute(listed)
        item = by_path.get(path)
        if item is None:
            meta = {k: v for k, v in row.items() if k != image_field}
            item = by_path[path] = SourceItem(path, meta, listed=str(listed))
        for text in texts:
            if text not in item.captions:
                item.captions.append(text)
    _check_any(src, list(by_path.values()), skipped)
    return Source(list(by_path.values()), base, desc, skipped)


def _absolute(path: Path) -> Path:
    """The file's real path (links followed); `check_path` has already said it resolves."""
    return real_path(path) or path.absolute()


def _check_any(src: Path, items: list[SourceItem], skipped: list[tuple[str, str]]) -> None:
    if not items:
        raise VlkitError(f"{src}: none of its {len(skipped)} image paths can be read (first: {skipped[0][0]}: {skipped[0][1]})")

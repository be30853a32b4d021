"""Datasets: lists of (image path, label or caption), never opened here.

A dataset only knows files and labels; images are decoded later by
`vlkit.features` (or a training loader), so listing a folder of a million
images costs a directory walk, and a dataset never knows the model.

- `ImageFolderDataset(root)`: one subfolder per class (`root/<class>/**/<image>`),
  class names sorted, so label indices are the same on every machine.
- `CaptionTableDataset(path, ...)`: a CSV or JSONL table with an image column
  and a label and/or caption column; relative image paths are resolved against
  the table's own folder, so a dataset folder can be moved as a whole.

Paths are listed, not checked: a symlink loop, a dangling link or a missing
file is skipped and listed with its reason when it is read (`load_image`, whose
reasons come from `vlkit.data.paths`), so label indices never move. Text files
are read by `read_text`: UTF-8, or UTF-8/16/32 with a byte-order mark; anything
else is one clear error.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlkit.data.images import IMAGE_EXTENSIONS
from vlkit.errors import VlkitError


@dataclass(frozen=True)
class Item:
    """One example: an image path with its label index and/or caption."""

    path: str
    label: int | None = None
    caption: str | None = None


class _ItemList:
    """Shared list behaviour: `len`, indexing, iteration, and column views."""

    items: list[Item]
    classnames: list[str] | None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @property
    def paths(self) -> list[str]:
        return [it.path for it in self.items]

    @property
    def labels(self) -> list[int] | None:
        """Label indices, or None when this dataset has no labels."""
        if any(it.label is None for it in self.items):
            return None
        return [it.label for it in self.items]  # type: ignore[misc]

    @property
    def captions(self) -> list[str] | None:
        """Captions, or None when this dataset has no captions."""
        if any(it.caption is None for it in self.items):
            return None
        return [it.caption for it in self.items]  # type: ignore[misc]

    @property
    def classes(self) -> list[str] | None:
        """Alias of `classnames` (torchvision's name)."""
        return self.classnames


def find_images(folder: str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file under `folder` (recursive, follows links, skips hidden), sorted.

    A linked folder is visited once: a link back to an ancestor would otherwise
    make the walk endless.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath, name))
    return sorted(found)


class ImageFolderDataset(_ItemList):
    """`root/<class>/**/<image>`: one class per subfolder, classes in sorted order.

    A class folder holding no image is an error (it would silently shift every
    later label index) unless `allow_empty=True`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        extensions: Sequence[str] | None = None,
        allow_empty: bool = False,
    ) -> None:
        self.root = Path(root)
        exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions) if extensions else IMAGE_EXTENSIONS
        if not self.root.exists():
            raise VlkitError(f"{self.root}: image folder does not exist; check the path")
        if not self.root.is_dir():
            raise VlkitError(f"{self.root}: is not a folder; give a folder with one subfolder per class")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            loose = find_images(self.root, exts)
            hint = f" ({len(loose)} images lie directly in it)" if loose else ""
            raise VlkitError(
                f"{self.root}: has no class subfolders{hint}; put the images of each class in root/<class name>/"
            )
        self.classnames = [p.name for p in class_dirs]
        self.class_to_idx = {name: i for i, name in enumerate(self.classnames)}
        self.items = []
        empty = []
        for label, class_dir in enumerate(class_dirs):
            images = find_images(class_dir, exts)
            if not images:
                empty.append(class_dir.name)
            self.items.extend(Item(str(p), label=label) for p in images)
        if not self.items:
            raise VlkitError(
                f"{self.root}: no images found in its {len(class_dirs)} class folders "
                f"(extensions: {', '.join(sorted(exts))})"
            )
        if empty and not allow_empty:
            raise VlkitError(
                f"{self.root}: class folders with no images: {', '.join(empty)}; "
                "add images to them or remove them"
            )

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self.items)} images, {len(self.classnames)} classes)"


class CaptionTableDataset(_ItemList):
    """A CSV or JSONL table: an image-path column plus a label and/or caption column.

    Labels may be class names (indices follow `classnames` if given, else the
    sorted distinct names) or integer indices. A caption cell holding a list
    gives one item per caption. Relative image paths are relative to the
    table's folder.
    """

    classnames: list[str] | None = None

    def __init__(
        self,
        path: str | os.PathLike,
        image_col: str = "image",
        label_col: str | None = None,
        caption_col: str | None = None,
        classnames: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise VlkitError(f"{self.path}: table does not exist; check the path")
        if not self.path.is_file():
            raise VlkitError(f"{self.path}: is not a file; give a .csv or .jsonl table")
        rows, columns = read_table(self.path)
        if not rows:
            raise VlkitError(f"{self.path}: table has no rows")
        self.image_col, self.label_col, self.caption_col = image_col, label_col, caption_col
        for role, col in (("image_col", image_col), ("label_col", label_col), ("caption_col", caption_col)):
            if col is not None and col not in columns:
                raise VlkitError(
                    f"{self.path}: no column {col!r} ({role}); available columns: {', '.join(columns)}"
                )
        base = self.path.parent
        paths = []
        for line, row in rows:
            value = row.get(image_col)
            if value is None or str(value).strip() == "":
                raise VlkitError(f"{self.path}:{line}: empty {image_col!r} value; every row needs an image path")
            p = Path(str(value).strip())
            paths.append(str(p if p.is_absolute() else base / p))
        labels = self._labels(rows, label_col, classnames) if label_col else [None] * len(rows)
        self.items = []
        for (line, row), img, label in zip(rows, paths, labels):
            if caption_col is None:
                self.items.append(Item(img, label=label))
                continue
            for caption in _captions(self.path, line, caption_col, row.get(caption_col)):
                self.items.append(Item(img, label=label, caption=caption))

    def _labels(self, rows: list[tuple[int, dict]], col: str, classnames: Sequence[str] | None) -> list[int]:
        values = [row.get(col) for _, row in rows]
        for (line, _), v in zip(rows, values):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise VlkitError(f"{self.path}:{line}: empty {col!r} value; every row needs a label")
        if all(_is_int(v) for v in values):
            indices = [int(v) for v in values]  # type: ignore[arg-type]
            self.classnames = list(classnames) if classnames is not None else None
            limit = len(self.classnames) if self.classnames is not None else None
            for (line, _), i in zip(rows, indices):
                if i < 0 or (limit is not None and i >= limit):
                    raise VlkitError(f"{self.path}:{line}: label index {i} out of range for {limit or 'non-negative'} classes")
            return indices
        names = [str(v).strip() for v in values]
        self.classnames = list(classnames) if classnames is not None else sorted(set(names))
        index = {name: i for i, name in enumerate(self.classnames)}
        unknown = sorted(set(names) - index.keys())
        if unknown:
            raise VlkitError(
                f"{self.path}: labels not in the class list: {', '.join(unknown[:5])}"
                f"{' ...' if len(unknown) > 5 else ''}; add them to the class names"
            )
        return [index[n] for n in names]

    def __repr__(self) -> str:
        return f"CaptionTableDataset({str(self.path)!r}, {len(self.items)} items)"


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def _captions(path: Path, line: int, col: str, value: Any) -> list[str]:
    if isinstance(value, list):
        out = [str(c) for c in value if str(c).strip()]
    elif value is None or not str(value).strip():
        out = []
    else:
        out = [str(value)]
    if not out:
        raise VlkitError(f"{path}:{line}: empty {col!r} value; every row needs a caption")
    return out


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a user's file (class list, templates, table), decoded without guessing.

    UTF-8 is the rule; a byte-order mark (UTF-8, UTF-16 or UTF-32, as Excel and
    Notepad write) says which Unicode encoding it is and is honoured. Any other
    bytes (Latin-1, Windows-1252, UTF-16 without a mark) would be a guess, so they
    are one error naming the file, the first bad byte and the fix.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise VlkitError(f"{p}: is a folder; give a {what}") from None
    except OSError as e:
        raise VlkitError(f"{p}: cannot read {what} ({e.strerror or e})") from None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(encoding)
            except UnicodeDecodeError as e:
                raise VlkitError(f"{p}: starts with a {encoding.upper()} byte-order mark but is not valid {encoding.upper()} ({e.reason}); re-save it as UTF-8") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise VlkitError(
            f"{p}: {what} is not UTF-8 (byte 0x{data[e.start]:02x} on line {line}); {_guess_encoding(data)}"
        ) from None
    if "\x00" in text:  # valid UTF-8, but no text file holds NUL: UTF-16 without a mark, or binary
        line = text.count("\n", 0, text.index("\x00")) + 1
        guess = _guess_encoding(data)
        if "UTF-16" in guess:
            raise VlkitError(f"{p}: {what} is not UTF-8 (NUL bytes from line {line}); {guess}")
        raise VlkitError(f"{p}:{line}: holds a NUL character; a {what} is text: re-save it as UTF-8")
    return text


def _guess_encoding(data: bytes) -> str:
    """What non-UTF-8 bytes most likely are, to say in the error (never used to decode)."""
    sample = data[:4096]
    even, odd = sample[0::2], sample[1::2]
    if sample and max(even.count(0), odd.count(0)) > 0.3 * len(sample) / 2:
        return "it looks like UTF-16 without a byte-order mark: re-save it as UTF-8 (or UTF-16 with a BOM)"
    if b"\x00" in sample or sum(b < 9 or 13 < b < 32 for b in sample) > len(sample) // 20:
        return "it looks like a binary file, not text: check the path"
    return "it looks like Latin-1 or Windows-1252: re-save it as UTF-8"


def read_table(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Rows as (line number, dict) and the column names, from CSV/TSV or JSONL (text as `read_text`)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise VlkitError(f"{path}: unsupported table type {suffix or '(none)'}; use .csv, .tsv or .jsonl")
    text = read_text(path, "table")
    if suffix in (".jsonl", ".ndjson"):
        rows: list[tuple[int, dict]] = []
        columns: dict[str, None] = {}
        for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise VlkitError(
                    f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object: fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise VlkitError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
            columns.update(dict.fromkeys(row))
        return rows, list(columns)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",", restkey=_EXTRA)
    try:
        columns_list = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            if _EXTRA in row:
                raise VlkitError(
                    f"{path}:{reader.line_num}: {len(columns_list) + len(row[_EXTRA])} fields but the header has "
                    f"{len(columns_list)}; quote fields that contain the delimiter"
                )
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise VlkitError(f"{path}:{reader.line_num}: not a readable CSV row ({e})") from None
    return rows, columns_list


_EXTRA = "\x00extra"  # DictReader's key for fields beyond the header (cannot clash: read_text refuses NUL)


def caption_fields(template: str) -> list[str]:
    """The row fields a caption template names, e.g. 'an emoji of {label}' -> ['label'].

    Only plain `{field}` placeholders (and `{{`/`}}` for literal braces) are allowed:
    no positional `{}`, no attribute or index access, no conversion or format spec,
    so a template can never reach into a value (str.format would evaluate
    '{label.__class__}').
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise VlkitError(f"caption template {template!r}: {e}; write fields as {{name}} and literal braces as {{{{ }}}}") from None
    fields = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if not field.strip():
            raise VlkitError(f"caption template {template!r}: an empty {{}} names no field; write e.g. 'an emoji of {{label}}'")
        if any(c in field for c in ".[]") or spec or conversion:
            raise VlkitError(
                f"caption template {template!r}: '{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}' "
                "is not a plain field; only {name} placeholders are filled (no attributes, indexing or format specs)"
            )
        fields.append(field)
    if not fields:
        raise VlkitError(f"caption template {template!r}: names no field, so every caption would be the same; write e.g. 'an emoji of {{label}}'")
    return fields


def fill_caption(template: str, row: dict[str, Any], where: str) -> str:
    """The template with each `{field}` replaced by the row's value (checked by `caption_fields`)."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if field is not None:
            if field not in row:
                raise VlkitError(f"{where}: caption template {template!r} names field '{field}' which the row lacks")
            value = row[field]
            out.append("" if value is None else str(value))
    return "".join(out)


# Column names tried, in order, when `open_dataset` reads a table.
IMAGE_COLUMNS = ("image", "path", "filepath", "file", "filename", "image_path")
LABEL_COLUMNS = ("label", "class", "classname", "category")
CAPTION_COLUMNS = ("caption", "text", "title")


def open_dataset(
    path: str | os.PathLike,
    *,
    image_col: str | None = None,
    label_col: str | None = None,
    caption_col: str | None = None,
    classnames: Sequence[str] | None = None,
) -> ImageFolderDataset | CaptionTableDataset:
    """A folder -> `ImageFolderDataset`; a .csv/.tsv/.jsonl table -> `CaptionTableDataset`.

    For tables, columns not named are picked from the usual names (`image`/`path`,
    `label`/`class`, `caption`/`text`) when present.
    """
    p = Path(path)
    if not p.exists():
        raise VlkitError(f"{p}: data path does not exist; give an image folder or a .csv/.jsonl table")
    if p.is_dir():
        return ImageFolderDataset(p)
    _, columns = read_table(p)
    pick = lambda given, names: given if given is not None else next((c for c in names if c in columns), None)  # noqa: E731
    image = pick(image_col, IMAGE_COLUMNS)
    if image is None:
        raise VlkitError(
            f"{p}: no image column (tried {', '.join(IMAGE_COLUMNS)}); available columns: {', '.join(columns)}"
        )
    return CaptionTableDataset(
        p,
        image_col=image,
        label_col=pick(label_col, LABEL_COLUMNS),
        caption_col=pick(caption_col, CAPTION_COLUMNS),
        classnames=classnames,
    )

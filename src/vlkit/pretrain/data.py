"""Image-caption pairs for pretraining, from built `metadata.jsonl` datasets.

Web alt-text taught CLIP the words downstream tasks use; here the captions are
written from every label a row carries (emoji: name, tags, group, subgroup in
English and Chinese; clip-art: category path and the noisy file-name caption),
each in several phrasings; a row with a `captions` list and no labels (CapFilt's
collection) is captioned by that list. Every step draws one caption per image.

A captioner must not learn all of those: a decoder trained on "an emoji from the
category Smileys & Emotion." next to "an emoji of grinning face." writes the
category, the mode it can always predict. So each row also lists its describing
captions (what the picture shows: the emoji's name, the clip art's category) for
BLIP's LM objective (`blip.lm_captions: "describing"`) and as caption references.

Images are small built thumbnails, so the whole training set is decoded once
into a uint8 tensor; batches are index lookups. The order of the global batch
and every random draw (caption choice, augmentation) are pure functions of
(seed, epoch, step), which makes resume exact and makes N processes see exactly
the slices of the batch one process would see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vlkit.errors import VlkitError

HELD_OUT_STYLES = frozenset({"facebook"})
# Emoji whose meaning a mirror image changes (direction, text, flags) are never flipped.
NO_FLIP_GROUPS = frozenset({"flags", "symbols", "component"})


def _human(s: str) -> str:
    """'face-smiling' / 'Smileys & Emotion' -> words a caption would use."""
    return s.replace("-", " ").replace("_", " ").strip()


def _uniq(items: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        x = " ".join(str(x).split())
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


def emoji_captions(row: dict, languages: Sequence[str] = ("en", "zh")) -> list[str]:
    """Captions for one emoji row: its name, tags, group and subgroup, several phrasings.

    Skin-tone variants are captioned by their base emoji's name (as the label task
    counts them), so a variant shares its base's captions. Name phrasings are listed
    twice so about half of the draws name the emoji; group and subgroup phrasings
    use the human-readable names tasks use as classes.
    """
    base = str(row.get("base_label") or row.get("label") or "").strip()
    if not base:
        return []
    group = str(row.get("group_name") or _human(str(row.get("group") or ""))).strip()
    subgroup = str(row.get("subgroup_name") or _human(str(row.get("subgroup") or ""))).strip()
    tags = [_human(t) for t in (row.get("tags") or []) if t][:6]
    names = [base, f"an emoji of {base}.", f"a {base} emoji.", f"an icon of {base}."]
    caps = names + names
    if group:
        caps.append(f"an emoji from the category {group}.")
    if subgroup:
        caps += [f"an emoji from the category {subgroup}.", f"an emoji of {subgroup}."]
    caps += [f"an emoji of {t}." for t in tags]
    if tags:
        caps.append(f"{base}: " + ", ".join(tags))
    if "zh" in languages:
        zh = str(row.get("base_label_zh") or row.get("label_zh") or "").strip()
        if zh:
            caps += [zh, f"{zh}的表情符号"]
        caps += [f"{str(t).strip()}表情" for t in (row.get("tags_zh") or [])[:4] if t]
        caps += [f"{row[k]}类表情" for k in ("group_zh", "subgroup_zh") if row.get(k)]
    return [c for c in (" ".join(x.split()) for x in caps) if c]


def clipart_captions(row: dict, languages: Sequence[str] = ("en", "zh")) -> list[str]:
    """Captions for one clip-art row: category words (twice, the reliable signal) and the noisy file-name caption.

    The category is named at its second level (computer/icons/flat-theme/action ->
    'icons', the level the category task uses) and, when deeper, also by its leaf.
    """
    parts = [_human(p) for p in str(row.get("category") or "").replace("\\", "/").split("/") if p]
    noisy = _human(str(row.get("caption") or ""))
    caps: list[str] = []
    names = _uniq([parts[1] if len(parts) > 1 else (parts[0] if parts else "")])
    for name in names:
        cat = [name, f"a clip art of {name}.", f"a drawing of {name}.", f"an illustration of {name}."]
        caps += cat + cat
    if len(parts) > 2:
        caps.append(f"a clip art of {parts[-1]} {parts[1]}.")
    if parts:
        caps.append(f"a clip art from the category {parts[0]}.")
    if noisy:
        caps += [noisy, f"a clip art of {noisy}."]
    return [c for c in (" ".join(x.split()) for x in caps) if c]


def _is_clipart(row: dict) -> bool:
    return row.get("style") == "openclipart" or "category" in row


def _is_caption_row(row: dict) -> bool:
    """A row that lists its captions itself (CapFilt's collection.jsonl), with no emoji or clip-art labels."""
    return isinstance(row.get("captions"), list) and not row.get("label") and not _is_clipart(row)


def _listed_captions(row: dict) -> list[str]:
    return [c for c in (" ".join(str(x).split()) for x in row["captions"]) if c]


def row_captions(row: dict, languages: Sequence[str] = ("en", "zh")) -> list[str]:
    if _is_caption_row(row):
        return _listed_captions(row)
    if _is_clipart(row):
        return clipart_captions(row, languages)
    return emoji_captions(row, languages)


def describing_captions(row: dict) -> list[str]:
    """What a caption of this image should say, in one phrasing: "an emoji of <name>." (a
    skin-tone variant by its base's name, as the label task counts it) or "a clip art of
    <category>." (the category task's level; also with the leaf when deeper). Empty
    when the row names nothing. A row that lists its captions describes with all of them."""
    if _is_caption_row(row):
        return _listed_captions(row)
    if _is_clipart(row):
        parts = [_human(p) for p in str(row.get("category") or "").replace("\\", "/").split("/") if p]
        if not parts:
            return []
        name = parts[1] if len(parts) > 1 else parts[0]
        caps = [f"a clip art of {name}."]
        if len(parts) > 2:
            caps.append(f"a clip art of {parts[-1]} {name}.")
        return [" ".join(c.split()) for c in caps]
    base = " ".join(str(row.get("base_label") or row.get("label") or "").split())
    return [f"an emoji of {base}."] if base else []


def row_flip_ok(row: dict) -> bool:
    if row.get("style") == "openclipart" or "category" in row:
        return True
    group = str(row.get("group") or "").lower()
    subgroup = str(row.get("subgroup") or "").lower()
    return not any(g in group for g in NO_FLIP_GROUPS) and "arrow" not in subgroup and "flag" not in group


@dataclass
class PairTable:
    """Training rows: image paths, their caption ids (all, and the describing ones), and the unique caption strings."""

    image_paths: list[Path]
    caption_ids: list[list[int]]
    captions: list[str]
    flip_ok: list[bool]
    styles: list[str]
    describing_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.image_paths)


def resolve_metadata(source: str, data_dir: Path) -> Path:
    p = Path(source).expanduser()
    if p.suffix == ".jsonl":
        return p
    if p.is_dir() and (p / "metadata.jsonl").exists():
        return p / "metadata.jsonl"
    return data_dir / "built" / source / "metadata.jsonl"


def _train_split_images(task_name: str, data_dir: Path) -> set[str]:
    """Resolved image paths of a task's train split (only those are trained on)."""
    from vlkit.data.tasks import load_task

    task = load_task(task_name, data_dir=data_dir)
    return {str(p) for p in task_split_paths(task, "train")}


def task_split_paths(task, split: str) -> list[Path]:
    """Absolute image paths of a task split, in order."""
    items = task.split_items(split) if hasattr(task, "split_items") else task.splits[split]
    root = Path(getattr(task, "root", ""))
    return [(root / str(rel)).resolve() for rel, _ in items]


def load_pairs(
    sources: Sequence[str],
    data_dir: Path,
    styles: Sequence[str],
    train_split_tasks: dict | None = None,
    languages: Sequence[str] = ("en", "zh"),
) -> PairTable:
    """Read the training rows of every source, keeping only allowed styles and train splits."""
    allowed = {s.lower() for s in styles} - HELD_OUT_STYLES
    caption_index: dict[str, int] = {}
    table = PairTable([], [], [], [], [], [])
    for source in sources:
        meta = resolve_metadata(source, data_dir)
        if not meta.exists():
            raise VlkitError(
                f"{meta}: no built dataset '{source}'; run `vlkit data fetch {source}` and "
                f"`vlkit data build {source}`, or set data.data_dir / --data-dir"
            )
        task = (train_split_tasks or {}).get(source)
        keep = _train_split_images(task, data_dir) if task else None
        with open(meta, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for row in rows:
            style = str(row.get("style", "")).lower()
            if style not in allowed:
                continue
            path = (meta.parent / row["image"]).resolve()
            if keep is not None and str(path) not in keep:
                continue
            caps = row_captions(row, languages)  # repeats act as sampling weights
            if not caps:
                continue
            table.image_paths.append(path)
            table.caption_ids.append([_caption_id(c, caption_index, table.captions) for c in caps])
            table.describing_ids.append([_caption_id(c, caption_index, table.captions) for c in describing_captions(row) or caps])
            table.flip_ok.append(row_flip_ok(row))
            table.styles.append(style)
    if not table.image_paths:
        raise VlkitError(f"{', '.join(sources)}: no training rows with styles {sorted(allowed)}; check data.sources and data.styles")
    return table


def _caption_id(caption: str, index: dict[str, int], captions: list[str]) -> int:
    if caption not in index:
        index[caption] = len(captions)
        captions.append(caption)
    return index[caption]


def load_image_tensor(paths: Sequence[Path], image_size: int) -> torch.Tensor:
    """Decode every image once into uint8 [N, 3, S, S] (thumbnails are small)."""
    from PIL import Image

    from vlkit.data.images import load_image

    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        im = load_image(p)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator for every random draw of one global batch."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 10_007 + step) % (2**63 - 1))
    return g


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed((seed * 7_919 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def sample_captions(caption_ids: Sequence[Sequence[int]], rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One caption id per row, uniformly among that row's captions."""
    u = torch.rand(len(rows), generator=g, dtype=torch.float64)
    out = torch.empty(len(rows), dtype=torch.long)
    for j, r in enumerate(rows.tolist()):
        ids = caption_ids[r]
        out[j] = ids[min(int(u[j] * len(ids)), len(ids) - 1)]
    return out

"""Cut the bundled sample (src/vlkit/assets/sample) out of a full build, reproducibly.

The sample holds only openly licensed styles (twitter, google, openmoji,
openclipart; never facebook), in the same layout and metadata schema as a data
dir, plus its own task definitions: with no held-out facebook style in it, its
emoji tasks train on twitter, validate on google and test on openmoji. Choices
are drawn with fixed seeds, so rerunning gives the same files.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlkit import io
from vlkit.data.recipes import SAMPLE_DIR, built_dir, read_jsonl, write_jsonl
from vlkit.data.recipes.emoji import OPEN_STYLES

PER_GROUP = 40
SKINTONE_BASES = 15
CLIPART_CLASSES = 12
CLIPART_PER_CLASS = 24
SAMPLE_STYLE_SPLIT = {"by": "style", "train": ["twitter"], "val": ["google"], "test": ["openmoji"]}
EMOJI_TASKS = ("emoji-label", "emoji-group", "emoji-subgroup", "emoji-flags", "emoji-skintone")


def _pick_emoji(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PER_GROUP base emoji per group plus SKINTONE_BASES bases with all their single-tone variants."""
    styles_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        styles_of[r["id"].split("/", 1)[1]].add(r["style"])
    complete = {k for k, s in styles_of.items() if s >= set(OPEN_STYLES)}
    bases_by_group: dict[str, list[str]] = defaultdict(list)
    toned_bases: set[str] = set()
    for r in rows:
        if r["style"] != "twitter" or r["group"] in (None, "component") or r["id"].split("/", 1)[1] not in complete:
            continue
        if not r["skintone"]:
            bases_by_group[r["group"]].append(r["base"])
        elif len(r["skintone"]) == 1:
            toned_bases.add(r["base"])
    rng = random.Random(0)
    chosen: set[str] = set()
    for group in sorted(bases_by_group):
        bases = sorted(set(bases_by_group[group]))
        chosen |= set(rng.sample(bases, min(PER_GROUP, len(bases))))
    toned = set(rng.sample(sorted(toned_bases), SKINTONE_BASES))
    keep = []
    for r in rows:
        key = r["id"].split("/", 1)[1]
        if key not in complete or r["style"] not in OPEN_STYLES:
            continue
        if (r["base"] in chosen and not r["skintone"]) or (r["base"] in toned and len(r["skintone"]) <= 1):
            keep.append(r)
    return keep


def _pick_clipart(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CLIPART_CLASSES second-level categories with enough images, CLIPART_PER_CLASS images each."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        parts = r["category"].split("/")
        if len(parts) >= 2 and parts[0] not in ("unsorted", "special"):
            by_cat["/".join(parts[:2])].append(r)
    rng = random.Random(0)
    eligible = sorted(c for c, v in by_cat.items() if len(v) >= CLIPART_PER_CLASS)
    keep = []
    for cat in sorted(rng.sample(eligible, min(CLIPART_CLASSES, len(eligible)))):
        keep += rng.sample(sorted(by_cat[cat], key=lambda r: r["id"]), CLIPART_PER_CLASS)
    return sorted(keep, key=lambda r: r["id"])


def _copy(rows: list[dict[str, Any]], src: Path, dst: Path) -> None:
    for r in rows:
        (dst / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["image"], dst / r["image"])
    write_jsonl(dst / "metadata.jsonl", rows)


def make_sample(data_dir: Path, out: Path = SAMPLE_DIR) -> dict[str, int]:
    """Rewrite `out` from the full build in `data_dir`; returns row counts."""
    from vlkit.data.tasks import DEFINITIONS_DIR, load_task

    for sub in ("built", "tasks", "splits"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    emoji = _pick_emoji(read_jsonl(built_dir(data_dir, "emoji") / "metadata.jsonl"))
    if any(r["style"] not in OPEN_STYLES for r in emoji):
        raise RuntimeError("sample selection let a non-open style through; refusing to write it")
    _copy(emoji, built_dir(data_dir, "emoji"), built_dir(out, "emoji"))
    clipart = _pick_clipart(read_jsonl(built_dir(data_dir, "openclipart") / "metadata.jsonl"))
    _copy(clipart, built_dir(data_dir, "openclipart"), built_dir(out, "openclipart"))
    for name in EMOJI_TASKS:
        spec = json.loads((DEFINITIONS_DIR / f"{name}.json").read_text(encoding="utf-8"))
        spec["datasets"] = ["emoji"]
        spec["split"] = SAMPLE_STYLE_SPLIT
        spec["description"] = spec["description"].split(" Train:")[0] + " Sample: train twitter, val google, test openmoji."
        io.write_json(out / "tasks" / f"{name}.json", spec)
    for name in (*EMOJI_TASKS, "clipart-category"):
        load_task(name, out, write=True)
    return {"emoji": len(emoji), "openclipart": len(clipart)}

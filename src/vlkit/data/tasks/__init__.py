"""Benchmark tasks: class names, prompt templates and fixed train/val/test splits.

A task is a small JSON file (this folder, or `<data_dir>/tasks/<name>.json`,
which wins: the bundled sample carries its own) that says which built datasets
it reads, which metadata field is the label, which rows qualify, and how rows
are split: by style (train on some artwork styles, test on another, so domain
generalisation is measured) or at random per class with a fixed seed.

`load_task` materialises the split once into `<data_dir>/splits/<task>/split.json`
(paths relative to `<data_dir>/built`, never absolute) and reuses it while the
definition and the metadata are unchanged, so every method sees the same rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from vlkit import io
from vlkit.data.recipes import built_dir, is_bundled_sample, read_jsonl, resolve_data_dir
from vlkit.errors import VlkitError

DEFINITIONS_DIR = Path(__file__).resolve().parent
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """A classification task on built data; `splits[name]` holds (relative path, label index)."""

    name: str
    description: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, list[tuple[str, int]]]
    data_dir: Path
    definition: dict[str, Any] = field(repr=False)
    fingerprint: str = ""

    @property
    def root(self) -> Path:
        """Folder the split paths are relative to."""
        return self.data_dir / "built"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def paths(self, split: str) -> list[Path]:
        return [self.root / rel for rel, _ in self._split(split)]

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self._split(split)]

    def _split(self, split: str) -> list[tuple[str, int]]:
        if split not in self.splits:
            raise VlkitError(f"{split}: no such split in task {self.name}; choose one of {', '.join(self.splits)}")
        return self.splits[split]

    @cached_property
    def split_dir(self) -> Path:
        return self.data_dir / "splits" / self.name

    def subset(self, class_indices: list[int], suffix: str) -> "Task":
        """The task restricted to some classes, relabelled 0..n-1 in the given order (as CoCoOp does)."""
        remap = {old: new for new, old in enumerate(class_indices)}
        return replace(
            self,
            name=f"{self.name}{suffix}",
            classnames=[self.classnames[i] for i in class_indices],
            splits={s: [(p, remap[y]) for p, y in rows if y in remap] for s, rows in self.splits.items()},
        )

    def base_to_new(self) -> tuple["Task", "Task"]:
        """CoCoOp's base-to-new split: the first ceil(n/2) classes in label order are base, the rest new."""
        m = -(-self.num_classes // 2)
        return self.subset(list(range(m)), ":base"), self.subset(list(range(m, self.num_classes)), ":new")


def definition_path(name: str, data_dir: Path) -> Path:
    """`<data_dir>/tasks/<name>.json` if present, else the packaged definition."""
    for folder in (data_dir / "tasks", DEFINITIONS_DIR):
        path = folder / f"{name}.json"
        if path.is_file():
            return path
    raise VlkitError(f"{name}: unknown task; choose one of {', '.join(available_tasks(data_dir))}")


def available_tasks(data_dir: str | os.PathLike | None = None, built_only: bool = False) -> list[str]:
    """Task names defined for this data dir (optionally only those whose datasets are built)."""
    root = resolve_data_dir(data_dir)
    names = sorted({p.stem for folder in (root / "tasks", DEFINITIONS_DIR) for p in folder.glob("*.json")})
    if not built_only:
        return names
    return [n for n in names if all(_metadata_path(root, d).exists() for d in _read_definition(definition_path(n, root))["datasets"])]


def _read_definition(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VlkitError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the task definition") from None


def _metadata_path(data_dir: Path, dataset: str) -> Path:
    return built_dir(data_dir, dataset) / "metadata.jsonl"


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _matches(row: dict[str, Any], cond: dict[str, Any]) -> bool:
    value = row.get(cond["field"])
    if "in" in cond:
        return value in cond["in"]
    if "not_in" in cond:
        return value is not None and value not in cond["not_in"]
    if "count" in cond:
        return isinstance(value, list) and len(value) == cond["count"]
    raise VlkitError(f"{cond}: unknown condition; use one of in, not_in, count")


def _label_of(row: dict[str, Any], spec: dict[str, Any]) -> str | None:
    """The row's label string under the definition (list fields must hold exactly one value)."""
    value = row.get(spec["label"])
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    if value is None:
        return None
    value = str(value)
    depth = spec.get("label_depth")
    if depth:
        parts = value.split("/")
        if len(parts) < depth:
            return None
        value = "/".join(parts[:depth])
    prefix = spec.get("strip_prefix")
    if prefix and value.startswith(prefix):
        value = value[len(prefix) :]
    return value


def _display_names(keys: list[str], spec: dict[str, Any]) -> list[str]:
    """Class names for prompts: category paths become their last folder, disambiguated by the parent."""
    if not spec.get("label_depth"):
        return keys
    leaf = [k.split("/")[-1].replace("_", " ") for k in keys]
    counts = {n: leaf.count(n) for n in leaf}
    return [n if counts[n] == 1 else f"{n} ({k.split('/')[-2].replace('_', ' ')})" for n, k in zip(leaf, keys)]


def _assign_split(rows: list[tuple[str, str, dict]], spec: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """(path, label key) per split, by style or at random per class with a fixed seed."""
    how = spec["split"]
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLIT_NAMES}
    if how["by"] == "style":
        style_to_split = {style: s for s in SPLIT_NAMES for style in how[s]}
        for path, key, row in rows:
            s = style_to_split.get(row["style"])
            if s is not None:
                out[s].append((path, key))
        return out
    if how["by"] == "random":
        fractions = how["fractions"]
        by_class: dict[str, list[str]] = defaultdict(list)
        for path, key, _ in rows:
            by_class[key].append(path)
        rng = random.Random(how.get("seed", 0))
        for key in sorted(by_class):
            paths = sorted(by_class[key])
            rng.shuffle(paths)
            n = len(paths)
            n_val = max(1, round(n * fractions["val"]))
            n_test = max(1, round(n * fractions["test"]))
            n_train = n - n_val - n_test
            if n_train < 1:
                continue
            out["train"] += [(p, key) for p in paths[:n_train]]
            out["val"] += [(p, key) for p in paths[n_train : n_train + n_val]]
            out["test"] += [(p, key) for p in paths[n_train + n_val :]]
        return out
    raise VlkitError(f"split.by={how['by']!r}: unknown; use 'style' or 'random'")


def _materialise(spec: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """Compute class names and splits from the built metadata."""
    rows: list[tuple[str, str, dict]] = []
    for dataset in spec["datasets"]:
        for row in read_jsonl(_metadata_path(data_dir, dataset)):
            if not all(_matches(row, c) for c in spec.get("where", [])):
                continue
            key = _label_of(row, spec)
            if key is not None:
                rows.append((f"{dataset}/{row['image']}", key, row))
    assigned = _assign_split(rows, spec)
    counts: dict[str, int] = defaultdict(int)
    for _, key in assigned["train"]:
        counts[key] += 1
    min_per_class = spec.get("min_train_per_class", 1)
    if "classnames" in spec:
        keys = [k for k in spec["classnames"] if counts[k] >= min_per_class]
    else:
        keys = sorted(k for k, c in counts.items() if c >= min_per_class)
    index = {k: i for i, k in enumerate(keys)}
    splits = {s: sorted((p, index[k]) for p, k in assigned[s] if k in index) for s in SPLIT_NAMES}
    return {"classnames": _display_names(keys, spec), "class_keys": keys, **{s: [list(x) for x in v] for s, v in splits.items()}}


def load_task(name: str, data_dir: str | os.PathLike | None = None, write: bool | None = None) -> Task:
    """Load task `name` on the data dir (default as in `resolve_data_dir`; 'sample' = bundled sample).

    The split file is written unless `write` is False; by default the bundled
    sample is never written to (its split files ship with it).
    """
    root = resolve_data_dir(data_dir)
    if write is None:
        write = not is_bundled_sample(root)
    def_path = definition_path(name, root)
    spec = _read_definition(def_path)
    for dataset in spec["datasets"]:
        if not _metadata_path(root, dataset).exists():
            raise VlkitError(
                f"{name}: dataset {dataset} is not built in {root}; run "
                f"`vlkit data fetch {spec['recipe']}` and `vlkit data build {spec['recipe']}` "
                "(or pass --data-dir sample for the bundled sample)"
            )
    fp_src = json.dumps(spec, sort_keys=True) + "".join(_file_sha256(_metadata_path(root, d)) for d in spec["datasets"])
    fingerprint = hashlib.sha256(fp_src.encode()).hexdigest()[:16]
    split_file = root / "splits" / name / "split.json"
    data = None
    if split_file.exists():
        stored = json.loads(split_file.read_text(encoding="utf-8"))
        if stored.get("fingerprint") == fingerprint:
            data = stored
    if data is None:
        data = {"task": name, "fingerprint": fingerprint, **_materialise(spec, root)}
        if not data["classnames"] or not data["train"]:
            raise VlkitError(f"{name}: no training rows in {root}; check that the task's datasets are fully built")
        if write:
            try:
                io.write_json(split_file, data)
            except OSError:
                pass  # a read-only data dir: the split is deterministic, so nothing is lost
    return Task(
        name=name,
        description=spec.get("description", ""),
        classnames=list(data["classnames"]),
        templates=list(spec["templates"]),
        splits={s: [(p, int(y)) for p, y in data[s]] for s in SPLIT_NAMES},
        data_dir=root,
        definition=spec,
        fingerprint=fingerprint,
    )

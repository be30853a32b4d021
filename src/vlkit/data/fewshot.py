"""Few-shot splits exactly as CoOp draws them, written once and shared by every method.

CoOp (`generate_fewshot_dataset`) seeds the RNG, then for each class takes
`random.sample(items, K)` from the train split (all items when a class has
fewer than K: no repetition), and then does the same on the val split with
`min(K, 4)` per class. We do the same with a private `random.Random(seed)`,
classes in label order and items sorted by path, so the draw depends only on
(task split, K, seed). The drawn relative paths go to
`<data_dir>/splits/<task>/fewshot/shot_<K>-seed_<seed>.json`; CoOp, the
adapters and the linear probe all read that file, so they see the very same
shots. Base-to-new: sample on the full task, then call `.base_to_new()` on the
result (as CoCoOp subsamples classes after drawing shots).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from vlkit import io
from vlkit.data.recipes import is_bundled_sample
from vlkit.data.tasks import Task
from vlkit.errors import VlkitError

DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_SHOTS = (1, 2, 4, 8, 16)


def _draw(rows: list[tuple[str, int]], k: int, rng: random.Random) -> list[tuple[str, int]]:
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in rows:
        by_class[label].append(path)
    out: list[tuple[str, int]] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        chosen = rng.sample(items, k) if len(items) >= k else items
        out += [(p, label) for p in chosen]
    return out


def sample_fewshot(task: Task, k: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    """K shots per class from train and min(K, 4) per class from val, drawn by `seed` (CoOp's rule)."""
    if k < 1:
        raise VlkitError(f"shots={k}: must be at least 1")
    rng = random.Random(seed)
    train = _draw(task.splits["train"], k, rng)
    val = _draw(task.splits["val"], min(k, 4), rng)
    return {"train": train, "val": val}


def fewshot_path(task: Task, k: int, seed: int) -> Path:
    return task.split_dir / "fewshot" / f"shot_{k}-seed_{seed}.json"


def load_fewshot(task: Task, k: int, seed: int, write: bool | None = None) -> Task:
    """The task with its train/val replaced by the K-shot draw for `seed` (test unchanged).

    Reads the split file when it exists for this task version, else draws and
    saves it (unless `write` is False; by default not into the bundled sample),
    so later methods read exactly the same shots.
    """
    if write is None:
        write = not is_bundled_sample(task.data_dir)
    path = fewshot_path(task, k, seed)
    data = None
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("fingerprint") == task.fingerprint:
            data = {s: [(p, int(y)) for p, y in stored[s]] for s in ("train", "val")}
    if data is None:
        data = sample_fewshot(task, k, seed)
        if write:
            try:
                io.write_json(
                    path,
                    {"task": task.name, "fingerprint": task.fingerprint, "shots": k, "seed": seed,
                     **{s: [list(x) for x in v] for s, v in data.items()}},
                )
            except OSError:
                pass  # read-only data dir: the draw is deterministic, so nothing is lost
    return replace(task, name=f"{task.name}:{k}shot-seed{seed}", splits={**task.splits, **data})


def write_fewshot_splits(task: Task, shots: list[int] | tuple[int, ...] = DEFAULT_SHOTS,
                         seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS) -> list[Path]:
    """Write every (K, seed) split file for `task`; return their paths."""
    paths = []
    for k in shots:
        for seed in seeds:
            load_fewshot(task, k, seed, write=True)
            paths.append(fewshot_path(task, k, seed))
    return paths

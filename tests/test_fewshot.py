"""Few-shot splits: CoOp's draw, determinism by seed, shared split files of relative paths."""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from vlkit.data.fewshot import fewshot_path, load_fewshot, sample_fewshot, write_fewshot_splits
from vlkit.data.recipes import SAMPLE_DIR
from vlkit.data.tasks import load_task
from vlkit.errors import VlkitError


def _coop_reference(train, val, k, seed):
    """Dassl's generate_fewshot_dataset (repeat=False) with the global RNG seeded as CoOp does."""
    random.seed(seed)
    out = []
    for data_source, shots in ((train, k), (val, min(k, 4))):
        tracker = defaultdict(list)
        for item in data_source:
            tracker[item[1]].append(item)
        dataset = []
        for _, items in tracker.items():
            sampled = random.sample(items, shots) if len(items) >= shots else items
            dataset.extend(sampled)
        out.append(dataset)
    return out


@pytest.fixture(scope="module")
def task():
    return load_task("emoji-group", "sample")


@pytest.mark.parametrize(("k", "seed"), [(1, 1), (4, 2), (16, 3)])
def test_draw_matches_coop_reference(task, k: int, seed: int) -> None:
    # the split file is sorted by path; CoOp iterates classes in first-seen order, so order by label first
    train = sorted(task.splits["train"], key=lambda r: (r[1], r[0]))
    val = sorted(task.splits["val"], key=lambda r: (r[1], r[0]))
    ref_train, ref_val = _coop_reference(train, val, k, seed)
    ours = sample_fewshot(task, k, seed)
    assert ours["train"] == [tuple(x) for x in ref_train]
    assert ours["val"] == [tuple(x) for x in ref_val]


def test_k_per_class_and_val_min_k_4(task) -> None:
    for k in (1, 2, 8):
        draw = sample_fewshot(task, k, seed=1)
        for split, want in (("train", k), ("val", min(k, 4))):
            counts = defaultdict(int)
            for _, y in draw[split]:
                counts[y] += 1
            assert set(counts) == set(range(task.num_classes))
            assert all(c == want for c in counts.values())
            assert set(draw[split]) <= set(task.splits[split])


def test_fewer_items_than_k_takes_all_without_repeats(task) -> None:
    draw = sample_fewshot(task, 1000, seed=1)
    assert sorted(draw["train"]) == sorted(task.splits["train"])


def test_same_seed_same_ids_different_seed_different_ids(task) -> None:
    a, b, c = (sample_fewshot(task, 4, s) for s in (1, 1, 2))
    assert a == b
    assert a["train"] != c["train"] and a["val"] != c["val"]
    assert sample_fewshot(task, 4, 3)["train"] not in (a["train"], c["train"])


def test_split_file_written_with_relative_ids_and_shared(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    shutil.copytree(SAMPLE_DIR / "built", data_dir / "built")
    shutil.copytree(SAMPLE_DIR / "tasks", data_dir / "tasks")
    task = load_task("emoji-group", data_dir)
    paths = write_fewshot_splits(task, [1, 2], [1, 2, 3])
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    stored = json.loads(fewshot_path(task, 2, 1).read_text())
    assert stored["shots"] == 2 and stored["seed"] == 1 and stored["fingerprint"] == task.fingerprint
    assert all(not rel.startswith("/") and ".." not in rel for rel, _ in stored["train"] + stored["val"])
    # every later reader gets what the file says: edit it and load again
    stored["train"] = stored["train"][:3]
    fewshot_path(task, 2, 1).write_text(json.dumps(stored))
    shots = load_fewshot(task, 2, 1)
    assert [tuple(x) for x in stored["train"]] == shots.splits["train"]
    assert shots.splits["test"] == task.splits["test"]  # test is never subsampled


def test_fewshot_then_base_to_new(task) -> None:
    shots = load_fewshot(task, 2, 1)
    base, new = shots.base_to_new()
    assert base.num_classes == 5 and new.num_classes == 4
    assert len(base.splits["train"]) == 2 * 5 and len(new.splits["train"]) == 2 * 4


def test_bad_k(task) -> None:
    with pytest.raises(VlkitError, match="shots=0: must be at least 1"):
        sample_fewshot(task, 0, 1)

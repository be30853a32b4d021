"""Task definitions and split files: relative paths, styles kept apart, determinism, the bundled sample."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from test_recipes import make_emoji_source
from vlkit.cli import main
from vlkit.data.recipes import SAMPLE_DIR, emoji, read_jsonl, write_jsonl
from vlkit.data.tasks import DEFINITIONS_DIR, available_tasks, load_task
from vlkit.errors import VlkitError

ALL_TASKS = ["clipart-category", "emoji-flags", "emoji-group", "emoji-label", "emoji-skintone", "emoji-subgroup"]


def _relative_ok(rel: str) -> bool:
    return not os.path.isabs(rel) and ".." not in rel.split("/")


# ---------------------------------------------------------------- bundled sample


def test_every_task_is_defined_and_parses() -> None:
    assert available_tasks(SAMPLE_DIR) == ALL_TASKS
    for name in ALL_TASKS:
        spec = json.loads((DEFINITIONS_DIR / f"{name}.json").read_text())
        assert spec["name"] == name and spec["templates"] and all("{}" in t for t in spec["templates"])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_sample_tasks_load_with_relative_existing_paths(name: str) -> None:
    task = load_task(name, "sample")
    assert task.num_classes >= 5 and all(task.splits[s] for s in ("train", "val", "test"))
    for split, rows in task.splits.items():
        for rel, label in rows:
            assert _relative_ok(rel) and 0 <= label < task.num_classes
        assert all(p.is_file() for p in task.paths(split))
    stored = json.loads((SAMPLE_DIR / "splits" / name / "split.json").read_text())
    assert stored["fingerprint"] == task.fingerprint  # the shipped split file is the one in use
    assert all(_relative_ok(rel) for s in ("train", "val", "test") for rel, _ in stored[s])


def test_sample_is_open_licensed_small_and_has_a_notice() -> None:
    size = sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert size <= 15 * 1024 * 1024
    rows = read_jsonl(SAMPLE_DIR / "built/emoji/metadata.jsonl") + read_jsonl(SAMPLE_DIR / "built/openclipart/metadata.jsonl")
    styles = {r["style"] for r in rows}
    assert styles == {"twitter", "google", "openmoji", "openclipart"}
    assert not any("facebook" in p.as_posix() for p in SAMPLE_DIR.rglob("*"))
    notice = (SAMPLE_DIR / "NOTICE").read_text()
    for needle in ("CC-BY 4.0", "Apache License 2.0", "CC BY-SA 4.0", "public domain", "MIT License"):
        assert needle in notice
    first = Image.open(SAMPLE_DIR / "built/emoji" / rows[0]["image"])
    assert first.size == (64, 64) and first.mode == "RGB"


def test_sample_emoji_tasks_keep_styles_apart() -> None:
    task = load_task("emoji-group", "sample")
    styles = {s: {rel.split("/")[2] for rel, _ in task.splits[s]} for s in ("train", "val", "test")}
    assert styles == {"train": {"twitter"}, "val": {"google"}, "test": {"openmoji"}}
    assert task.classnames[0] == "smileys & emotion" and task.num_classes == 9


def test_sample_is_not_written_to(tmp_path: Path) -> None:
    before = sorted(p.as_posix() for p in SAMPLE_DIR.rglob("*"))
    load_task("emoji-skintone", SAMPLE_DIR)
    assert sorted(p.as_posix() for p in SAMPLE_DIR.rglob("*")) == before


def test_clipart_category_names_and_random_split() -> None:
    task = load_task("clipart-category", "sample")
    assert all("/" not in c and "_" not in c for c in task.classnames)
    train, val, test = ({rel for rel, _ in task.splits[s]} for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    per_class = [sum(1 for _, y in task.splits["train"] if y == c) for c in range(task.num_classes)]
    assert min(per_class) >= 6  # 60 % of 24


# ---------------------------------------------------------------- packaged definitions on a full-shaped build


@pytest.fixture(scope="module")
def emoji_data(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("emoji-tasks")
    make_emoji_source(data_dir)
    emoji.build(data_dir, progress=False, log=lambda s: None)
    return data_dir


def test_packaged_emoji_tasks_test_only_on_heldout_facebook(emoji_data: Path) -> None:
    for name in ("emoji-label", "emoji-group", "emoji-subgroup", "emoji-flags", "emoji-skintone"):
        task = load_task(name, emoji_data)
        train_val = [rel for s in ("train", "val") for rel, _ in task.splits[s]]
        assert train_val and not any("facebook" in rel for rel in train_val)
        assert task.splits["test"] and all(rel.startswith("emoji-facebook/images/facebook/") for rel, _ in task.splits["test"])
        assert {rel.split("/")[2] for rel, _ in task.splits["train"]} == {"twitter", "google"}
        assert {rel.split("/")[2] for rel, _ in task.splits["val"]} == {"openmoji"}


def test_packaged_task_labels(emoji_data: Path) -> None:
    label = load_task("emoji-label", emoji_data)
    assert label.classnames == ["flag: Japan", "grinning face", "smiling face", "waving hand"]  # no component, no regional indicator
    wave = label.classnames.index("waving hand")
    assert sum(1 for _, y in label.splits["train"] if y == wave) == 12  # base + 5 tones, 2 styles
    flags = load_task("emoji-flags", emoji_data)
    assert flags.classnames == ["Japan"]
    tone = load_task("emoji-skintone", emoji_data)
    assert tone.classnames == ["light", "medium-light", "medium", "medium-dark", "dark"]
    assert [y for _, y in tone.splits["test"]] == [0]  # facebook ships only the light variant here
    group = load_task("emoji-group", emoji_data)
    assert group.classnames == ["smileys & emotion", "people & body", "flags"]  # fixed order, empty groups dropped


def test_split_file_is_reused_and_refreshed_when_metadata_changes(emoji_data: Path, tmp_path: Path) -> None:
    import shutil

    data_dir = tmp_path / "d"
    shutil.copytree(emoji_data / "built", data_dir / "built")
    task = load_task("emoji-group", data_dir)
    split_file = data_dir / "splits/emoji-group/split.json"
    stored = json.loads(split_file.read_text())
    stored["train"] = stored["train"][:1]
    split_file.write_text(json.dumps(stored))
    assert len(load_task("emoji-group", data_dir).splits["train"]) == 1  # the file is the source of truth
    meta = data_dir / "built/emoji/metadata.jsonl"
    rows = read_jsonl(meta)
    write_jsonl(meta, [r for r in rows if r["style"] != "google"])
    refreshed = load_task("emoji-group", data_dir)
    assert refreshed.fingerprint != task.fingerprint
    assert len(refreshed.splits["train"]) == len(task.splits["train"]) // 2


def test_base_to_new_halves_classes_in_label_order() -> None:
    task = load_task("emoji-subgroup", "sample")
    base, new = task.base_to_new()
    m = -(-task.num_classes // 2)
    assert base.classnames == task.classnames[:m] and new.classnames == task.classnames[m:]
    for sub, offset in ((base, 0), (new, m)):
        for split in ("train", "test"):
            original = {rel: y for rel, y in task.splits[split]}
            assert all(original[rel] == y + offset for rel, y in sub.splits[split])
            assert all(0 <= y < sub.num_classes for _, y in sub.splits[split])
    assert len(base.splits["test"]) + len(new.splits["test"]) == len(task.splits["test"])


def test_data_dir_task_definition_overrides_the_packaged_one(emoji_data: Path, tmp_path: Path) -> None:
    import shutil

    data_dir = tmp_path / "d"
    shutil.copytree(emoji_data / "built", data_dir / "built")
    spec = json.loads((DEFINITIONS_DIR / "emoji-group.json").read_text())
    spec["split"] = {"by": "style", "train": ["google"], "val": ["twitter"], "test": ["openmoji"]}
    (data_dir / "tasks").mkdir()
    (data_dir / "tasks/emoji-group.json").write_text(json.dumps(spec))
    task = load_task("emoji-group", data_dir)
    assert {rel.split("/")[2] for rel, _ in task.splits["train"]} == {"google"}


def test_task_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(VlkitError, match=r"^nope: unknown task; choose one of clipart-category, emoji-flags"):
        load_task("nope", tmp_path)
    with pytest.raises(VlkitError, match=r"dataset emoji is not built in .*vlkit data fetch emoji.*--data-dir sample"):
        load_task("emoji-group", tmp_path)


def _cli(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0


def test_cli_info_prints_a_card(capsys) -> None:
    _cli(["data", "info", "emoji", "--data-dir", "sample", "--top", "3"])
    out = capsys.readouterr().out
    assert "| twitter | 448 | CC-BY-4.0 (Twemoji artwork) |" in out
    assert "| emoji-group | 9 | 448 | 448 | 448 |" in out
    _cli(["data", "info", "emoji-skintone", "--data-dir", "sample"])
    out = capsys.readouterr().out
    assert "| train | 75 | 0 | 0 | 75 |" in out and "Classes: 5" in out

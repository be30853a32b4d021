"""Datasets list (path, label/caption) items deterministically and fail with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlkit.data.datasets import CaptionTableDataset, ImageFolderDataset, Item, find_images, open_dataset
from vlkit.errors import VlkitError


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded by datasets")  # datasets never open images
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "pets"
    _touch(root / "dog" / "d1.png")
    _touch(root / "cat" / "nested" / "deeper" / "c2.JPG")
    _touch(root / "cat" / "c1.jpeg")
    _touch(root / "cat" / "readme.txt")
    _touch(root / "cat" / ".hidden.png")
    _touch(root / ".git" / "x.png")
    _touch(root / "zebra" / "z.webp")
    return root


def test_image_folder_sorted_classes_recursive(folder):
    ds = ImageFolderDataset(folder)
    assert ds.classnames == ["cat", "dog", "zebra"] and ds.classes == ds.classnames
    rel = [str(Path(p).relative_to(folder)) for p in ds.paths]
    assert rel == ["cat/c1.jpeg", "cat/nested/deeper/c2.JPG", "dog/d1.png", "zebra/z.webp"]
    assert ds.labels == [0, 0, 1, 2]
    assert ds.captions is None
    assert ds[2] == Item(str(folder / "dog" / "d1.png"), label=1)
    assert len(ds) == 4 and list(ds) == ds.items


def test_image_folder_extensions_filter(folder):
    ds = ImageFolderDataset(folder, extensions=["png", "jpeg", ".WEBP"])
    assert [Path(p).name for p in ds.paths] == ["c1.jpeg", "d1.png", "z.webp"]
    # cat has no png/webp: an empty class would shift labels, so it is an error by default
    with pytest.raises(VlkitError, match="class folders with no images: cat"):
        ImageFolderDataset(folder, extensions=["png"])


def test_image_folder_errors(tmp_path):
    with pytest.raises(VlkitError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(VlkitError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "file.txt")
    flat = tmp_path / "flat"
    _touch(flat / "a.png")
    with pytest.raises(VlkitError, match=r"no class subfolders \(1 images lie directly in it\)"):
        ImageFolderDataset(flat)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    with pytest.raises(VlkitError, match="no images found in its 2 class folders"):
        ImageFolderDataset(empty)


def test_image_folder_allow_empty_keeps_label_indices(tmp_path):
    _touch(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    _touch(tmp_path / "c" / "2.png")
    with pytest.raises(VlkitError) as info:
        ImageFolderDataset(tmp_path)
    assert "\n" not in str(info.value) and "allow_empty" in str(info.value)
    ds = ImageFolderDataset(tmp_path, allow_empty=True)
    assert ds.classnames == ["a", "b", "c"] and ds.labels == [0, 2]


def test_find_images_follows_symlinked_folders(tmp_path):
    _touch(tmp_path / "real" / "x.png")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "real")
    assert [p.name for p in find_images(tmp_path / "root")] == ["x.png"]
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real")  # a link back to its own parent
    assert [p.name for p in find_images(tmp_path / "real")] == ["x.png"]


# ------------------------------------------------------------------ tables


def test_csv_paths_relative_to_table_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "t.csv").write_text(
        'image,label,caption\nimg/a.png,dog,"a dog, running"\n/abs/b.png,cat,"two\nlines"\n', encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)  # a different working directory must not matter
    ds = CaptionTableDataset("data/t.csv", label_col="label", caption_col="caption")
    assert ds.paths == [str(Path("data") / "img" / "a.png"), "/abs/b.png"]
    assert ds.classnames == ["cat", "dog"] and ds.labels == [1, 0]
    assert ds.captions == ["a dog, running", "two\nlines"]


def test_jsonl_labels_indices_and_caption_lists(tmp_path):
    rows = [
        {"image": "a.png", "label": 1, "caption": ["first", "second"]},
        {"image": "b.png", "label": 0, "caption": "third"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = CaptionTableDataset(path, label_col="label", caption_col="caption", classnames=["zero", "one"])
    assert ds.labels == [1, 1, 0] and ds.classnames == ["zero", "one"]
    assert ds.captions == ["first", "second", "third"]
    assert ds.paths == [str(tmp_path / "a.png")] * 2 + [str(tmp_path / "b.png")]
    with pytest.raises(VlkitError, match="label index 1 out of range for 1 classes"):
        CaptionTableDataset(path, label_col="label", classnames=["zero"])


def test_label_names_follow_given_classnames(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("image,label\na.png,dog\nb.png,cat\n")
    ds = CaptionTableDataset(path, label_col="label", classnames=["dog", "cat"])
    assert ds.labels == [0, 1]
    with pytest.raises(VlkitError, match="labels not in the class list: cat"):
        CaptionTableDataset(path, label_col="label", classnames=["dog"])


def test_missing_column_names_it_and_lists_available(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("file,category\na.png,x\n")
    with pytest.raises(VlkitError) as info:
        CaptionTableDataset(path)
    assert str(info.value) == f"{path}: no column 'image' (image_col); available columns: file, category"
    with pytest.raises(VlkitError, match="no column 'caption' \\(caption_col\\); available columns: file, category"):
        CaptionTableDataset(path, image_col="file", caption_col="caption")


def test_table_row_errors_name_the_line(tmp_path):
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"image": "a.png"}\n{not json}\n')
    with pytest.raises(VlkitError, match=r"b.jsonl:2: not valid JSON"):
        CaptionTableDataset(bad_json)
    empty_cell = tmp_path / "e.csv"
    empty_cell.write_text("image,label\na.png,x\n,y\n")
    with pytest.raises(VlkitError, match=r"e.csv:3: empty 'image' value"):
        CaptionTableDataset(empty_cell)
    no_label = tmp_path / "n.csv"
    no_label.write_text("image,label\na.png,\n")
    with pytest.raises(VlkitError, match=r"n.csv:2: empty 'label' value"):
        CaptionTableDataset(no_label, label_col="label")


def test_table_file_errors(tmp_path):
    with pytest.raises(VlkitError, match="table does not exist"):
        CaptionTableDataset(tmp_path / "none.csv")
    (tmp_path / "h.csv").write_text("image,label\n")
    with pytest.raises(VlkitError, match="table has no rows"):
        CaptionTableDataset(tmp_path / "h.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(VlkitError, match=r"unsupported table type \.xlsx; use \.csv, \.tsv or \.jsonl"):
        CaptionTableDataset(tmp_path / "t.xlsx")


def test_open_dataset_picks_the_right_kind_and_columns(tmp_path, folder):
    assert isinstance(open_dataset(folder), ImageFolderDataset)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": 1, "path": "x.png", "category": "cat", "text": "a cat"}) + "\n")
    ds = open_dataset(path)
    assert (ds.image_col, ds.label_col, ds.caption_col) == ("path", "category", "text")
    assert ds.classnames == ["cat"] and ds.captions == ["a cat"]
    (tmp_path / "n.csv").write_text("id,label\n1,x\n")
    with pytest.raises(VlkitError, match=r"no image column \(tried image, path"):
        open_dataset(tmp_path / "n.csv")
    with pytest.raises(VlkitError, match="data path does not exist"):
        open_dataset(tmp_path / "missing")

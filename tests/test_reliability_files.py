"""Text files in other encodings, broken table lines, and outputs never left half-written."""

from __future__ import annotations

import json

import pytest
from reliability_corpus import make_class_folder, memoise_model_loading, run_cli, write_bad_files
from test_retrieval_fakes import make_squares

from vlkit.data.datasets import read_table
from vlkit.errors import VlkitError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    memoise_model_loading(monkeypatch)


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize("encoding, bom", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"),
                                           ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00")])
def test_unicode_with_a_byte_order_mark_is_read_correctly(tmp_path, encoding, bom):
    text = "image,label\ncafé.png,crème brûlée\n猫.png,猫\n"
    (tmp_path / "t.csv").write_bytes(bom + text.encode(encoding))
    rows, columns = read_table(tmp_path / "t.csv")
    assert columns == ["image", "label"] and [r["label"] for _, r in rows] == ["crème brûlée", "猫"]


@pytest.mark.parametrize("data, words", [
    ("café\ncrème\n".encode("latin-1"), "not UTF-8 (byte 0xe9 on line 1); it looks like Latin-1 or Windows-1252"),
    ("cat\ndog\n".encode("utf-16-le"), "it looks like UTF-16 without a byte-order mark"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "it looks like a binary file"),
])
def test_undecodable_text_is_one_line_naming_file_and_encoding(tmp_path, data, words):
    from vlkit.data.datasets import read_text

    (tmp_path / "classes.txt").write_bytes(data)
    with pytest.raises(VlkitError) as e:
        read_text(tmp_path / "classes.txt", "classes file")
    assert str(e.value).startswith(f"{tmp_path / 'classes.txt'}: classes file is not UTF-8") and words in str(e.value)


def test_zeroshot_reads_a_latin1_class_list_as_one_error_and_a_utf16_table_fine(tmp_path, tiny_clip_dir):
    data = make_class_folder(tmp_path / "data", ("cat", "dog"))
    (tmp_path / "classes.txt").write_bytes("chat\nchien à poils\n".encode("latin-1"))
    res = run_cli(["zeroshot", "--model", tiny_clip_dir, "--data", data, "--classes", tmp_path / "classes.txt", "--out", tmp_path / "runs"])
    assert res.failed_cleanly() and "classes.txt: classes file is not UTF-8" in res.error_lines[0], res.describe()
    table = tmp_path / "data" / "t.csv"
    table.write_bytes("image,label\ncat/0.png,cat\ndog/0.png,dog\n".encode("utf-16"))  # with its BOM, as Excel writes "Unicode text"
    res = run_cli(["zeroshot", "--model", tiny_clip_dir, "--data", table, "--out", tmp_path / "runs"])
    assert res.code == 0, res.describe()


@pytest.mark.parametrize("name, text, words", [
    ("t.jsonl", '{"image": "a.png", "label": "x"}\n{"image": "b.png", "label": \n', "t.jsonl:2: not valid JSON (Expecting value at column 29)"),
    ("t.jsonl", '{"image": "a.png"}\n[1, 2]\n', "t.jsonl:2: expected a JSON object, got list"),
    ("t.csv", "image,label\na.png,x\nb.png,y,surplus\n", "t.csv:3: 3 fields but the header has 2"),
    ("t.csv", "image,label\na.png,x\nb\x00.png,y\n", "t.csv:3: holds a NUL character"),
])
def test_a_broken_table_line_is_named_with_its_number(tmp_path, name, text, words):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(VlkitError, match="^" + str(tmp_path / words).replace("(", r"\(").replace(")", r"\)")):
        read_table(tmp_path / name)
    res = run_cli(["zeroshot", "--model", "unused", "--data", tmp_path / name, "--out", tmp_path / "runs"])
    assert res.failed_cleanly() and words in res.error_lines[0], res.describe()


# ---------------------------------------------------------------- half-written outputs


def test_a_build_of_unreadable_images_leaves_nothing_and_a_rebuild_works(tmp_path, tiny_clip_dir):
    bad = tmp_path / "bad"
    write_bad_files(bad)
    out = tmp_path / "index"
    res = run_cli(["index", "build", "--images", bad, "--out", out, "--model", tiny_clip_dir, "--no-progress"])
    assert res.failed_cleanly() and "none of its" in res.error_lines[0] and "nothing was written" in res.error_lines[0], res.describe()
    assert not out.exists()
    out.mkdir()  # an existing, empty --out is kept (and emptied again) on failure
    assert run_cli(["index", "build", "--images", bad, "--out", out, "--model", tiny_clip_dir, "--no-progress"]).failed_cleanly()
    assert out.is_dir() and not any(out.iterdir())

    good = tmp_path / "good"
    make_squares(good, ["red", "blue"])
    res = run_cli(["index", "build", "--images", good, "--out", out, "--model", tiny_clip_dir, "--no-progress"])
    assert res.code == 0, res.describe()
    assert run_cli(["search", out, "--text", "red", "--json"]).code == 0


def test_a_folder_left_by_a_build_that_committed_nothing_takes_another_build(tmp_path, tiny_clip_dir):
    from vlkit.models import load_model
    from vlkit.retrieval.index import create_index

    out = tmp_path / "index"
    create_index(out, load_model(tiny_clip_dir), tmp_path / "somewhere-else")  # what an interrupted build leaves
    make_squares(tmp_path / "good", ["green"])
    res = run_cli(["index", "build", "--images", tmp_path / "good", "--out", out, "--model", tiny_clip_dir, "--no-progress"])
    assert res.code == 0, res.describe()
    assert json.loads((out / "index.json").read_text())["image_root"] == str((tmp_path / "good").resolve())


def test_damaged_or_missing_faiss_and_manifest_are_one_line_and_repairable(tmp_path, tiny_clip_dir):
    make_squares(tmp_path / "good", ["red", "blue", "green"])
    out = tmp_path / "index"
    assert run_cli(["index", "build", "--images", tmp_path / "good", "--out", out, "--model", tiny_clip_dir, "--no-progress"]).code == 0
    faiss_file = out / "images.faiss"
    for damage in (lambda: faiss_file.write_bytes(b"garbage" * 10), lambda: faiss_file.write_bytes(faiss_file.read_bytes()[:40]), faiss_file.unlink):
        if not faiss_file.exists():
            run_cli(["index", "add", out, "--images", tmp_path / "good", "--no-progress"])
        damage()
        res = run_cli(["search", out, "--text", "red"])
        assert res.failed_cleanly() and "images.faiss" in res.error_lines[0] and "vlkit index add" in res.error_lines[0], res.describe()
        res = run_cli(["index", "add", out, "--images", tmp_path / "good", "--no-progress"])  # the advertised repair
        assert res.code == 0, res.describe()
        assert run_cli(["search", out, "--text", "red"]).code == 0
    (out / "index.json").write_text("{not json")
    res = run_cli(["search", out, "--text", "red"])
    assert res.failed_cleanly() and "index.json: damaged" in res.error_lines[0], res.describe()


def test_zeroshot_on_only_unreadable_images_exits_2_without_a_run_folder(tmp_path, tiny_clip_dir):
    data = tmp_path / "data"
    write_bad_files(data / "cat")
    write_bad_files(data / "dog")
    res = run_cli(["zeroshot", "--model", tiny_clip_dir, "--data", data, "--out", tmp_path / "runs"])
    assert res.failed_cleanly() and "none of the" in res.error_lines[0] and "could be read" in res.error_lines[0], res.describe()
    assert not (tmp_path / "runs").exists()

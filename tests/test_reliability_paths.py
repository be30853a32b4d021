"""One place judges listed paths (vlkit.data.paths): symlink loops, dangling links and links
leaving an index's root are skipped and listed by every command, never fatal."""

from __future__ import annotations

import json
import os

import pytest
from reliability_corpus import make_class_folder, memoise_model_loading, run_cli
from test_retrieval_fakes import make_squares


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    memoise_model_loading(monkeypatch)


def _add_bad_links(folder, outside_target=None):
    os.symlink("loop2.png", folder / "loop1.png")
    os.symlink("loop1.png", folder / "loop2.png")
    os.symlink("gone.png", folder / "dangling.png")
    if outside_target is not None:
        os.symlink(outside_target, folder / "escape.png")


def test_check_path_names_each_kind(tmp_path):
    from vlkit.data.paths import check_path

    make_squares(tmp_path / "root", ["red"])
    make_squares(tmp_path / "elsewhere", ["blue"])
    _add_bad_links(tmp_path / "root", tmp_path / "elsewhere" / "blue.png")
    root = (tmp_path / "root").resolve()
    assert check_path(tmp_path / "root" / "red.png", root) is None
    assert check_path(tmp_path / "root" / "loop1.png").startswith("symlink loop")
    assert check_path(tmp_path / "root" / "dangling.png").startswith("dangling symlink (its target gone.png")
    assert check_path(tmp_path / "root" / "escape.png") is None  # links may lead anywhere without a root
    assert "outside the image root" in check_path(tmp_path / "root" / "escape.png", root)
    assert check_path(tmp_path / "root", None) == "is a folder, not an image file"
    assert check_path(tmp_path / "nope.png") == "file not found"


def test_index_build_skips_and_lists_loops_dangling_and_escaping_links(tmp_path, tiny_clip_dir):
    make_squares(tmp_path / "data", ["red", "green"])
    make_squares(tmp_path / "elsewhere", ["blue"])
    _add_bad_links(tmp_path / "data", tmp_path / "elsewhere" / "blue.png")
    out = tmp_path / "index"
    res = run_cli(["index", "build", "--images", tmp_path / "data", "--out", out, "--model", tiny_clip_dir, "--no-progress"])
    assert res.code == 0, res.describe()
    skipped = dict(map(tuple, json.loads((out / "skipped.json").read_text())))
    assert set(map(os.path.basename, skipped)) == {"loop1.png", "loop2.png", "dangling.png", "escape.png"}
    reasons = {os.path.basename(p): r for p, r in skipped.items()}
    assert reasons["loop1.png"].startswith("symlink loop") and reasons["dangling.png"].startswith("dangling symlink")
    assert reasons["escape.png"].startswith("symlink to") and "outside the image root" in reasons["escape.png"]
    assert json.loads((out / "index.json").read_text())["collections"]["images"]["count"] == 2
    assert "skipped 4 unreadable images" in res.err

    # index add with a table naming the same kinds of path: listed again, never fatal
    more = tmp_path / "data" / "more"
    make_squares(more, ["yellow"])
    (tmp_path / "data" / "t.csv").write_text("image,caption\nmore/yellow.png,a yellow square\nloop1.png,x\ndangling.png,y\n")
    res = run_cli(["index", "add", out, "--images", tmp_path / "data" / "t.csv", "--no-progress"])
    assert res.code == 0, res.describe()
    assert json.loads((out / "index.json").read_text())["collections"]["images"]["count"] == 3


def test_a_build_of_only_unusable_paths_is_one_line_and_leaves_nothing(tmp_path, tiny_clip_dir):
    (tmp_path / "data").mkdir()
    make_squares(tmp_path / "elsewhere", ["blue"])
    _add_bad_links(tmp_path / "data", tmp_path / "elsewhere" / "blue.png")
    out = tmp_path / "index"
    res = run_cli(["index", "build", "--images", tmp_path / "data", "--out", out, "--model", tiny_clip_dir, "--no-progress"])
    assert res.failed_cleanly(), res.describe()
    assert "none of its" in res.error_lines[0] and not out.exists()


def test_eval_retrieval_lists_bad_table_paths(tmp_path, tiny_clip_dir):
    make_squares(tmp_path / "data", ["red", "green", "blue"])
    _add_bad_links(tmp_path / "data")
    rows = [{"image": f"{n}.png", "caption": f"a {n} square"} for n in ("red", "green", "blue", "loop1", "dangling")]
    (tmp_path / "data" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_cli(["eval", "retrieval", "--data", tmp_path / "data" / "c.jsonl", "--model", tiny_clip_dir, "--runs-dir", tmp_path / "runs"])
    assert res.code == 0, res.describe()
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 3
    assert sorted(os.path.basename(p) for p, _ in metrics["skipped"]) == ["dangling.png", "loop1.png"]


def test_zeroshot_and_coop_data_skip_links_and_bad_files(tmp_path, tiny_clip_dir):
    data = make_class_folder(tmp_path / "data", ("cat", "dog"), per_class=2)
    _add_bad_links(data / "cat")
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    res = run_cli(["zeroshot", "--model", tiny_clip_dir, "--data", data, "--out", tmp_path / "zs"])
    assert res.code == 0, res.describe()
    (run,) = (tmp_path / "zs").iterdir()
    skipped = {os.path.basename(s["path"]): s["reason"] for s in json.loads((run / "metrics.json").read_text())["skipped"]}
    assert set(skipped) == {"loop1.png", "loop2.png", "dangling.png", "broken.png"}
    assert skipped["loop1.png"].startswith("symlink loop")

    res = run_cli(["coop", "train", "--model", tiny_clip_dir, "--data", data, "--epochs", "1", "--n-ctx", "2", "--views", "1",
                   "--out", tmp_path / "coop"])
    assert res.code == 0, res.describe()
    (run,) = (tmp_path / "coop").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_images"] == 4
    assert {os.path.basename(s["path"]) for s in metrics["train_skipped"]} == {"loop1.png", "loop2.png", "dangling.png", "broken.png"}
    assert "skipped 4 unreadable training images" in res.err


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_an_output_or_input_through_a_broken_link_is_one_line_naming_the_link(tmp_path, kind):
    from vlkit.commands import validate
    from vlkit.errors import VlkitError

    link = tmp_path / "out"
    if kind == "loop":
        link.symlink_to(link)
    else:
        link.symlink_to(tmp_path / "gone")
    for check in (lambda: validate.out_folder("--out", link), lambda: validate.out_folder("--out", link / "run"),
                  lambda: validate.existing("--model", link)):
        with pytest.raises(VlkitError) as exc:
            check()
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith("--") and str(link) in msg and "remove the link" in msg
    assert not (tmp_path / "gone").exists()

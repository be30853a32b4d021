"""Every argument is checked before a model loads or an output is made (vlkit.commands.validate).

Each case runs with model loading forbidden: a check that only fires after the model
has loaded fails the test, and no output folder may appear."""

from __future__ import annotations

import json

import pytest
import torch
from reliability_corpus import forbid_model_loading, make_class_folder, run_cli
from test_retrieval_fakes import make_caption_table


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_dir):
    """Inputs that are fine except for the argument under test: data, an index, a prompt, a file."""
    root = tmp_path_factory.mktemp("rel-args")
    data = make_class_folder(root / "data", ("cat", "dog"), per_class=2)
    one = make_class_folder(root / "one", ("cat",), per_class=2)
    hollow = make_class_folder(root / "hollow", ("cat", "dog"), per_class=1)
    (hollow / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")  # dog keeps no readable image
    table = make_caption_table(root / "cap")
    res = run_cli(["index", "build", "--images", table, "--out", root / "index", "--model", tiny_clip_dir, "--no-progress"])
    assert res.code == 0, res.describe()
    (root / "afile.txt").write_text("I am a file")
    return {"data": data, "one": one, "hollow": hollow, "table": table, "index": root / "index", "file": root / "afile.txt",
            "new": root / "new-out", "model": str(tiny_clip_dir)}


def _cases(w):
    d, t, i, f, new, m = w["data"], w["table"], w["index"], w["file"], w["new"], w["model"]
    coop = ["coop", "train", "--model", m, "--data", d, "--out", new]
    cuda7 = [] if torch.cuda.is_available() and torch.cuda.device_count() > 7 else [(coop + ["--device", "cuda:7"], "cuda:7")]
    return [
        (coop + ["--lr", "-1"], "--lr -1.0: must be greater than 0"),
        (coop + ["--lr", "nan"], "--lr nan: must be a finite number"),
        (coop + ["--lr", "inf"], "--lr inf: must be a finite number"),
        (coop + ["--device", "banana"], "--device 'banana': not a device"),
        *cuda7,
        (["coop", "train", "--model", m, "--data", w["one"], "--out", new], "has one class ('cat')"),
        (["coop", "train", "--model", m, "--data", w["hollow"], "--out", new], "no readable training image left for class 'dog'"),
        (coop + ["--position", "side"], "--position 'side': unknown"),
        (["zeroshot", "--model", m, "--data", d, "--batch-size", "0", "--out", new], "--batch-size"),
        (["zeroshot", "--model", m, "--data", d, "--out", f], "is an existing file"),
        (["zeroshot", "--model", m, "--data", d, "--templates", "single", "--out", new], "ambiguous"),
        (["index", "build", "--images", t, "--out", new, "--model", m, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["index", "build", "--images", t, "--out", new, "--model", m, "--chunk-size", "0"], "--chunk-size 0: must be at least 1"),
        (["index", "build", "--images", t, "--out", new, "--model", m, "--caption-template", "{"], "Single '{'"),
        (["index", "build", "--images", t, "--out", new, "--model", m, "--caption-template", "{label.__class__}"], "not a plain field"),
        (["index", "build", "--images", t, "--out", new, "--model", m, "--caption-template", "{0}"], "names field '0'"),
        (["index", "build", "--images", t, "--out", f, "--model", m], "is an existing file"),
        (["index", "build", "--images", t, "--out", i, "--model", m], "an index already exists there"),
        (["index", "add", i, "--images", t, "--chunk-size", "0"], "--chunk-size 0"),
        (["index", "add", i, "--images", t, "--caption-template", "{label!r}"], "not a plain field"),
        (["eval", "retrieval", "--data", t, "--model", m, "--batch-size", "0", "--runs-dir", new], "--batch-size 0"),
        (["eval", "retrieval", "--data", t, "--model", m, "--caption-template", "{label[0]}", "--runs-dir", new], "not a plain field"),
        (["serve", i, "--port", "99999"], "--port 99999: must be between 1 and 65535"),
        (["serve", i, "--port", "0"], "--port 0"),
        (["serve", i, "--max-k", "0"], "--max-k 0: must be at least 1"),
        (["serve", i, "--max-upload-mb", "-1"], "--max-upload-mb -1.0: must be greater than 0"),
        (["serve", i, "--max-upload-mb", "nan"], "must be a finite number"),
        (["serve", i, "--max-image-mp", "0"], "--max-image-mp 0.0"),
        (["search", i, "--text", "red", "-k", "0"], "-k 0: must be at least 1"),
        (["search", i, "--text", "red", "--target", "videos"], "--target 'videos'"),
        (["search", i, "--text", "   "], "--text: empty"),
        (["predict", "--prompt", f, "--images", d, "--device", "banana", "--out", new], "--device 'banana'"),
        (["predict", "--prompt", f, "--images", d, "--out", f], "is an existing file"),
        (["bench", "fewshot", "--tasks", "emoji-group", "--shots", "1", "0", "--out", new], "--shots 0"),
        (["bench", "fewshot", "--tasks", "emoji-group", "--views", "0", "--out", new], "--views 0"),
        (["bench", "fewshot", "--tasks", "no-such-task", "--out", new], "no-such-task: unknown task"),
        (["bench", "report", "--from", d, "--out", f], "is an existing file"),
        (["demo", "--out", f], "is an existing file"),
        (["data", "info", "emoji", "--top", "0"], "--top 0"),
        (["data", "build", "emoji", "--size", "100000"], "--size 100000: too large"),
    ]


def test_bad_arguments_fail_in_one_line_before_any_model_or_output(world, monkeypatch):
    forbid_model_loading(monkeypatch)
    failures = []
    for argv, words in _cases(world):
        res = run_cli(argv)
        if not res.failed_cleanly() or words not in res.error_lines[0] or len(res.err.strip().splitlines()) > 25:
            failures.append(f"{' '.join(map(str, argv))}\n{res.describe()}")
        if world["new"].exists():
            failures.append(f"{' '.join(map(str, argv))}: created {world['new']}")
    assert not failures, "\n\n".join(failures)


def test_search_k_is_bounded_by_the_index_size(world):
    res = run_cli(["search", world["index"], "--text", "red", "-k", "100000000", "--json"])
    assert res.code == 0, res.describe()
    assert len(json.loads(res.out)["results"]) == 6 and "-k 100000000: the index holds 6 images; showing all 6" in res.err


def test_caption_templates_are_filled_never_evaluated(tmp_path):
    from vlkit.data.datasets import caption_fields, fill_caption
    from vlkit.errors import VlkitError
    from vlkit.retrieval.collection import read_source

    assert caption_fields("an emoji of {label} ({group name}) {{literal}}") == ["label", "group name"]
    assert fill_caption("an emoji of {label} {{x}}", {"label": "cat"}, "row 1") == "an emoji of cat {x}"
    for bad in ("{label.__class__}", "{label.__class__.__mro__}", "{label[0]}", "{label!r}", "{label:>9}", "{}", "{", "no fields"):
        with pytest.raises(VlkitError, match="caption template"):
            caption_fields(bad)
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.png", "label": "x"}\n')
    with pytest.raises(VlkitError, match="not a plain field"):
        read_source(table, caption_template="{label.__class__}")

"""`vlkit coop train`, `vlkit coop words` and `vlkit predict --prompt` end to end on a tiny CLIP."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from vlkit.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("coopdata")
    for name, colour in (("cat", (230, 40, 40)), ("dog", (40, 40, 230))):
        (root / name).mkdir()
        for i in range(3):
            im = Image.new("RGB", (40, 40), colour)
            im.paste((255, 255, 255), (4 * i, 4 * i, 10 + 4 * i, 30))
            im.save(root / name / f"{i}.png")
    return root


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


def test_train_then_predict_then_words(tmp_path, folder, tiny_clip_dir, capsys, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    code, _ = _run(["coop", "train", "--model", str(tiny_clip_dir), "--data", str(folder), "--epochs", "2",
                    "--n-ctx", "4", "--views", "2", "--batch-size", "4", "--out", str(tmp_path / "runs")], capsys)
    assert code in (0, None)
    (run,) = list((tmp_path / "runs").iterdir())
    meta = json.loads((run / "prompt" / "prompt.json").read_text())
    assert meta["classnames"] == ["cat", "dog"] and meta["options"]["n_ctx"] == 4
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["lr"] == 0.002 and config["settings"]["views"] == 2
    assert config["text_path"] == "shared-prefix"  # a causal CLIP tower, unified context, class at the end
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and len(metrics["history"]) == 2
    assert (run / "nearest_words.txt").read_text().count("ctx ") == 4

    code, cap = _run(["predict", "--prompt", str(run / "prompt"), "--images", str(folder / "cat"), "--top-k", "2",
                      "--out", str(tmp_path / "pred")], capsys)
    assert code in (0, None)
    assert cap.out.startswith("classified 3 images (0 skipped)") and len(cap.out.splitlines()) == 4  # a summary, not a line per image
    (pred,) = list((tmp_path / "pred").iterdir())
    rows = list(csv.DictReader(open(pred / "predictions.csv", encoding="utf-8")))
    assert list(rows[0]) == ["path", "prediction", "probability", "top1", "top1_probability", "top2", "top2_probability"]
    assert len(rows) == 3 and all(r["prediction"] == r["top1"] in {"cat", "dog"} for r in rows)
    assert all(abs(float(r["top1_probability"]) + float(r["top2_probability"]) - 1) < 1e-5 for r in rows)
    records = json.loads((pred / "predictions.json").read_text())
    assert [r["path"] for r in records] == [r["path"] for r in rows] and records[0]["top"][0]["class"] == rows[0]["top1"]

    # a unified prompt applies to new class names
    code, cap = _run(["predict", "--prompt", str(run / "prompt"), "--images", str(folder / "dog" / "0.png"),
                      "--classes", "bird,car,tree", "--out", str(tmp_path / "pred2")], capsys)
    (pred,) = list((tmp_path / "pred2").iterdir())
    assert code in (0, None) and json.loads((pred / "predictions.json").read_text())[0]["prediction"] in {"bird", "car", "tree"}

    code, cap = _run(["coop", "words", "--prompt", str(run / "prompt"), "--k", "2"], capsys)
    assert code in (0, None) and "nearest words:" in cap.out


def test_prompt_on_another_backbone_is_refused(tmp_path, folder, tiny_clip_dir, tiny_dual_dir, capsys, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    code, _ = _run(["coop", "train", "--model", str(tiny_clip_dir), "--data", str(folder), "--epochs", "1",
                    "--n-ctx", "2", "--out", str(tmp_path / "runs")], capsys)
    (run,) = list((tmp_path / "runs").iterdir())
    # no --views: one view per epoch is all a 1-epoch run can use, so it caches one, not DEFAULT_VIEWS
    assert json.loads((run / "config.json").read_text())["settings"]["views"] == 1
    code, cap = _run(["predict", "--prompt", str(run / "prompt"), "--model", str(tiny_dual_dir),
                      "--images", str(folder)], capsys)
    assert code == 2
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "trained on backbone" in err and "load the same backbone" in err


def test_bad_inputs_fail_with_one_line(tmp_path, capsys):
    code, cap = _run(["coop", "train", "--model", "x", "--out", str(tmp_path)], capsys)
    assert code == 2 and "exactly one of --task NAME or --data PATH" in cap.err
    code, cap = _run(["predict", "--prompt", str(tmp_path / "nope"), "--images", str(tmp_path)], capsys)
    assert code == 2 and "does not exist" in cap.err and len(cap.err.strip().splitlines()) == 1


def test_train_on_a_bundled_task_scores_its_test_split(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    code, cap = _run(["coop", "train", "--model", str(tiny_clip_dir), "--task", "emoji-skintone", "--data-dir", "sample",
                      "--shots", "2", "--epochs", "1", "--n-ctx", "2", "--csc", "--views", "1",
                      "--out", str(tmp_path / "runs")], capsys)
    assert code in (0, None)
    (run,) = list((tmp_path / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["num_classes"] == 5 and metrics["test"]["n"] > 0
    assert metrics["zeroshot_test_top1"]["template"] == "a photo of a {}."
    assert "nearest words per class:" in cap.out
    meta = json.loads((run / "prompt" / "prompt.json").read_text())
    assert meta["options"]["csc"] is True and meta["context_shape"][:2] == [5, 2]

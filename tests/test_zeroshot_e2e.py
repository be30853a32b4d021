"""Zero-shot classification end to end on a tiny random CLIP: API, run folder, CLI errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vlkit import zeroshot
from vlkit.cli import main as cli_main

CLASSES = ["cat", "dog", "red heart"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    zeroshot.clear_memory_cache()
    yield
    zeroshot.clear_memory_cache()


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 2 small images, plus one corrupt file that must be skipped, not fatal."""
    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(2):
            px = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"this is not a png")
    return root


def _reference_logits(model, paths, classifier):
    """What classify must compute, from the model's own pieces."""
    from vlkit.data.images import load_image

    pix = torch.stack([model.preprocess(load_image(p)) for p in paths])
    with torch.no_grad():
        img = model.encode_image(pix)
    return model.logit_scale * img @ classifier.T


def test_classify_matches_model_pieces_and_skips_bad_file(tiny_clip_model, image_folder):
    result = zeroshot.classify(tiny_clip_model, image_folder, templates="ensemble", batch_size=4, progress=False)
    assert result.classnames == CLASSES  # from the folder names
    assert len(result.paths) == 6
    assert [os.path.basename(p) for p, _ in result.skipped] == ["broken.png"]
    assert result.labels == [0, 0, 1, 1, 2, 2]
    classifier = zeroshot.zeroshot_classifier(tiny_clip_model, CLASSES, "ensemble")
    expected = _reference_logits(tiny_clip_model, result.paths, classifier)
    assert torch.allclose(result.logits, expected, atol=1e-4)
    m = result.metrics()
    assert sum(map(sum, m["confusion_matrix"])) == 6
    assert m["top1"] == pytest.approx(sum(p == y for p, y in zip(result.predictions, result.labels)) / 6)
    assert m["num_skipped"] == 1 and m["skipped"][0]["path"].endswith("broken.png")


def test_ensemble_and_single_give_different_classifiers(tiny_clip_model):
    single = zeroshot.zeroshot_classifier(tiny_clip_model, CLASSES, "photo")
    ens = zeroshot.zeroshot_classifier(tiny_clip_model, CLASSES, "ensemble")
    assert single.shape == ens.shape == (3, tiny_clip_model.embed_dim)
    assert torch.allclose(ens.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(single, ens, atol=1e-3)


def test_class_list_overrides_folder_names(tiny_clip_model, image_folder, tmp_path):
    # reordered names map by name
    r = zeroshot.classify(tiny_clip_model, image_folder, ["red heart", "cat", "dog"], progress=False)
    assert r.labels == [1, 1, 2, 2, 0, 0]
    # same count, other names: display names for the sorted folders, by position
    r = zeroshot.classify(tiny_clip_model, image_folder, ["tabby cat", "puppy", "heart"], progress=False)
    assert r.labels == [0, 0, 1, 1, 2, 2] and r.classnames == ["tabby cat", "puppy", "heart"]


def test_table_with_string_labels(tiny_clip_model, image_folder, tmp_path):
    table = tmp_path / "data.csv"
    rows = [("images/dog/0.png", "dog"), ("images/cat/1.png", "cat")]
    table.write_text("image,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    r = zeroshot.classify(tiny_clip_model, table, CLASSES, progress=False)
    assert r.labels == [1, 0] and [os.path.basename(p) for p in r.paths] == ["0.png", "1.png"]
    # JSONL with its own column names; classes from the table (sorted distinct labels)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"file": p, "kind": y}) + "\n" for p, y in rows))
    items = zeroshot.as_labeled_images(jsonl, image_col="file", label_col="kind")
    assert items.classnames == ["cat", "dog"] and items.labels == [1, 0]


def _run_cli(args, tmp_path):
    env = dict(os.environ, VLKIT_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "vlkit.cli", "zeroshot", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _call_cli(args):
    """Run the CLI in-process (saves a Python start-up); typer ends with SystemExit(0)."""
    try:
        cli_main(["zeroshot", *args])
    except SystemExit as e:
        assert e.code in (0, None), e


def _run_folder(out):
    (run,) = list(out.iterdir())
    return run


def test_cli_writes_run_folder(tiny_clip_dir, image_folder, tmp_path):
    out = tmp_path / "runs"
    _call_cli(["--model", str(tiny_clip_dir), "--data", str(image_folder), "--templates", "ensemble", "--out", str(out), "--batch-size", "4"])
    run = _run_folder(out)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.json", "predictions.csv"]
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["templates"] == "ensemble" and config["settings"]["batch_size"] == 4
    assert len(config["prompt_templates"]) == 80 and config["classnames"] == CLASSES
    assert config["model_fingerprint"] and "torch" in config["versions"]
    assert config["text_path"] == "shared-prefix"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("top1", "top5", "mean_per_class_recall", "per_class_accuracy", "confusion_matrix", "skipped"):
        assert key in metrics
    assert metrics["top5"] == 1.0  # 3 classes: top-5 covers all
    assert metrics["num_skipped"] == 1
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"path", "label", "prediction", "probability", "correct", "top3"}
    assert [r["label"] for r in rows] == ["cat", "cat", "dog", "dog", "red heart", "red heart"]
    correct = sum(int(r["correct"]) for r in rows)
    assert metrics["top1"] == pytest.approx(correct / 6)
    cm = metrics["confusion_matrix"]
    for r in rows:  # every prediction is counted in its confusion cell
        assert r["prediction"] in CLASSES and r["top3"].split("|")[0] == r["prediction"]
    assert sum(cm[i][i] for i in range(3)) == correct


def test_cli_rerun_is_deterministic_with_and_without_cache(tiny_clip_dir, image_folder, tmp_path):
    outs = []
    for i, extra in enumerate([[], [], ["--no-cache"]]):
        out = tmp_path / f"runs{i}"
        _call_cli(["--model", str(tiny_clip_dir), "--data", str(image_folder), "--out", str(out), "--seed", "3", *extra])
        outs.append(_run_folder(out))
    preds = [(r / "predictions.csv").read_text() for r in outs]
    metrics = [(r / "metrics.json").read_text() for r in outs]
    assert preds[0] == preds[1] == preds[2]
    assert metrics[0] == metrics[1] == metrics[2]


@pytest.mark.parametrize("case", ["missing_model", "empty_classes", "missing_data"])
def test_cli_errors_are_one_line_and_nonzero(case, tiny_clip_dir, image_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "runs"
    args = {
        "missing_model": ["--model", str(tmp_path / "no_such_model"), "--data", str(image_folder)],
        "empty_classes": ["--model", str(tiny_clip_dir), "--data", str(image_folder), "--classes", str(empty)],
        "missing_data": ["--model", str(tiny_clip_dir), "--data", str(tmp_path / "no_such_data")],
    }[case]
    r = _run_cli([*args, "--out", str(out)], tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    named = {"missing_model": "no_such_model", "empty_classes": "empty.txt", "missing_data": "no_such_data"}[case]
    assert named in lines[0]
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("fixture", ["tiny_clip_model", "tiny_dual_model"])
def test_classifier_equals_per_class_loop_on_real_towers(fixture, request):
    """The batched, chunked classifier equals the textbook per-class loop (CLIP's notebook)."""
    model = request.getfixturevalue(fixture)
    templates = zeroshot.resolve_templates("ensemble")[:7]
    batched = zeroshot.zeroshot_classifier(model, CLASSES, templates, batch_size=5, cache=False)
    rows = []
    for c in CLASSES:
        f = model.embed_texts([t.format(c) for t in templates])
        f = f / f.norm(dim=-1, keepdim=True)
        m = f.mean(dim=0)
        rows.append(m / m.norm())
    assert torch.allclose(batched, torch.stack(rows), atol=1e-5)


def test_cli_task_split_uses_task_classes_and_templates(tiny_clip_dir, tmp_path):
    from vlkit.data.tasks import load_task

    task = load_task("emoji-group", "sample")
    out = tmp_path / "runs"
    _call_cli(["--model", str(tiny_clip_dir), "--task", "emoji-group", "--data-dir", "sample", "--split", "val", "--out", str(out)])
    run = _run_folder(out)
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["task"] == "emoji-group" and config["settings"]["templates"] == "task"
    assert config["classnames"] == task.classnames and config["prompt_templates"] == task.templates
    assert config["task_fingerprint"] == task.fingerprint
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p) for p in task.paths("val")]
    assert [r["label"] for r in rows] == [task.classnames[y] for y in task.labels("val")]


def test_task_errors_are_user_errors():
    from vlkit.data.tasks import load_task
    from vlkit.errors import VlkitError

    task = load_task("emoji-group", "sample")
    with pytest.raises(VlkitError, match="split 'dev': task emoji-group has splits train, val, test"):
        zeroshot.task_images(task, "dev")
    with pytest.raises(VlkitError, match="class list has 2 names but task emoji-group has 9 classes"):
        zeroshot.task_images(task, "test", ["a", "b"])
    with pytest.raises(SystemExit) as e:  # neither --data nor --task
        cli_main(["zeroshot", "--model", "x"])
    assert e.value.code == 2


def test_cache_dir_holds_feature_and_text_caches(tiny_clip_model, image_folder, tmp_path):
    root = tmp_path / "c"
    a = zeroshot.classify(tiny_clip_model, image_folder, templates="ensemble", cache_dir=root, progress=False)
    assert len(list((root / "features").glob("*.safetensors"))) == 1
    assert len(list((root / "zeroshot-text").glob("*.safetensors"))) == 1
    zeroshot.clear_memory_cache()
    b = zeroshot.classify(tiny_clip_model, image_folder, templates="ensemble", cache_dir=root, progress=False)
    assert torch.equal(a.logits, b.logits) and a.paths == b.paths and a.skipped == b.skipped
    assert not (tmp_path / "cache").exists()  # nothing went to $VLKIT_CACHE

"""The quieter promises: no silent data loss in builds, one meaning per template word across
the CLI and the benchmark, machine-readable predictions with an accuracy summary, a correct
zero-shot-only benchmark table, and bench help like every other command."""

from __future__ import annotations

import csv
import json
import re

import pytest
from reliability_corpus import make_class_folder, memoise_model_loading, run_cli

from vlkit.errors import VlkitError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    memoise_model_loading(monkeypatch)


def test_building_a_subset_of_styles_keeps_the_others(tmp_path):
    from test_recipes import make_emoji_source

    from vlkit.data.recipes import emoji, read_jsonl

    make_emoji_source(tmp_path)
    emoji.build(tmp_path, progress=False, log=lambda s: None)
    meta = tmp_path / "built/emoji/metadata.jsonl"
    full, full_info = meta.read_bytes(), json.loads((tmp_path / "built/emoji/build.json").read_text())
    emoji.build(tmp_path, styles=("twitter",), progress=False, log=lambda s: None)
    assert meta.read_bytes() == full  # google and openmoji rows are kept, in the same order
    info = json.loads((tmp_path / "built/emoji/build.json").read_text())
    assert set(info["report"]) == {"twitter", "google", "openmoji"} and info["rows"] == full_info["rows"]
    emoji.build(tmp_path, styles=("google", "facebook"), progress=False, log=lambda s: None)
    assert {r["style"] for r in read_jsonl(meta)} == {"twitter", "google", "openmoji"}
    with pytest.raises(VlkitError, match="styles \\['nope'\\]"):
        emoji.build(tmp_path, styles=("nope",), progress=False, log=lambda s: None)


def test_template_words_mean_one_thing_and_task_first_reproduces_the_benchmark(tmp_path, tiny_clip_dir):
    from vlkit import zeroshot
    from vlkit.bench.data import TaskFeatures
    from vlkit.bench.fewshot import run_fewshot
    from vlkit.data.tasks import load_task
    from vlkit.models import load_model

    with pytest.raises(VlkitError, match="ambiguous; use 'photo'.*'task-first'"):
        zeroshot.resolve_templates("single")
    task = load_task("emoji-skintone", "sample")
    assert zeroshot.resolve_templates("photo") == ["a photo of a {}."]
    assert zeroshot.resolve_templates("task-first", task.templates) == task.templates[:1]
    assert zeroshot.resolve_templates("task", task.templates) == task.templates

    res = run_cli(["zeroshot", "--model", tiny_clip_dir, "--task", "emoji-skintone", "--data-dir", "sample",
                   "--templates", "task-first", "--out", tmp_path / "zs"])
    assert res.code == 0, res.describe()
    (run,) = (tmp_path / "zs").iterdir()
    assert json.loads((run / "config.json").read_text())["prompt_templates"] == task.templates[:1]
    cli_top1 = json.loads((run / "metrics.json").read_text())["top1"]
    model = load_model(str(tiny_clip_dir))
    (rec,) = run_fewshot(["emoji-skintone"], ["zeroshot"], [1], [1], tmp_path / "bench",
                         provider=TaskFeatures(model, "sample", views=1), log=lambda s: None)
    assert rec["info"]["template"] == task.templates[0]
    assert rec["acc"] == pytest.approx(100 * cli_top1, abs=1e-6)  # the same number, by the same name


@pytest.fixture(scope="module")
def prompt(tmp_path_factory, tiny_clip_dir):
    """A prompt learned on classes whose names hold the CSV and label:probability separators."""
    root = tmp_path_factory.mktemp("rel-predict")
    data = make_class_folder(root / "data", ("keycap: #", "a, b"), per_class=2)
    res = run_cli(["coop", "train", "--model", tiny_clip_dir, "--data", data, "--epochs", "1", "--n-ctx", "2", "--views", "1",
                   "--out", root / "runs"])
    assert res.code == 0, res.describe()
    (run,) = (root / "runs").iterdir()
    return run / "prompt", data


def test_predict_writes_separate_fields_json_and_an_accuracy_summary(prompt, tmp_path):
    path, data = prompt
    (data / "a, b" / "broken.png").write_bytes(b"not an image")
    res = run_cli(["predict", "--prompt", path, "--data", data, "--top-k", "2", "--out", tmp_path / "p"])
    assert res.code == 0, res.describe()
    lines = res.out.strip().splitlines()
    assert lines[0] == "classified 4 images (1 skipped)" and any(line.startswith("top-1 ") for line in lines)
    assert len(lines) < 10  # a summary, not one line per image
    (run,) = (tmp_path / "p").iterdir()
    rows = list(csv.DictReader(open(run / "predictions.csv", encoding="utf-8", newline="")))
    assert list(rows[0]) == ["path", "prediction", "probability", "label", "correct", "top1", "top1_probability", "top2", "top2_probability"]
    assert {r["label"] for r in rows} == {"keycap: #", "a, b"} and {r["top1"] for r in rows} <= {"keycap: #", "a, b"}
    assert all(float(r["probability"]) == float(r["top1_probability"]) for r in rows)
    records = json.loads((run / "predictions.json").read_text())
    assert [r["prediction"] for r in records] == [r["prediction"] for r in rows]
    assert all(r["correct"] == (r["label"] == r["prediction"]) for r in records)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"]["n"] == 4 and metrics["num_skipped"] == 1
    assert metrics["accuracy"]["top1"] == pytest.approx(sum(r["correct"] for r in records) / 4)


def test_a_zero_shot_only_benchmark_writes_a_correct_table(tmp_path):
    from coop_fakes import FakeVLModel
    from test_bench_fewshot import SyntheticTasks, assert_fewshot_plot

    from vlkit.bench.fewshot import run_fewshot
    from vlkit.bench.report import fewshot_table

    recs = run_fewshot(["a"], ["zeroshot", "zeroshot-ensemble"], [1, 4], [1], tmp_path, provider=SyntheticTasks(FakeVLModel(causal=True)),
                       log=lambda s: None)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2] == "| method | 1 shot | 4 shots |" and lines[3] == "|---|---|---|"
    zs = next(r for r in recs if r["method"] == "zeroshot")
    assert lines[4] == f"| zeroshot | {zs['acc']:.1f} | {zs['acc']:.1f} |"
    merged = fewshot_table(recs).splitlines()  # no shots known: one column
    assert merged[2] == "| method | zero-shot |" and merged[4] == f"| zeroshot | {zs['acc']:.1f} |"
    assert_fewshot_plot(tmp_path / "fewshot.png", panels=1)  # one task: no average panel


def test_bench_help_is_formatted_like_every_command_and_names_real_commands():
    bench = run_cli(["bench", "fewshot", "--help"])
    other = run_cli(["zeroshot", "--help"])
    assert bench.code == 0 and other.code == 0
    for res in (bench, other):
        assert "Usage: vlkit " in res.out and "─ Options ─" in res.out
    words = " ".join(re.sub("[│╭╮╰╯─]", " ", bench.out).split())  # the panel wraps lines
    assert "vlkit data tasks" not in words and "emoji-group" in words and "`vlkit data info NAME` describes one" in words


def test_a_few_shot_result_is_bitwise_the_same_across_path_spellings_and_cache_states(tmp_path, monkeypatch, tiny_clip_dir):
    """Issue 12's seed-3 probe: the same images reached by another path spelling, or with the
    feature cache cold, warm or off, give every recorded number bit for bit (C included) and
    the same learned predictor (its logits on fixed inputs compared exactly)."""
    import torch

    from vlkit.bench.data import TaskFeatures
    from vlkit.bench.fewshot import run_fewshot
    from vlkit.data.recipes import SAMPLE_DIR
    from vlkit.models import load_model

    model = load_model(str(tiny_clip_dir))
    (tmp_path / "link").symlink_to(SAMPLE_DIR, target_is_directory=True)
    dotted = f"{tmp_path / 'link'}/./"  # through a symlink, with a ./ in the spelling

    def run(name: str, data_dir, cache: bool) -> list[dict]:
        monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / f"cache-{'shared' if cache else name}"))
        probe = torch.nn.functional.normalize(torch.randn(8, model.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
        learned = []  # each fitted predictor's logits on fixed inputs: its weights, bit for bit
        recs = run_fewshot(["emoji-skintone"], ["linear-probe", "tip-adapter"], [2], [3], tmp_path / name,
                           provider=TaskFeatures(model, data_dir, views=2, cache=cache), log=lambda s: None,
                           on_fit=lambda key, fitted: learned.append(fitted.logits(probe).tolist()))
        return [{k: v for k, v in r.items() if k != "seconds"} for r in recs] + learned

    shipped = sorted((SAMPLE_DIR / "splits").rglob("*"))
    first = run("cold", "sample", cache=True)  # fills the shared cache
    assert len(first) == 4 and first[0]["info"]["C"] > 0
    assert run("warm", dotted, cache=True) == first
    assert run("off", tmp_path / "link", cache=False) == first
    assert sorted((SAMPLE_DIR / "splits").rglob("*")) == shipped  # no spelling of the sample writes into the package

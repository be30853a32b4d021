"""The main job end to end on the bundled sample with the shipped vlkit-tiny (small budget)."""

import json

import pytest
from test_bench_fewshot import assert_fewshot_plot


def test_demo_writes_table_plot_prompt_and_words(tmp_path):
    from vlkit import zeroshot
    from vlkit.adapt import prompt_io
    from vlkit.adapt.coop import classifier_weights, prompt_logits
    from vlkit.bench.data import TaskFeatures
    from vlkit.bench.fewshot import accuracy
    from vlkit.demo import DEMO_TASK, run_demo
    from vlkit.models import load_model

    lines: list[str] = []
    run = run_demo(tmp_path, shots=(2,), epochs=2, views=1, log=lines.append)
    assert_fewshot_plot(run / "fewshot" / "fewshot.png", panels=1)  # one task: no average panel
    table = (run / "fewshot" / "table.md").read_text()
    for method in ("zeroshot", "linear-probe", "coop"):
        assert f"| {method} |" in table
    records = json.loads((run / "metrics.json").read_text())["fewshot"]
    accs = {r["method"]: r["acc"] for r in records}
    assert accs["zeroshot"] > 3 * 100 / 9, "vlkit-tiny zero-shot on the sample's 9 groups is far above chance"
    saved = prompt_io.load_prompt(run / "prompt")
    assert saved.ctx.shape[-2] == 16 and len(saved.classnames) == 9
    # the recorded numbers are the hand-written prompt's and the saved prompt's, on the task's test split
    vl = load_model("vlkit-tiny")
    provider = TaskFeatures(vl, "sample", views=1)
    task = provider.task(DEMO_TASK)
    x, y = provider.features(task, task.splits["test"])
    hand = zeroshot.zeroshot_classifier(vl, saved.classnames, task.templates[:1])
    assert accs["zeroshot"] == pytest.approx(accuracy(zeroshot.logits(vl, x, hand), y))
    learned = classifier_weights(vl, prompt_io.learner_from_saved(vl, saved))
    assert accs["coop"] == pytest.approx(accuracy(prompt_logits(vl, x, learned), y))
    assert "ctx 16:" in (run / "nearest_words.txt").read_text()
    assert any("nearest vocabulary words" in line for line in lines)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["epochs"] == 2 and cfg["model_fingerprint"]

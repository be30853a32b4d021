"""Few-shot harness: one JSON line per run, resumption, refusing mixed settings,
tables (mean +/- std over seeds, task average), plot, base-to-new, domain tables."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from coop_fakes import FakeVLModel
from vlkit import zeroshot
from vlkit.bench.data import FewShotSplit
from vlkit.bench.fewshot import merge_results, run_base_to_new, run_domain_generalization, run_fewshot
from vlkit.bench.report import base_to_new_table, collect, fewshot_table
from vlkit.errors import VlkitError

CLASSES = ["cat", "dog", "bird", "fish"]


class SyntheticTasks:
    """Stands in for TaskFeatures: features near each class's hand-written prompt feature."""

    def __init__(self, model):
        self.model, self.views, self.calls = model, 2, []
        self.w = zeroshot.zeroshot_classifier(model, CLASSES, ["a photo of a {}."], cache=False)

    def _draw(self, n, seed, views=None):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(len(CLASSES)).repeat_interleave(n)
        shape = (len(y), views or 1, self.w.shape[1])
        x = F.normalize(self.w[y][:, None] + 0.35 * torch.randn(*shape, generator=g), dim=-1)
        return (x if views else x[:, 0]), y

    def split(self, task, shots, seed, styles=False, own=None):
        self.calls.append((task, shots, seed))
        offset = 0 if task == "a" else 100
        views, y = self._draw(shots, seed + offset, views=2)
        xv, yv = self._draw(min(shots, 4), 1000 + seed + offset)
        evals = {"test": self._draw(10, 7 + offset)}
        if styles:
            evals["source"] = self._draw(5, 8 + offset)
            evals["target:openmoji"] = self._draw(5, 9 + offset)
        return FewShotSplit(task, CLASSES, ["a photo of a {}."], views, views.mean(1), y, xv, yv, evals)

    def base_new(self, task, shots, seed):
        split = self.split(task, shots, seed)
        keep = split.train_labels < 2
        base = FewShotSplit(
            task, CLASSES[:2], split.templates, split.train_views[keep], split.train_features[keep], split.train_labels[keep],
            split.val_features[split.val_labels < 2], split.val_labels[split.val_labels < 2],
        )
        x, y = split.evals["test"]
        base.evals["base"] = (x[y < 2], y[y < 2])
        return base, CLASSES[2:], (x[y >= 2], y[y >= 2] - 2)


@pytest.fixture(scope="module")
def model():
    return FakeVLModel(causal=True)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_fewshot_plot(path, panels: int) -> None:
    """A PNG laid out as plot_fewshot's grid (at most 3 panels a row, 4.2 x 3.4 in at 110 dpi)
    whose first `panels` cells each hold marks in the first method's colour (tab10 blue)."""
    image = Image.open(path)
    assert image.format == "PNG"
    cols = min(3, panels)
    rows = -(-panels // cols)
    assert image.size == (462 * cols, 374 * rows)
    px = np.asarray(image.convert("RGB")).astype(int)
    blue = (np.abs(px - np.array([31, 119, 180])).sum(-1) < 30)
    cells = [blue[r * 374 : (r + 1) * 374, c * 462 : (c + 1) * 462].sum() for r in range(rows) for c in range(cols)]
    assert all(n > 20 for n in cells[:panels]) and all(n == 0 for n in cells[panels:]), cells


def test_runs_resume_and_write_table_and_plot(tmp_path, model):
    provider = SyntheticTasks(model)
    methods = ["zeroshot", "linear-probe", "tip-adapter"]
    opts = {"tip-adapter": {"beta_steps": 5, "alpha_steps": 4}, "linear-probe": {"refine_steps": 2}}
    run_fewshot(["a", "b"], methods, [1, 2], [1, 2], tmp_path, provider=provider, options=opts, log=lambda s: None)
    rows = _lines(tmp_path / "results.jsonl")
    assert len(rows) == 2 * (1 + 2 * 2 * 2)  # zero-shot once per task, others per shots x seeds
    zs = [r for r in rows if r["method"] == "zeroshot"]
    assert {(r["shots"], r["seed"]) for r in zs} == {(0, 0)}
    assert all(r["n_test"] == 40 and r["acc"] * 40 / 100 == pytest.approx(round(r["acc"] * 40 / 100), abs=1e-4) for r in rows)
    for r in zs:  # zero-shot: the hand-written prompt's argmax on the task's own test draw
        x, y = provider._draw(10, 7 if r["task"] == "a" else 107)
        assert r["acc"] == pytest.approx(100.0 * float(((x @ provider.w.T).argmax(1) == y).float().mean()))
    assert all("C" in r["info"] for r in rows if r["method"] == "linear-probe")
    table = (tmp_path / "table.md").read_text()
    assert "### a" in table and "### Average" in table and "| tip-adapter |" in table
    assert_fewshot_plot(tmp_path / "fewshot.png", panels=3)  # a, b and the average

    # resume: nothing re-run; a new seed runs only the missing runs
    provider.calls.clear()
    run_fewshot(["a", "b"], methods, [1, 2], [1, 2], tmp_path, provider=provider, options=opts, log=lambda s: None)
    assert provider.calls == [] and len(_lines(tmp_path / "results.jsonl")) == 18
    run_fewshot(["a", "b"], methods, [1, 2], [1, 2, 3], tmp_path, provider=provider, options=opts, log=lambda s: None)
    assert sorted(set(provider.calls)) == [(t, k, 3) for t in "ab" for k in (1, 2)]
    assert len(_lines(tmp_path / "results.jsonl")) == 18 + 2 * 2 * 2


def test_same_seed_gives_same_numbers_and_torn_line_is_dropped(tmp_path, model):
    opts = {"linear-probe": {"refine_steps": 2}}
    a = run_fewshot(["a"], ["linear-probe"], [2], [1], tmp_path / "x", provider=SyntheticTasks(model), options=opts, log=lambda s: None)
    b = run_fewshot(["a"], ["linear-probe"], [2], [1], tmp_path / "y", provider=SyntheticTasks(model), options=opts, log=lambda s: None)
    assert [r["acc"] for r in a] == [r["acc"] for r in b]
    path = tmp_path / "x" / "results.jsonl"
    path.write_text(path.read_text() + '{"kind": "fewshot", "task": "a", "meth')  # crash mid-write
    again = run_fewshot(["a"], ["linear-probe"], [2], [1], tmp_path / "x", provider=SyntheticTasks(model), options=opts, log=lambda s: None)
    assert len(again) == 1 and len(_lines(path)) == 1


def test_refuses_to_mix_budgets_and_unknown_methods(tmp_path, model):
    provider = SyntheticTasks(model)
    run_fewshot(["a"], ["zeroshot"], [1], [1], tmp_path, provider=provider, epochs=5, log=lambda s: None)
    with pytest.raises(VlkitError, match="epochs"):
        run_fewshot(["a"], ["zeroshot"], [1], [1], tmp_path, provider=provider, epochs=7, log=lambda s: None)
    with pytest.raises(VlkitError, match="unknown"):
        run_fewshot(["a"], ["coop++"], [1], [1], tmp_path, provider=provider, log=lambda s: None)


def test_table_mean_std_and_task_average():
    recs = [
        {"kind": "fewshot", "task": t, "method": "m", "shots": 1, "seed": s, "acc": acc}
        for t, s, acc in [("a", 1, 10.0), ("a", 2, 20.0), ("b", 1, 30.0), ("b", 2, 50.0)]
    ] + [{"kind": "fewshot", "task": t, "method": "zeroshot", "shots": 0, "seed": 0, "acc": 5.0} for t in "ab"]
    table = fewshot_table(recs)
    assert "| m | 15.0 ± 5.0 |" in table  # task a
    assert "| m | 40.0 ± 10.0 |" in table  # task b
    assert collect(recs)["Average"]["m"][1] == {1: 20.0, 2: 35.0}
    assert "| m | 27.5 ± 7.5 |" in table and "| zeroshot | 5.0 |" in table


def test_named_averages_cover_only_methods_run_on_all_their_tasks():
    recs = [
        {"kind": "fewshot", "task": t, "method": m, "shots": 1, "seed": 1, "acc": acc}
        for t, m, acc in [("a", "m", 10.0), ("b", "m", 30.0), ("c", "m", 50.0), ("a", "n", 60.0), ("b", "n", 80.0)]
    ]
    table = collect(recs, averages={"ab": ["a", "b"], "abc": ["a", "b", "c"]})
    assert table["ab"]["m"][1] == {1: 20.0} and table["ab"]["n"][1] == {1: 70.0}
    assert table["abc"]["m"][1] == {1: 30.0} and "n" not in table["abc"]  # n never ran on c
    assert "Average" not in table
    md = fewshot_table(recs, averages={"ab": ["a", "b"]})
    assert "### ab" in md and "### Average" not in md
    with pytest.raises(VlkitError, match="no results for task"):
        collect(recs, averages={"x": ["a", "zz"]})


def _folder(path, fingerprint, rows):
    path.mkdir()
    (path / "settings.json").write_text(json.dumps({"model_fingerprint": fingerprint, "epochs": None}))
    (path / "results.jsonl").write_text("".join(
        json.dumps({"kind": "fewshot", "task": t, "method": "m", "shots": 1, "seed": s, "acc": a}) + "\n" for t, s, a in rows))
    return path


def test_merge_results_joins_folders_and_refuses_overlaps_and_other_models(tmp_path, capsys):
    from vlkit.cli import main

    a = _folder(tmp_path / "a", "f1", [("a", 1, 10.0), ("a", 2, 20.0)])
    b = _folder(tmp_path / "b", "f1", [("b", 1, 30.0), ("b", 2, 40.0)])
    recs = merge_results([a, b], tmp_path / "out", averages={"Mean": ["a", "b"]})
    assert len(recs) == 4
    assert "### Mean" in (tmp_path / "out" / "table.md").read_text()
    assert_fewshot_plot(tmp_path / "out" / "fewshot.png", panels=3)  # a, b and Mean
    assert set(json.loads((tmp_path / "out" / "sources.json").read_text())) == {str(a), str(b)}
    with pytest.raises(VlkitError, match="also in"):
        merge_results([a, a], tmp_path / "out2")
    with pytest.raises(VlkitError, match="another model"):
        merge_results([a, _folder(tmp_path / "c", "f2", [("c", 1, 1.0)])], tmp_path / "out3")
    with pytest.raises(VlkitError, match="not a benchmark results folder"):
        merge_results([tmp_path / "nothing"], tmp_path / "out4")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()

    with pytest.raises(SystemExit) as e:
        main(["bench", "report", "--from", str(a), str(b), "--out", str(tmp_path / "cli"), "--average", "ab=a,b"])
    assert e.value.code == 0 and "### ab" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "report", "--from", str(a), "--out", str(tmp_path / "cli2"), "--average", "ab"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NAME=TASK,TASK" in err[0]


def test_base_to_new_and_domain_tables(tmp_path, model):
    provider = SyntheticTasks(model)
    logs = []
    recs = run_base_to_new(["a"], ["zeroshot", "linear-probe", "clip-adapter"], 2, [1], tmp_path / "b2n", provider=provider,
                           epochs=2, log=logs.append)
    b2n = [r for r in recs if r["kind"] == "base2new"]
    assert {r["method"] for r in b2n} == {"zeroshot", "clip-adapter"}
    assert any("linear-probe" in line and "base-to-new" in line for line in logs)
    for r in b2n:
        assert r["hm"] == pytest.approx(2 * r["base"] * r["new"] / (r["base"] + r["new"]))
    assert "| zeroshot |" in (tmp_path / "b2n" / "base_to_new.md").read_text()
    assert "### a" in base_to_new_table(b2n)

    run_domain_generalization(["a"], ["zeroshot"], 1, [1], tmp_path / "dg", provider=provider, log=lambda s: None)
    dg = (tmp_path / "dg" / "domain.md").read_text()
    assert "| method | source | target:openmoji |" in dg


def test_an_eval_set_under_two_names_is_scored_once(tmp_path, model):
    class OneTestStyle(SyntheticTasks):  # as TaskFeatures when the test split holds one style
        def split(self, task, shots, seed, styles=False, own=None):
            split = super().split(task, shots, seed, styles)
            split.evals["target:openmoji"] = split.evals["test"]
            return split

    sizes = []

    def count(key, fitted):
        inner = fitted.logits
        fitted.logits = lambda x: sizes.append(len(x)) or inner(x)

    recs = run_fewshot(["a"], ["linear-probe"], [1], [1], tmp_path, provider=OneTestStyle(model), domain_styles=True,
                       options={"linear-probe": {"refine_steps": 2}}, on_fit=count, log=lambda s: None)
    assert recs[0]["evals"]["target:openmoji"] == recs[0]["evals"]["test"]
    assert sizes == [40, 20]  # test once (40 images), source once (20), never the alias


def test_cli_reports_bad_arguments_in_one_line(capsys):
    from vlkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "fewshot", "--tasks", "emoji-group", "--options", "{bad"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --options: not valid JSON")
    with pytest.raises(SystemExit):
        main(["bench", "fewshot", "--tasks", "emoji-group", "--methods", "nope", "--data-dir", "sample"])
    assert "methods nope: unknown" in capsys.readouterr().err

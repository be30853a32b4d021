"""`--protocol paper`: each official-recipe difference on a small case, and the
protocol in settings, records, the refusal to mix and the merged report."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from coop_fakes import FakeVLModel
from test_bench_fewshot import CLASSES, SyntheticTasks
from vlkit import zeroshot
from vlkit.adapt.coop import lr_at_epoch
from vlkit.adapt.features import augment, augmented_features
from vlkit.adapt.tip_adapter import TipAdapter, build_cache, search_alpha_beta
from vlkit.bench import methods
from vlkit.bench.data import TaskFeatures
from vlkit.bench.fewshot import merge_results, run_fewshot
from vlkit.bench.methods import MethodInput
from vlkit.bench.protocols import PROTOCOLS, method_options, own_views
from vlkit.errors import VlkitError

TASK_TEMPLATE = "a small photo of the {}."


@pytest.fixture(scope="module")
def model():
    return FakeVLModel(causal=True)


def _input(model, kind, method, n_per_class=1, shots=1, user=None, epochs=None):
    g = torch.Generator().manual_seed(0)
    w = zeroshot.zeroshot_classifier(model, CLASSES, [TASK_TEMPLATE], cache=False)
    y = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    views = F.normalize(w[y][:, None] + 0.3 * torch.randn(len(y), 2, w.shape[1], generator=g), dim=-1)
    opts = method_options("paper", kind, method, user or {}, epochs)
    epochs = opts.pop("epochs", epochs)  # as the harness: a method's own budget wins
    return MethodInput(model, CLASSES, [TASK_TEMPLATE], views, views.mean(1), y, views[:, 0], y, shots, 1, epochs, opts)


def test_tip_adapter_keys_are_the_normalised_mean_of_raw_views(tmp_path, model):
    own = own_views("paper", "tip-adapter")
    assert own.raw and own.augment.views == 10 and own.augment.scale == (0.5, 1.0)
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 90), (20, 40, 220)]):
        img = Image.new("RGB", (24, 16), colour)
        img.paste((255, 255, 255), (i * 5, 2, i * 5 + 9, 12))
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    # the views replayed by hand: same seeded crops, the image tower's output before normalisation
    gen = torch.Generator().manual_seed(own.augment.seed)
    pixels = [model.preprocess(augment(Image.open(p).convert("RGB"), 8, own.augment, gen)) for p in paths for _ in range(10)]
    with torch.no_grad():
        raw = model.encode_image(torch.stack(pixels), normalize=False).reshape(3, 10, -1)
    assert raw.norm(dim=-1).std() > 0.01  # the norms differ, so the two averages differ

    class Task:
        root = tmp_path

    provider = TaskFeatures(model, cache=True)
    rows = [(p.name, 0) for p in paths]
    import vlkit.zeroshot as zs

    old = zs.default_cache_dir
    zs.default_cache_dir = lambda: tmp_path / "cache"
    try:
        first = provider.train_views(Task, rows, own)
        again = provider.train_views(Task, rows, own)  # from the disk cache: normalised features x kept norms
        shared = provider.train_views(Task, rows, None)
    finally:
        zs.default_cache_dir = old
    assert torch.allclose(first, raw, atol=1e-5) and torch.allclose(again, raw, atol=1e-5)
    assert shared.shape[1] == provider.views and torch.allclose(shared.norm(dim=-1), torch.ones(3, provider.views), atol=1e-5)
    keys, _ = build_cache(first, torch.tensor([0, 1, 2]), 3)
    assert torch.allclose(keys, F.normalize(raw.mean(1), dim=-1), atol=1e-5)
    assert not torch.allclose(keys, F.normalize(F.normalize(raw, dim=-1).mean(1), dim=-1), atol=1e-4)
    assert torch.allclose(augmented_features(model, paths, own.augment, cache_dir=tmp_path / "cache"), F.normalize(raw, dim=-1), atol=1e-5)


def test_the_official_grid_stops_one_step_short_of_its_end():
    class Designed(TipAdapter):  # cache logit of class 1 = alpha * exp(beta); clip logits favour class 0 by m_i
        def clip_logits(self, features):
            return torch.stack([features[:, 0], torch.zeros(len(features))], 1)

        def affinity(self, features):
            return torch.full((len(features), 1), 2.0)

    official = lambda lo, hi, n: [i * (hi - lo) / n + lo for i in range(n)]  # Tip-Adapter's search_hp lists
    top_beta, top_alpha = official(0.1, 7.0, 200)[-1], official(0.1, 3.0, 20)[-1]
    import math

    margins = torch.tensor([[0.999 * top_alpha * math.exp(top_beta)], [0.999 * 3.0 * math.exp(7.0)]])
    model = Designed(torch.ones(1, 1), torch.tensor([[0.0, 1.0]]), torch.zeros(2, 1), 1.0)
    found = search_alpha_beta(model, margins, torch.tensor([1, 1]), endpoint=False)
    assert (found.beta, found.alpha) == (pytest.approx(top_beta), pytest.approx(top_alpha)) and found.val_accuracy == 0.5
    assert (search_alpha_beta(model, margins, torch.tensor([1, 1])).beta, model.alpha) == (7.0, 3.0)


def test_tip_adapter_f_paper_recipe_reaches_the_fit(monkeypatch, model):
    seen = {}
    import vlkit.adapt.tip_adapter as tip

    real = tip.fit_tip_adapter_f
    monkeypatch.setattr(tip, "fit_tip_adapter_f", lambda *a, **kw: seen.update(kw) or real(*a, **{**kw, "epochs": 1}))
    methods.tip_adapter_f(_input(model, "fewshot", "tip-adapter-f", user={"beta_steps": 3, "alpha_steps": 2}))
    assert seen["init_alpha"] == 1.17 and seen["init_beta"] == 1.0 and seen["endpoint"] is False
    assert method_options("vlkit", "fewshot", "tip-adapter-f", {}, None) == {}


def test_kgcoop_learns_a_photo_of_a_with_four_tokens_and_keeps_the_task_template_for_hand_features(monkeypatch, model):
    import vlkit.adapt.kgcoop as kg
    from vlkit.adapt.prompt_learner import PromptLearner

    seen = {}
    real = kg.train_coop

    def spy(model, classnames, features, labels, config, **kw):
        seen["config"], seen["text_loss"] = config, kw["text_loss"]
        return real(model, classnames, features, labels, type(config)(**{**config.__dict__, "epochs": 1}), **kw)

    monkeypatch.setattr(kg, "train_coop", spy)
    inp = _input(model, "fewshot", "kgcoop")
    fitted = methods.kgcoop(inp)
    cfg = seen["config"]
    assert (cfg.prompt.ctx_init, cfg.prompt.suffix, cfg.batch_size, cfg.epochs) == ("a photo of a", ".", 128, 100)
    learner = PromptLearner(model, CLASSES, cfg.prompt)
    ids = model.tokenizer(["a photo of a"]).input_ids[0, 1:5]
    assert learner.n_ctx == 4 and torch.allclose(learner.ctx.detach(), model.token_embedding(ids).detach())
    assert fitted.info["n_ctx"] == 4 and fitted.info["template"] == "a photo of a {}."
    task_hand = zeroshot.zeroshot_classifier(model, CLASSES, [TASK_TEMPLATE], cache=False)
    photo = zeroshot.zeroshot_classifier(model, CLASSES, ["a photo of a {}."], cache=False)
    assert float(seen["text_loss"](task_hand)) == pytest.approx(0.0, abs=1e-6) and float(seen["text_loss"](photo)) > 1e-3
    methods.kgcoop(MethodInput(**{**inp.__dict__, "options": {}, "epochs": None}))  # vlkit: the task's template is learned too
    assert (seen["config"].prompt.ctx_init, seen["config"].batch_size, seen["config"].epochs) == ("a small photo of the", 32, None)


def test_clip_adapter_paper_fixes_the_ratio_and_steps_dassl_lr_per_epoch(monkeypatch, model):
    lrs = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: lrs.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    inp = _input(model, "fewshot", "clip-adapter", n_per_class=10, shots=1)  # 40 images: 2 steps of 32 per epoch
    fitted = methods.clip_adapter(inp)
    assert fitted.info["ratio"] == 0.2 and fitted.info["epochs"] == 50  # CoOp's epochs at 1 shot
    assert lrs == [lr_at_epoch(e, 50, 2e-3) for e in range(50) for _ in range(2)]
    assert lrs[:3] == [1e-5, 1e-5, 2e-3]
    lrs.clear()
    vlkit_run = methods.clip_adapter(MethodInput(**{**inp.__dict__, "options": {}, "epochs": 2}))
    assert len(lrs) == 4 * 2 * 2 and lrs[1] < lrs[0] and vlkit_run.info["schedule"] == "step-cosine"  # 4 ratios, per-step cosine


def test_user_options_and_budget_override_the_recipe():
    assert method_options("paper", "fewshot", "kgcoop", {"batch_size": 8}, None)["batch_size"] == 8
    assert "epochs" not in method_options("paper", "fewshot", "kgcoop", {}, 3)  # a global --epochs wins
    assert method_options("paper", "fewshot", "kgcoop", {"epochs": 7}, 3)["epochs"] == 7
    assert method_options("paper", "base2new", "coop", {}, None) == {"n_ctx": 4, "ctx_init": "a photo of a"}
    assert method_options("paper", "fewshot", "coop", {}, None) == {}
    for m in ("cocoop", "cocoop-fp16", "cocoop-frozen"):
        assert method_options("paper", "base2new", m, {}, None) == {"ctx_init": "a photo of a"}
    with pytest.raises(VlkitError, match="protocol 'papers'"):
        method_options("papers", "fewshot", "coop", {}, None)


class OwnSpy(SyntheticTasks):
    def split(self, task, shots, seed, styles=False, own=None):
        self.owns = getattr(self, "owns", []) + [own]
        return super().split(task, shots, seed, styles)


def test_protocol_in_settings_and_records_refused_when_mixed_and_merged_side_by_side(tmp_path, model):
    opts = {"tip-adapter": {"beta_steps": 3, "alpha_steps": 2}}
    run = lambda out, protocol, provider: run_fewshot(
        ["a"], ["zeroshot", "tip-adapter"], [1], [1], out, provider=provider, options=opts, protocol=protocol, log=lambda s: None
    )
    spy = OwnSpy(model)
    vl, paper = run(tmp_path / "v", "vlkit", spy), run(tmp_path / "p", "paper", spy)
    assert [o.augment.views if o else None for o in spy.owns] == [None, None, None, 10]  # tip-adapter's own views under paper
    assert {r["protocol"] for r in vl} == {"vlkit"} and {r["protocol"] for r in paper} == {"paper"}
    assert json.loads((tmp_path / "p" / "settings.json").read_text())["protocol"] == "paper"
    assert "| tip-adapter (paper) |" in (tmp_path / "p" / "table.md").read_text()
    with pytest.raises(VlkitError, match="protocol='paper', this run has 'vlkit'"):
        run(tmp_path / "p", "vlkit", spy)

    merged = merge_results([tmp_path / "v", tmp_path / "p"], tmp_path / "m", methods=["zeroshot", "tip-adapter"])
    assert len(merged) == 4
    rows = [line.split("|")[1].strip() for line in (tmp_path / "m" / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[1:] == ["zeroshot", "zeroshot (paper)", "tip-adapter", "tip-adapter (paper)"]

    # a folder written before protocols existed holds vlkit runs: it resumes, nothing reruns
    old = tmp_path / "old"
    old.mkdir()
    settings = json.loads((tmp_path / "v" / "settings.json").read_text())
    del settings["protocol"]
    Path(old / "settings.json").write_text(json.dumps(settings))
    lines = [{k: v for k, v in r.items() if k != "protocol"} for r in vl]
    Path(old / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    spy.calls.clear()
    run(old, "vlkit", spy)
    assert spy.calls == []


def test_cli_protocol_choice(capsys):
    from vlkit.cli import main
    from vlkit.commands.bench import PROTOCOLS as CLI_PROTOCOLS

    assert CLI_PROTOCOLS == PROTOCOLS
    with pytest.raises(SystemExit) as e:
        main(["bench", "fewshot", "--tasks", "emoji-group", "--data-dir", "sample", "--protocol", "official"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--protocol 'official': unknown; choose from vlkit, paper" in err[0]


def test_base_to_new_paper_baselines_start_from_a_photo_of_a_and_the_cocoop_variants_reach_training(monkeypatch, model):
    import vlkit.adapt.cocoop as cc
    import vlkit.adapt.coop as co

    seen = {}
    real_coop, real_cocoop = co.train_coop, cc.train_cocoop

    def spy_coop(model, classnames, features, labels, config, **kw):
        seen["coop"] = config
        return real_coop(model, classnames, features, labels, type(config)(**{**config.__dict__, "epochs": 1}), **kw)

    def spy_cocoop(model, classnames, features, labels, config):
        seen.setdefault("cocoop", []).append(config)
        return real_cocoop(model, classnames, features, labels, type(config)(**{**config.__dict__, "epochs": 1}))

    monkeypatch.setattr(co, "train_coop", spy_coop)
    monkeypatch.setattr(cc, "train_cocoop", spy_cocoop)
    fitted = methods.METHODS["coop"](_input(model, "base2new", "coop"))
    assert (seen["coop"].prompt.ctx_init, fitted.info["n_ctx"]) == ("a photo of a", 4)
    for name in ("cocoop", "cocoop-fp16", "cocoop-frozen"):
        methods.METHODS[name](_input(model, "base2new", name))
    got = [(c.prompt.ctx_init, c.prompt.suffix, c.param_dtype, c.train_meta_net) for c in seen["cocoop"]]
    assert got == [("a photo of a", ".", "fp32", True), ("a photo of a", ".", "fp16", True), ("a photo of a", ".", "fp32", False)]
    methods.METHODS["cocoop"](MethodInput(**{**_input(model, "base2new", "cocoop").__dict__, "options": {}}))
    assert seen["cocoop"][-1].prompt.ctx_init == "a small photo of the"  # vlkit: the task's own prompt

"""The shared-prefix text path equals the full pass, engages where it is exact, and only there.

Equality is checked on features and on the gradient of CoOp's loss with respect to
the context (max abs diff <= 1e-5), for a tiny transformers CLIP and a tiny real
open_clip CLIP, unified context with the class at the end, with random and phrase
initialisation; then over whole CoOp/CoCoOp trainings and the zero-shot classifier.
"Engaged" is observed, not assumed: the full pass (`encode_text_embeddings`) must not
run when the shortcut is taken, and must run when it is refused.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from open_clip_import import forget, import_open_clip

from vlkit import zeroshot
from vlkit.adapt.cocoop import CoCoOp
from vlkit.adapt.coop import CoOpConfig, coop_loss_backward, train_coop
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
from vlkit.models import load_model

NAMES = ["cat", "dog", "smiling face", "red heart", "apple", "tench (fish)"]
OC_ARCH = "vlkit-test-tiny-oc-prefix"


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    oc, _ = import_open_clip()
    folder = tmp_path_factory.mktemp("oc_prefix")
    (folder / f"{OC_ARCH}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2, "ls_init_value": 0.5},
    }))
    oc.add_model_config(folder)
    torch.manual_seed(0)
    weights = folder / "weights.pt"
    torch.save(oc.create_model(OC_ARCH).state_dict(), weights)
    yield load_model(f"open_clip:{OC_ARCH}:{weights}")
    forget()


@pytest.fixture(params=["hf", "open_clip"])
def causal_model(request, tiny_clip_model):
    return tiny_clip_model if request.param == "hf" else request.getfixturevalue("open_clip_model")


def _pair(model, options: PromptOptions, names=NAMES) -> tuple[PromptLearner, PromptLearner]:
    """Two learners with the same context, one allowed the shortcut and one not."""
    fast = PromptLearner(model, names, options, generator=torch.Generator().manual_seed(3))
    full = PromptLearner(model, names, PromptOptions(**{**options.to_dict(), "shared_prefix": False}))
    with torch.no_grad():
        full.ctx.copy_(fast.ctx)
    return fast, full


class _CountFullPasses:
    """Counts calls of the model's full text pass on prompt embeddings."""

    def __init__(self, model, monkeypatch) -> None:
        self.calls = 0
        original = model.encode_text_embeddings

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "encode_text_embeddings", counted)


def _loss_and_grad(model, learner, images, labels, class_chunk=None) -> tuple[float, torch.Tensor]:
    learner.ctx.grad = None
    loss, _ = coop_loss_backward(model, learner, images, labels, class_chunk=class_chunk)
    return loss, learner.ctx.grad.clone()


@pytest.mark.parametrize("options", [
    PromptOptions(n_ctx=4),
    PromptOptions(ctx_init="a photo of a"),
    PromptOptions(n_ctx=3, truncate=False, suffix=""),
], ids=["random-m4", "phrase", "full-length-no-suffix"])
def test_coop_features_and_context_gradient_equal_the_full_pass(causal_model, options, monkeypatch):
    fast, full = _pair(causal_model, options)
    assert fast.text_path(causal_model) == "shared-prefix" and full.text_path(causal_model) == "full"
    with torch.no_grad():
        ref = full.text_features(causal_model)
    counter = _CountFullPasses(causal_model, monkeypatch)
    with torch.no_grad():
        got = fast.text_features(causal_model)
    assert counter.calls == 0  # the shortcut ran, not the full pass
    assert (got - ref).abs().max() <= 1e-5
    assert (got.norm(dim=-1) - 1).abs().max() < 1e-5

    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(8, causal_model.embed_dim, generator=gen), dim=-1)
    labels = torch.arange(8) % len(NAMES)
    loss_fast, grad_fast = _loss_and_grad(causal_model, fast, images, labels)
    loss_full, grad_full = _loss_and_grad(causal_model, full, images, labels)
    assert abs(loss_fast - loss_full) <= 1e-5
    top = float(grad_full.abs().max())
    assert top > 1e-3  # a gradient worth comparing
    # fp32 rounding of gradients of size ~5 (logit scale x cosine) is ~1e-6 absolute: compare relatively here,
    # and exactly (1e-10) in float64 below, where rounding cannot hide a wrong term.
    assert (grad_fast - grad_full).abs().max() <= 1e-5 * max(1.0, top)
    # CoOp's class chunks (two passes) take the same path and give the same gradient.
    _, grad_chunked = _loss_and_grad(causal_model, fast, images, labels, class_chunk=4)
    assert (grad_chunked - grad_full).abs().max() <= 1e-5 * max(1.0, top)


@pytest.mark.parametrize("options", [PromptOptions(n_ctx=4), PromptOptions(ctx_init="a photo of a", truncate=False)])
def test_in_float64_the_shortcut_is_exact_to_rounding(causal_model, options):
    model = copy.deepcopy(causal_model).double()
    fast, full = _pair(model, options)
    fast.double(), full.double()
    images = F.normalize(torch.randn(8, model.embed_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    labels = torch.arange(8) % len(NAMES)
    grads, feats = [], []
    for learner in (fast, full):
        text = learner.text_features(model)
        F.cross_entropy(model.logit_scale.detach() * images @ text.t(), labels).backward()
        grads.append(learner.ctx.grad)
        feats.append(text.detach())
    assert feats[0].dtype == torch.float64
    assert (feats[0] - feats[1]).abs().max() <= 1e-12
    assert (grads[0] - grads[1]).abs().max() <= 1e-10 and grads[1].abs().max() > 1e-3


@pytest.mark.parametrize("options", [
    PromptOptions(n_ctx=4, position="middle"),
    PromptOptions(n_ctx=5, position="middle"),
    PromptOptions(n_ctx=4, position="front"),
    PromptOptions(n_ctx=4, csc=True),
    PromptOptions(n_ctx=4, shared_prefix=False),
], ids=["middle-even", "middle-odd", "front", "csc", "switched-off"])
def test_layouts_where_the_prefix_is_not_shared_run_the_full_pass(causal_model, options, monkeypatch):
    learner = PromptLearner(causal_model, NAMES, options, generator=torch.Generator().manual_seed(3))
    assert learner.text_path(causal_model) == "full"
    counter = _CountFullPasses(causal_model, monkeypatch)
    with torch.no_grad():
        learner.text_features(causal_model)
    assert counter.calls == 1


def test_bert_style_towers_refuse_the_shortcut(tiny_dual_model, monkeypatch):
    assert tiny_dual_model.shared_prefix_encoder() is None
    learner = PromptLearner(tiny_dual_model, NAMES, PromptOptions(n_ctx=4))
    assert learner.text_path(tiny_dual_model) == "full"
    assert zeroshot.text_path(tiny_dual_model) == "full"
    counter = _CountFullPasses(tiny_dual_model, monkeypatch)
    with torch.no_grad():
        learner.text_features(tiny_dual_model)
    assert counter.calls == 1


def test_open_clip_towers_it_cannot_describe_refuse_the_shortcut(open_clip_model):
    model = copy.deepcopy(open_clip_model)
    assert model.shared_prefix_encoder() is not None
    model.model.text_pool_type = "first"  # pools a prefix token: not class-specific
    assert model.shared_prefix_encoder() is None
    model.model.text_pool_type = "argmax"
    model.model.attn_mask = None  # bidirectional: later tokens change the prefix's states
    assert model.shared_prefix_encoder() is None


def test_hf_clip_in_training_mode_with_attention_dropout_refuses(tiny_clip_dir):
    model = load_model(str(tiny_clip_dir))
    assert model.shared_prefix_encoder() is not None
    model.train()
    assert model.shared_prefix_encoder() is not None  # dropout 0: training mode changes nothing
    for layer in model.text_model.encoder.layers:
        layer.self_attn.dropout = 0.1
    assert model.shared_prefix_encoder() is None
    model.eval()
    assert model.shared_prefix_encoder() is not None


def test_coop_training_trajectory_is_the_full_pass_trajectory(tiny_clip_model):
    gen = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(12, 2, tiny_clip_model.embed_dim, generator=gen), dim=-1)
    labels = torch.arange(12) % 4
    names = NAMES[:4]
    runs = {}
    for shared in (True, False):
        config = CoOpConfig(prompt=PromptOptions(n_ctx=4, shared_prefix=shared), epochs=3, batch_size=4, seed=2)
        runs[shared] = train_coop(tiny_clip_model, names, feats, labels, config)
    fast, full = runs[True].learner.ctx, runs[False].learner.ctx
    assert (full - PromptLearner(tiny_clip_model, names, PromptOptions(n_ctx=4), torch.Generator().manual_seed(2)).ctx).abs().max() > 1e-4
    assert (fast - full).abs().max() <= 1e-5
    # a tolerance, not rounding: two losses 1e-7 apart can round to different 5th decimals
    assert [h["loss"] for h in runs[True].history] == pytest.approx([h["loss"] for h in runs[False].history], abs=1e-5)


def test_cocoop_per_image_prefixes_equal_the_per_row_pass(causal_model, monkeypatch):
    fast, full = _pair(causal_model, PromptOptions(ctx_init="a photo of a"), NAMES[:5])
    torch.manual_seed(0)
    a, b = CoCoOp(fast, causal_model.embed_dim), CoCoOp(full, causal_model.embed_dim)
    b.meta_net.load_state_dict(a.meta_net.state_dict())
    with torch.no_grad():  # a meta-net far from zero, so each image's prefix differs
        for p in a.meta_net.parameters():
            p.normal_(0, 0.3)
        b.meta_net.load_state_dict(a.meta_net.state_dict())
    images = F.normalize(torch.randn(3, causal_model.embed_dim, generator=torch.Generator().manual_seed(4)), dim=-1)
    labels = torch.tensor([0, 3, 4])
    counter = _CountFullPasses(causal_model, monkeypatch)
    out = {}
    for name, cocoop, chunk in (("fast", a, 4096), ("chunked", a, 7), ("full", b, 4096)):
        for p in cocoop.parameters():
            p.grad = None
        logits = cocoop(causal_model, images, text_chunk=chunk)
        F.cross_entropy(logits, labels).backward()
        out[name] = (logits.detach(), cocoop.learner.ctx.grad.clone(), cocoop.meta_net.net[0].weight.grad.clone()
                     if hasattr(cocoop.meta_net, "net") else next(cocoop.meta_net.parameters()).grad.clone())
    assert counter.calls == 1  # only the full learner ran the full pass
    assert out["full"][0].std(dim=0).max() > 0  # images get different logits: the prefixes differ
    for name in ("fast", "chunked"):
        for got, ref in zip(out[name], out["full"]):
            assert (got - ref).abs().max() <= 1e-5, name


def test_zeroshot_classifier_equals_the_full_pass(causal_model, monkeypatch):
    # OpenAI's 80 templates, plus a bare "{}." (prefix = specials only) and a head that
    # does not end in a space (runs in full), on names that end in punctuation.
    templates = zeroshot.resolve_templates("ensemble") + ["{}.", "a photo:{}"]
    fast = zeroshot._encode_classifier(causal_model, NAMES, templates, batch_size=256)
    assert zeroshot.text_path(causal_model) == "shared-prefix"
    monkeypatch.setattr(causal_model, "shared_prefix_encoder", lambda: None)
    full = zeroshot._encode_classifier(causal_model, NAMES, templates, batch_size=256)
    assert zeroshot.text_path(causal_model) == "full"
    assert (fast - full).abs().max() <= 1e-5
    # and against the plain definition: each prompt through encode_text, ensembled
    prompts = zeroshot.format_prompts(NAMES, templates)
    batch = causal_model.tokenize(prompts)
    with torch.no_grad():
        each = causal_model.encode_text(batch.input_ids, batch.attention_mask)
    assert (zeroshot.ensemble(each.view(len(NAMES), len(templates), -1)) - fast).abs().max() <= 1e-5


def test_zeroshot_prompts_whose_start_is_not_the_template_head_run_in_full(tiny_clip_model, monkeypatch):
    # A tokenizer may encode a template's head alone differently from the same text inside
    # the prompt (merges across the boundary); such rows must not take the shortcut.
    templates = ["a photo of a {}."]
    full = zeroshot._encode_classifier(tiny_clip_model, NAMES, templates, batch_size=256)
    tokens = tiny_clip_model.tokenizer.tokens
    monkeypatch.setattr(tiny_clip_model.tokenizer, "tokens", lambda text: tokens(text)[:-1] + tokens("dog") if text == "a photo of a" else tokens(text))
    calls = []
    encode_text = tiny_clip_model.encode_text
    monkeypatch.setattr(tiny_clip_model, "encode_text", lambda *a, **k: calls.append(1) or encode_text(*a, **k))
    got = zeroshot._encode_classifier(tiny_clip_model, NAMES, templates, batch_size=256)
    assert calls == [1]  # every row ran in full
    assert (got - full).abs().max() <= 1e-5

"""CoCoOp: zero meta-net equals CoOp exactly; batched prompts equal a per-image loop;
seeded training; transfer to new class names keeps context and meta-net."""

import pytest
import torch
import torch.nn.functional as F

from coop_fakes import FakeVLModel
from vlkit import zeroshot
from vlkit.adapt.cocoop import CoCoOp, CoCoOpConfig, cocoop_logits, train_cocoop
from vlkit.adapt.coop import classifier_weights, prompt_logits
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
from vlkit.errors import VlkitError

CLASSES = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "bidir"])
def model(request):
    return FakeVLModel(causal=request.param)


def _images(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _zero_meta(cocoop: CoCoOp) -> CoCoOp:
    with torch.no_grad():
        last = cocoop.meta_net.net[-1]
        last.weight.zero_()
        last.bias.zero_()
    return cocoop


def test_zero_meta_net_gives_coop_and_zero_shot_logits(model):
    learner = PromptLearner(model, CLASSES, PromptOptions(ctx_init="a photo of a"))
    cocoop = _zero_meta(CoCoOp(learner, model.embed_dim))
    x = _images(5, model.embed_dim)
    got = cocoop_logits(model, cocoop, x, image_chunk=2)
    coop = prompt_logits(model, x, classifier_weights(model, learner))
    assert (got - coop).abs().max() <= 1e-5
    zs = zeroshot.logits(model, x, zeroshot.zeroshot_classifier(model, CLASSES, ["a photo of a {}."], cache=False))
    assert (got - zs).abs().max() <= 1e-5


def test_batched_prompts_equal_a_per_image_loop(model):
    torch.manual_seed(0)
    learner = PromptLearner(model, CLASSES, PromptOptions(n_ctx=3), generator=torch.Generator().manual_seed(1))
    cocoop = CoCoOp(learner, model.embed_dim)
    with torch.no_grad():
        for p in cocoop.meta_net.parameters():
            p.normal_(0, 0.5)  # a meta-net that really moves the context
    x = _images(6, model.embed_dim, seed=2)
    batched = cocoop_logits(model, cocoop, x, image_chunk=6)
    looped = torch.cat([cocoop(model, x[i : i + 1]).detach() for i in range(len(x))])
    assert torch.allclose(batched, looped, atol=1e-5)
    # conditioning matters: an image's logits differ from the unconditioned prompts'
    assert (batched - prompt_logits(model, x, classifier_weights(model, learner))).abs().max() > 1e-3
    # small text chunks give the same features as one pass
    assert torch.allclose(cocoop.text_features(model, x, text_chunk=5), cocoop.text_features(model, x), atol=1e-6)


def _task(model, n_per_class: int = 6):
    """Image features near the zero-shot weight of a *shifted* class, so training must move the prompts."""
    w = zeroshot.zeroshot_classifier(model, CLASSES, ["a photo of a {}."], cache=False)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    x = F.normalize(w[(y + 1) % len(CLASSES)] + 0.3 * torch.randn(len(y), 2, w.shape[1], generator=g).transpose(0, 1), dim=-1)
    return x.transpose(0, 1).contiguous(), y


def test_training_is_seeded_and_moves_context_and_meta_net(model):
    feats, y = _task(model)
    cfg = CoCoOpConfig(epochs=2, batch_size=4, lr=0.002, warmup_epochs=0, seed=3)
    a = train_cocoop(model, CLASSES, feats, y, cfg)
    b = train_cocoop(model, CLASSES, feats, y, cfg)
    x = feats[:, 0]
    assert torch.equal(cocoop_logits(model, a.model, x), cocoop_logits(model, b.model, x))
    init = PromptLearner(model, CLASSES, cfg.prompt)
    assert not torch.equal(a.model.learner.ctx.detach(), init.ctx.detach())
    torch.manual_seed(cfg.seed)
    fresh_meta = CoCoOp(init, model.embed_dim).meta_net  # the same seeded initialisation
    assert not torch.equal(a.model.meta_net.net[-1].weight, fresh_meta.net[-1].weight)
    assert len(a.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in a.history)


def test_transfer_to_new_class_names_keeps_context_and_meta_net(model):
    learner = PromptLearner(model, CLASSES, PromptOptions(ctx_init="a photo of a"))
    cocoop = CoCoOp(learner, model.embed_dim)
    moved = cocoop.for_classnames(model, ["car", "tree"])
    assert torch.equal(moved.learner.ctx, learner.ctx)
    x = _images(3, model.embed_dim, seed=5)
    fresh = CoCoOp(PromptLearner(model, ["car", "tree"], PromptOptions(ctx_init="a photo of a")), model.embed_dim)
    fresh.meta_net.load_state_dict(cocoop.meta_net.state_dict())
    assert torch.allclose(cocoop_logits(model, moved, x), cocoop_logits(model, fresh, x), atol=1e-6)


def test_bad_settings_and_labels_name_the_input(model):
    with pytest.raises(VlkitError, match="CoCoOp settings"):
        CoCoOpConfig(batch_size=0)
    feats, y = _task(model)
    with pytest.raises(VlkitError, match="training labels"):
        train_cocoop(model, CLASSES, feats, y + 10, CoCoOpConfig(epochs=1))

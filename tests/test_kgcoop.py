"""KgCoOp: the regulariser's value, the weight keeps the prompts near the hand-written
prompt, a zero weight is plain CoOp."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from coop_fakes import FakeVLModel
from vlkit import zeroshot
from vlkit.adapt.coop import CoOpConfig, classifier_weights, train_coop
from vlkit.adapt.kgcoop import KgCoOpConfig, context_from_template, knowledge_loss, train_kgcoop
from vlkit.adapt.prompt_learner import PromptOptions
from vlkit.errors import VlkitError

CLASSES = ["cat", "dog", "bird", "fish"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def model():
    return FakeVLModel(causal=True)


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    """Our own copy of the tiny HF CLIP (training freezes it; the shared one stays as it was)."""
    from vlkit.models import load_model

    return load_model(str(tiny_clip_dir))


def test_knowledge_loss_is_weighted_cosine_distance():
    a = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    b = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert knowledge_loss(a, a, 8.0).abs().item() < 1e-6
    expected = 8.0 * (1 - (a * b).sum(1).mean())
    assert knowledge_loss(a, b, 8.0).item() == pytest.approx(expected.item(), rel=1e-5)
    # for unit vectors: lambda/2 * mean squared Euclidean distance (the paper's form)
    assert knowledge_loss(a, b, 8.0).item() == pytest.approx(4.0 * ((a - b) ** 2).sum(1).mean().item(), rel=1e-5)


def test_context_from_template():
    assert context_from_template("a photo of a {}.") == ("a photo of a", ".")
    assert context_from_template("an emoji of {}") == ("an emoji of", "")
    with pytest.raises(VlkitError, match="template"):
        context_from_template("{} emoji")
    with pytest.raises(VlkitError, match="template"):
        context_from_template("no slot")


def _task(model, classes=CLASSES):
    """Features near the hand-written prompt of the *next* class: cross-entropy pulls the prompts away."""
    w = zeroshot.zeroshot_classifier(model, classes, [TEMPLATE], cache=False)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(len(classes)).repeat_interleave(4)
    x = F.normalize(w[(y + 1) % len(classes)] + 0.2 * torch.randn(len(y), w.shape[1], generator=g), dim=-1)
    return x, y, w


def _drift(model, learner, hand):
    return 1.0 - (classifier_weights(model, learner) * hand).sum(1).mean().item()


def test_weight_keeps_prompts_near_the_hand_written_prompt_and_zero_weight_is_coop(clip):
    classes = ["cat", "dog", "apple", "car", "tree"]
    x, y, hand = _task(clip, classes)
    coop = CoOpConfig(epochs=6, lr=0.002, batch_size=8, warmup_epochs=0, seed=2)
    free = train_kgcoop(clip, classes, x, y, KgCoOpConfig(coop=coop, weight=0.0, template=TEMPLATE))
    kept = train_kgcoop(clip, classes, x, y, KgCoOpConfig(coop=coop, weight=3.0, template=TEMPLATE))
    # measured: drift 0.026 without the term, 0.005 with weight 3 (SGD at this lr
    # overshoots for weights >= 10 on this stiff tiny tower; see the module notes)
    assert _drift(clip, free.learner, hand) > 0.01
    assert _drift(clip, kept.learner, hand) < _drift(clip, free.learner, hand) / 3
    plain = train_coop(clip, classes, x, y, replace(coop, prompt=PromptOptions(ctx_init="a photo of a")))
    assert torch.equal(plain.learner.ctx, free.learner.ctx)


def test_hand_features_must_match_classes(model):
    x, y, hand = _task(model)
    with pytest.raises(VlkitError, match="hand-written features"):
        train_kgcoop(model, CLASSES, x, y, KgCoOpConfig(coop=CoOpConfig(epochs=1)), hand_features=hand[:2])

"""CoOp's prompt learner on every backend: exactness, layouts, truncation, init, gradients."""

from __future__ import annotations

import pytest
import torch

from coop_fakes import FakeVLModel
from vlkit import zeroshot
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions, special_tokens
from vlkit.errors import VlkitError

CLASSES = ["cat", "dog", "red heart", "smiling_face", "car"]
BACKENDS = ["fake_causal", "fake_bidir", "tiny_clip_model", "tiny_dual_model", "vlkit_mean_model"]


@pytest.fixture(scope="module")
def fakes():
    return {"fake_causal": FakeVLModel(causal=True), "fake_bidir": FakeVLModel(causal=False)}


@pytest.fixture(scope="module")
def vlkit_mean_model(tmp_path_factory):
    """vlkit's own dual-encoder format (the embedded model's) with a BERT tower pooled by mean."""
    from conftest import build_tiny_bert_folder
    from vlkit.models import build_vlkit_dual_encoder

    bert = build_tiny_bert_folder(tmp_path_factory.mktemp("bert_mean"), sentence_pooling="mean")
    vit = {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    model = build_vlkit_dual_encoder(vit, text_tower=bert, projection_dim=16, context_length=24).eval()
    assert model.text_pooling == "mean"
    return model


@pytest.fixture(params=BACKENDS)
def model(request, fakes):
    if request.param in fakes:
        return fakes[request.param]
    return request.getfixturevalue(request.param)


def _image_features(model, n: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, model.embed_dim, generator=g), dim=-1)


def test_photo_of_a_context_gives_exactly_zero_shot_logits(model):
    """The paper's sanity anchor: context initialised from "a photo of a", untrained, class
    token at the end == zero-shot CLIP with "a photo of a {class}."."""
    learner = PromptLearner(model, CLASSES, PromptOptions(ctx_init="a photo of a"))
    assert learner.n_ctx == len(model.tokenizer.tokens("a photo of a"))
    img = _image_features(model)
    with torch.no_grad():
        coop = model.logit_scale * img @ learner.text_features(model).t()
    zs = zeroshot.logits(model, img, zeroshot.zeroshot_classifier(model, CLASSES, "photo", cache=False))
    assert (coop - zs).abs().max().item() <= 1e-5
    # and the token ids are exactly the tokenizer's, up to the (cut) padding
    ref = model.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    for row in range(len(CLASSES)):
        n = int(ref.attention_mask[row].sum())
        assert learner.token_ids[row, :n].tolist() == ref.input_ids[row, :n].tolist()
        assert int(learner.attention_mask[row].sum()) == n


def test_csc_from_phrase_is_also_exact(model):
    learner = PromptLearner(model, CLASSES, PromptOptions(ctx_init="a photo of a", csc=True))
    assert learner.ctx.shape[:2] == (len(CLASSES), learner.n_ctx)
    unified = PromptLearner(model, CLASSES, PromptOptions(ctx_init="a photo of a"))
    with torch.no_grad():
        assert torch.allclose(learner.text_features(model), unified.text_features(model), atol=1e-6)


@pytest.mark.parametrize("backend", ["tiny_clip_model", "tiny_dual_model"])
def test_middle_and_front_layouts_follow_the_paper(request, backend):
    model = request.getfixturevalue(backend)
    tok = model.tokenizer
    sp = special_tokens(model)
    ctx = tok.tokens("a photo of a")
    a, photo, of = ctx[0], ctx[1], ctx[2]
    name = tok.tokens("red heart")
    dot = tok.tokens(".")
    end = PromptLearner(model, ["red heart"], PromptOptions(ctx_init="a photo of a", position="end"))
    mid = PromptLearner(model, ["red heart"], PromptOptions(ctx_init="a photo of a", position="middle"))
    front = PromptLearner(model, ["red heart"], PromptOptions(ctx_init="a photo of a", position="front"))
    assert end.token_ids[0].tolist() == sp.start + [a, photo, of, a] + name + dot + sp.end
    # middle: first M/2 context tokens, the class, the other M/2, then "."
    assert mid.token_ids[0].tolist() == sp.start + [a, photo] + name + [of, a] + dot + sp.end
    # front: the class first, then all M context tokens
    assert front.token_ids[0].tolist() == sp.start + name + [a, photo, of, a] + dot + sp.end
    s = len(sp.start)
    assert mid.ctx_positions[0].tolist() == [s, s + 1, s + 2 + len(name), s + 3 + len(name)]
    assert front.ctx_positions[0].tolist() == list(range(s + len(name), s + len(name) + 4))


@pytest.mark.parametrize("backend", ["fake_causal", "tiny_clip_model"])
def test_middle_layout_with_odd_context_puts_the_floor_half_first(request, fakes, backend):
    """CoOp's code splits at n_ctx // 2: M=5 gives 2 context tokens, the class, then 3."""
    model = fakes.get(backend) or request.getfixturevalue(backend)
    tok = model.tokenizer
    sp = special_tokens(model)
    phrase = "a bad photo of a" if backend == "tiny_clip_model" else "a small photo of a"
    words = tok.tokens(phrase)
    assert len(words) == 5
    name = tok.tokens("red heart")
    mid = PromptLearner(model, ["red heart"], PromptOptions(ctx_init=phrase, position="middle"))
    assert mid.token_ids[0].tolist() == sp.start + words[:2] + name + words[2:] + tok.tokens(".") + sp.end
    s = len(sp.start)
    assert mid.ctx_positions[0].tolist() == [s, s + 1] + [s + 2 + len(name) + i for i in range(3)]
    # random init: the same split, the class sits after the second context slot
    rand = PromptLearner(model, ["red heart"], PromptOptions(n_ctx=5, position="middle"))
    assert rand.ctx_positions[0].tolist() == mid.ctx_positions[0].tolist()
    assert rand.token_ids[0, s + 2 : s + 2 + len(name)].tolist() == name


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_assembled_sequence_holds_context_rows_and_frozen_rows(model, position):
    learner = PromptLearner(model, CLASSES, PromptOptions(n_ctx=4, position=position, csc=True),
                            generator=torch.Generator().manual_seed(3))
    embeds, mask = learner.assemble(model)
    frozen = model.token_embedding(learner.token_ids[:, : embeds.shape[1]])
    for c in range(len(CLASSES)):
        pos = learner.ctx_positions[c]
        assert torch.equal(embeds[c, pos], learner.ctx[c].detach())
        other = torch.ones(embeds.shape[1], dtype=torch.bool)
        other[pos] = False
        assert torch.equal(embeds[c, other], frozen[c, other])
    assert mask.shape == embeds.shape[:2]


def test_truncation_to_longest_prompt_is_exact(model):
    opts = dict(n_ctx=4, position="middle")
    g = torch.Generator().manual_seed(1)
    cut = PromptLearner(model, CLASSES, PromptOptions(**opts), generator=g)
    full = PromptLearner(model, CLASSES, PromptOptions(**opts, truncate=False))
    with torch.no_grad():
        full.ctx.copy_(cut.ctx)
        assert full.token_ids.shape[1] == model.tokenizer.context_length > cut.token_ids.shape[1]
        assert torch.allclose(cut.text_features(model), full.text_features(model), atol=1e-5)
        # chunks of classes are cut further to their own longest prompt: still exact
        assert torch.allclose(cut.text_features(model, chunk_size=2), full.text_features(model), atol=1e-5)


def test_random_init_is_seeded_normal_002(fakes):
    model = fakes["fake_causal"]
    a = PromptLearner(model, CLASSES, PromptOptions(n_ctx=16), generator=torch.Generator().manual_seed(5))
    b = PromptLearner(model, CLASSES, PromptOptions(n_ctx=16), generator=torch.Generator().manual_seed(5))
    c = PromptLearner(model, CLASSES, PromptOptions(n_ctx=16), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    assert a.ctx.shape == (16, 16)
    assert abs(a.ctx.std().item() - 0.02) < 0.004 and abs(a.ctx.mean().item()) < 0.005
    csc = PromptLearner(model, CLASSES, PromptOptions(n_ctx=8, csc=True))
    assert csc.ctx.shape == (len(CLASSES), 8, 16)


def test_gradient_reaches_only_the_context_of_the_scored_class(model):
    learner = PromptLearner(model, CLASSES, PromptOptions(n_ctx=4, csc=True), generator=torch.Generator().manual_seed(0))
    flags = [p.requires_grad for p in model.parameters()]
    try:  # the shared fixture stays as it was
        for p in model.parameters():
            p.requires_grad_(False)
        learner.text_features(model)[1].sum().backward()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    per_class = learner.ctx.grad.abs().sum(dim=(1, 2))
    assert per_class[1] > 0 and per_class[[0, 2, 3, 4]].eq(0).all()


def test_unified_context_transfers_to_new_class_names(fakes):
    model = fakes["fake_causal"]
    learner = PromptLearner(model, ["cat", "dog"], PromptOptions(n_ctx=4), generator=torch.Generator().manual_seed(0))
    moved = learner.for_classnames(model, ["bird", "fish", "tree"])
    assert torch.equal(moved.ctx, learner.ctx) and moved.n_cls == 3
    direct = PromptLearner(model, ["bird", "fish", "tree"], PromptOptions(n_ctx=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(moved.text_features(model), direct.text_features(model))
    csc = PromptLearner(model, ["cat", "dog"], PromptOptions(n_ctx=4, csc=True))
    with pytest.raises(VlkitError, match="only a unified-context prompt"):
        csc.for_classnames(model, ["bird"])


def test_bad_inputs_are_one_line_errors(fakes):
    model = fakes["fake_causal"]
    with pytest.raises(VlkitError, match="class names: the list is empty"):
        PromptLearner(model, [], PromptOptions())
    with pytest.raises(VlkitError, match="exceeds the text tower's context length"):
        PromptLearner(model, ["cat"], PromptOptions(n_ctx=30))
    with pytest.raises(VlkitError, match="class token position 'side'"):
        PromptOptions(position="side")
    with pytest.raises(VlkitError, match="ctx_init is empty"):
        PromptOptions(ctx_init="  ")

"""CoOp training: recipe, learning, determinism, chunking, precision, artefacts, nearest words."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from coop_fakes import FakeVLModel
from vlkit import zeroshot
from vlkit.adapt import interpret, prompt_io
from vlkit.adapt.coop import (
    CoOpConfig,
    classifier_weights,
    coop_loss_backward,
    epochs_for_shots,
    freeze,
    lr_at_epoch,
    prompt_logits,
    train_coop,
)
from vlkit.adapt.features import AugmentOptions, augmented_features
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
from vlkit.errors import VlkitError

NAMES = ["cat", "dog", "bird", "fish", "car", "tree"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fake():
    # CLIP's trained temperature (logit scale 100), as CoOp's learning rate assumes.
    return FakeVLModel(causal=True, log_scale=math.log(100.0))


def _prototype_task(model, n_per_class: int, seed: int, noise: float = 0.3):
    """Images of class c scatter around a random direction P_c unrelated to any text."""
    protos = torch.nn.functional.normalize(torch.randn(len(NAMES), model.embed_dim, generator=torch.Generator().manual_seed(7)), dim=-1)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(NAMES)).repeat_interleave(n_per_class)
    x = torch.nn.functional.normalize(protos[y] + noise * torch.randn(len(y), model.embed_dim, generator=g), dim=-1)
    return x, y


def _accuracy(logits, y) -> float:
    return float((logits.argmax(1) == y).float().mean())


def test_recipe_defaults_and_schedule():
    cfg = CoOpConfig()
    assert (cfg.lr, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.warmup_lr) == (0.002, 32, 0.9, 5e-4, 1e-5)
    assert [epochs_for_shots(s) for s in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert lr_at_epoch(0, 200, 0.002) == 1e-5  # constant warm-up epoch
    assert lr_at_epoch(1, 200, 0.002) == pytest.approx(0.002)  # cosine starts at the base rate
    assert lr_at_epoch(101, 200, 0.002) == pytest.approx(0.001)
    assert lr_at_epoch(199, 200, 0.002) < 1e-6 * 2e2
    with pytest.raises(VlkitError, match="precision 'fp16'"):
        CoOpConfig(precision="fp16")


def test_train_coop_steps_the_warm_up_epoch_at_the_warm_up_rate_then_the_cosine_start(fake):
    """Two epochs of one full batch each: epoch 1 is one SGD step at the constant 1e-5,
    epoch 2 one at the base rate (the cosine's first value), replayed by hand from the
    gradients of `coop_loss_backward` (momentum 0.9 and weight decay 5e-4 included)."""
    freeze(fake)
    x, y = _prototype_task(fake, 2, seed=4)  # 12 images < batch 32: one batch per epoch
    cfg = CoOpConfig(prompt=PromptOptions(n_ctx=4), epochs=2, seed=3, lr=0.002, warmup_lr=1e-5)
    result = train_coop(fake, NAMES, x, y, cfg)
    assert [h["lr"] for h in result.history] == [1e-5, pytest.approx(0.002)]

    learner = PromptLearner(fake, NAMES, cfg.prompt, generator=torch.Generator().manual_seed(cfg.seed))
    p0 = learner.ctx.detach().clone()

    def grad_at(ctx):
        with torch.no_grad():
            learner.ctx.copy_(ctx)
        learner.ctx.grad = None
        coop_loss_backward(fake, learner, x, y)
        return learner.ctx.grad + cfg.weight_decay * ctx

    buf = grad_at(p0)  # SGD's momentum buffer starts at the first gradient
    p1 = p0 - cfg.warmup_lr * buf
    buf = cfg.momentum * buf + grad_at(p1)
    p2 = p1 - cfg.lr * buf
    torch.testing.assert_close(result.learner.ctx.detach(), p2, atol=1e-7, rtol=1e-4)


def test_sixteen_shots_learn_far_above_zero_shot(fake):
    x, y = _prototype_task(fake, 16, seed=1)
    xt, yt = _prototype_task(fake, 40, seed=2)
    zs = _accuracy(zeroshot.logits(fake, xt, zeroshot.zeroshot_classifier(fake, NAMES, cache=False)), yt)
    result = train_coop(fake, NAMES, x, y, CoOpConfig(prompt=PromptOptions(n_ctx=4, csc=True), epochs=50, seed=1))
    acc = _accuracy(prompt_logits(fake, xt, classifier_weights(fake, result.learner)), yt)
    assert acc >= zs + 0.3, (zs, acc)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.epochs == 50 and len(result.history) == 50


def test_same_seed_same_prompt_other_seed_other_prompt(fake):
    x, y = _prototype_task(fake, 4, seed=1)
    views = torch.stack([x, x.roll(1, dims=1)], dim=1)  # two "views" so view sampling is exercised
    cfg = CoOpConfig(prompt=PromptOptions(n_ctx=4), epochs=3, batch_size=8, seed=5)
    a = train_coop(fake, NAMES, views, y, cfg)
    b = train_coop(fake, NAMES, views, y, cfg)
    c = train_coop(fake, NAMES, views, y, CoOpConfig(prompt=PromptOptions(n_ctx=4), epochs=3, batch_size=8, seed=6))
    assert torch.equal(a.learner.ctx, b.learner.ctx) and a.history == b.history
    assert not torch.equal(a.learner.ctx, c.learner.ctx)


@pytest.mark.parametrize("csc", [False, True])
def test_chunked_class_dimension_gives_the_same_gradient(fake, csc):
    freeze(fake)
    x, y = _prototype_task(fake, 2, seed=3)
    learner = PromptLearner(fake, NAMES, PromptOptions(n_ctx=4, csc=csc), generator=torch.Generator().manual_seed(0))
    loss_full, _ = coop_loss_backward(fake, learner, x, y)
    grad_full = learner.ctx.grad.clone()
    learner.ctx.grad = None
    loss_chunked, _ = coop_loss_backward(fake, learner, x, y, class_chunk=4)
    assert loss_chunked == pytest.approx(loss_full, rel=1e-5)
    assert torch.allclose(learner.ctx.grad, grad_full, atol=1e-5 * float(grad_full.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("class_chunk", [None, 2])
def test_text_loss_hook_adds_its_term_to_the_loss_and_its_gradient(fake, class_chunk):
    """KgCoOp's regulariser enters through `text_loss`: loss and gradient are the plain
    CoOp ones plus exactly those of the term (on the full and the chunked path)."""
    freeze(fake)
    x, y = _prototype_task(fake, 2, seed=3)
    learner = PromptLearner(fake, NAMES, PromptOptions(n_ctx=4), generator=torch.Generator().manual_seed(0))
    target = torch.randn(len(NAMES), fake.embed_dim, generator=torch.Generator().manual_seed(1))

    def term(t):
        return 8.0 * ((t - target) ** 2).sum(-1).mean()

    plain_loss, _ = coop_loss_backward(fake, learner, x, y)
    plain = learner.ctx.grad.clone()
    learner.ctx.grad = None
    alone = term(learner.text_features(fake).float())
    alone.backward()
    term_grad = learner.ctx.grad.clone()
    learner.ctx.grad = None
    loss, _ = coop_loss_backward(fake, learner, x, y, class_chunk=class_chunk, text_loss=term)
    assert loss == pytest.approx(plain_loss + alone.detach().item(), rel=1e-5)
    assert term_grad.abs().max() > 0.3 * plain.abs().max()  # the term is not lost in the noise
    torch.testing.assert_close(learner.ctx.grad, plain + term_grad, atol=1e-5 * float(term_grad.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "amp"])
def test_low_precision_keeps_fp32_master_context(fake, precision):
    x, y = _prototype_task(fake, 8, seed=1)
    base = CoOpConfig(prompt=PromptOptions(n_ctx=4, csc=True), epochs=6, batch_size=16, seed=2)
    ref = train_coop(fake, NAMES, x, y, base)
    low = train_coop(fake, NAMES, x, y, CoOpConfig(**{**base.__dict__, "precision": precision}))
    assert low.learner.ctx.dtype == torch.float32
    assert all(math.isfinite(h["loss"]) for h in low.history)
    assert not torch.equal(low.learner.ctx, ref.learner.ctx)  # the low-precision path really ran
    # close to fp32 training: same direction of travel from the same start
    start = PromptLearner(fake, NAMES, base.prompt, generator=torch.Generator().manual_seed(2)).ctx
    cos = torch.nn.functional.cosine_similarity((low.learner.ctx - start).flatten(), (ref.learner.ctx - start).flatten(), dim=0)
    assert cos > 0.75


def test_save_load_round_trip_and_backbone_check(tmp_path, fake):
    x, y = _prototype_task(fake, 2, seed=1)
    result = train_coop(fake, NAMES, x, y, CoOpConfig(prompt=PromptOptions(n_ctx=4, position="middle"), epochs=2))
    tensors, meta = prompt_io.save_prompt(tmp_path / "p", result.learner, fake, extra={"shots": 2})
    assert tensors.name == "prompt.safetensors" and meta.name == "prompt.json"
    saved = prompt_io.load_prompt(tmp_path / "p")
    assert saved.classnames == NAMES and saved.options.position == "middle" and saved.extra["shots"] == 2
    loaded = prompt_io.learner_from_saved(fake, saved)
    with torch.no_grad():
        assert torch.equal(loaded.text_features(fake), result.learner.text_features(fake))
    # the same unified prompt on new class names
    moved = prompt_io.learner_from_saved(fake, saved, ["flag", "heart"])
    assert moved.classnames == ["flag", "heart"] and torch.equal(moved.ctx, result.learner.ctx)
    other = FakeVLModel(causal=True, seed=1)
    with pytest.raises(VlkitError, match="trained on backbone 'fake-causal-0.*load the same backbone"):
        prompt_io.learner_from_saved(other, saved)
    with pytest.raises(VlkitError, match="does not exist"):
        prompt_io.load_prompt(tmp_path / "missing")


def test_csc_prompt_refuses_new_class_names(tmp_path, fake):
    learner = PromptLearner(fake, NAMES, PromptOptions(n_ctx=2, csc=True))
    prompt_io.save_prompt(tmp_path / "p.safetensors", learner, fake)
    saved = prompt_io.load_prompt(tmp_path / "p.safetensors")
    assert saved.ctx.shape == (len(NAMES), 2, 16)
    with pytest.raises(VlkitError, match="class-specific context is tied"):
        prompt_io.learner_from_saved(fake, saved, ["flag"])


@pytest.mark.parametrize("csc", [False, True])
def test_nearest_words_of_an_untrained_phrase_context_are_the_phrase(tiny_clip_model, csc):
    learner = PromptLearner(tiny_clip_model, ["cat", "dog"], PromptOptions(ctx_init="a photo of a", csc=csc))
    near = interpret.nearest_tokens(tiny_clip_model, learner.ctx, k=2)
    rows = near if not csc else near[1]
    assert [r[0].token.replace("</w>", "") for r in rows] == ["a", "photo", "of", "a"]
    assert all(r[0].distance == pytest.approx(0.0, abs=1e-5) and r[1].distance > 0 for r in rows)
    text = interpret.describe(near, ["cat", "dog"])
    assert "nearest words: a photo of a" in text and ("class dog:" in text) == csc
    js = interpret.as_json(near)
    assert (js[0][0]["token"] if not csc else js[1][0][0]["token"]).startswith("a")


def test_augmented_views_are_seeded_cached_and_flip_optional(tmp_path, tiny_clip_model):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        im = Image.new("RGB", (48, 40), colour)
        im.paste((255, 255, 255), (0, 0, 12 + 8 * i, 20))  # asymmetric, so flips matter
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    opts = AugmentOptions(views=4, seed=3)
    a = augmented_features(tiny_clip_model, paths, opts)
    b = augmented_features(tiny_clip_model, paths, opts, cache_dir=tmp_path / "cache")
    assert a.shape == (3, 4, tiny_clip_model.embed_dim) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    assert not torch.allclose(a[:, 0], a[:, 1])  # views differ
    cached = list((tmp_path / "cache" / "coop-views").glob("*.safetensors"))
    assert len(cached) == 1
    again = augmented_features(tiny_clip_model, paths, opts, cache_dir=tmp_path / "cache")
    assert torch.equal(again, a)
    no_flip = augmented_features(tiny_clip_model, paths, AugmentOptions(views=4, seed=3, flip=False))
    assert not torch.equal(no_flip, a)
    # same crops, no flips: views that were not flipped are identical
    same = [(i, v) for i in range(3) for v in range(4) if torch.equal(no_flip[i, v], a[i, v])]
    assert 0 < len(same) < 12


def test_nearest_words_skip_special_tokens_unless_asked(tiny_dual_model):
    mask = interpret.special_token_mask(tiny_dual_model)
    tok = tiny_dual_model.tokenizer
    specials = [i for i in range(int(tok.vocab_size)) if mask[i]]
    assert {"[CLS]", "[SEP]", "[MASK]", "[PAD]"} <= {tok.id_to_token(i) for i in specials}
    assert not mask[tok.tokens("photo")[0]]
    mask_id = next(i for i in specials if tok.id_to_token(i) == "[MASK]")
    ctx = tiny_dual_model.token_embedding(torch.tensor([[mask_id, tok.tokens("photo")[0]]]))[0]
    raw = interpret.nearest_tokens(tiny_dual_model, ctx, k=1, words_only=False)
    words = interpret.nearest_tokens(tiny_dual_model, ctx, k=1)
    assert raw[0][0].token == "[MASK]" and not mask[words[0][0].token_id]
    assert raw[1][0].token == words[1][0].token == "photo"
    csc = interpret.nearest_tokens(tiny_dual_model, ctx.unsqueeze(0).repeat(3, 1, 1), k=1)
    assert [[n[0].token for n in rows] for rows in csc] == [[w[0].token for w in words]] * 3

"""CoCoOp: zero meta-net equals CoOp exactly; batched prompts equal a per-image loop;
seeded training; transfer to new class names keeps context and meta-net; the official
fp16 parameters updated in fp16 bit for bit; a meta-net frozen at its init."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from coop_fakes import FakeVLModel
from vlkit import zeroshot
from vlkit.adapt.cocoop import CoCoOp, CoCoOpConfig, HalfSGD, cocoop_logits, train_cocoop
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
    with pytest.raises(VlkitError, match="param_dtype='bf16'"):
        CoCoOpConfig(param_dtype="bf16")
    with pytest.raises(VlkitError, match="precision='amp'"):
        CoCoOpConfig(param_dtype="fp16", precision="amp")
    feats, y = _task(model)
    with pytest.raises(VlkitError, match="training labels"):
        train_cocoop(model, CLASSES, feats, y + 10, CoCoOpConfig(epochs=1))



def _seeded_cocoop(model, cfg: CoCoOpConfig) -> CoCoOp:
    """The initialisation train_cocoop starts from."""
    learner = PromptLearner(model, CLASSES, cfg.prompt, generator=torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    return CoCoOp(learner, model.embed_dim)


def _fp16_sgd_step(p, g, buf, lr, mu, wd):
    """SGD in fp16: d = g + wd*p, buf = mu*buf + d (first step: d), p = p - lr*buf, with
    fp32 scalars; each op's exact value (float64 here) rounded to fp32 then to fp16."""
    lr, mu, wd = (float(torch.tensor(v, dtype=torch.float32)) for v in (lr, mu, wd))
    r = lambda exact: exact.float().half()
    d = r(g.double() + wd * p.double())
    buf = d if buf is None else r(r(mu * buf.double()).double() + d.double())
    return r(p.double() - lr * buf.double()), buf


def test_fp16_parameters_are_updated_by_sgd_in_fp16_step_for_step(model):
    feats, y = _task(model, n_per_class=3)
    cfg = CoCoOpConfig(epochs=2, batch_size=4, warmup_epochs=1, warmup_lr=5e-3, lr=0.05, seed=4, param_dtype="fp16")
    got = train_cocoop(model, CLASSES, feats, y, cfg).model
    # replay by hand: the seeded init rounded to fp16, the same batches, fp16 gradients
    replay = _seeded_cocoop(model, cfg)
    replay.learner.ctx = torch.nn.Parameter(replay.learner.ctx.detach().half())
    replay.meta_net.half()
    params = [replay.learner.ctx, *replay.meta_net.parameters()]
    bufs = [None] * len(params)
    order_gen, view_gen = torch.Generator().manual_seed(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 2)
    views = F.normalize(feats, dim=-1)
    for lr in [cfg.warmup_lr, cfg.lr]:  # the two epochs' rates
        order = torch.randperm(len(y), generator=order_gen)
        for start in range(0, len(y), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = views[idx, torch.randint(0, views.shape[1], (len(idx),), generator=view_gen)]
            grads = torch.autograd.grad(F.cross_entropy(replay(model, x), y[idx]), params)
            assert all(g.dtype == torch.float16 for g in grads)
            for i, (p, g) in enumerate(zip(params, grads)):
                new, bufs[i] = _fp16_sgd_step(p.detach(), g, bufs[i], lr, cfg.momentum, cfg.weight_decay)
                with torch.no_grad():
                    p.copy_(new)
    trained = [got.learner.ctx, *got.meta_net.parameters()]
    assert [t.dtype for t in trained] == [torch.float16] * len(params)
    for t, p in zip(trained, params):
        assert torch.equal(t.detach(), p.detach())


def test_fp16_updates_underflow_and_the_model_still_evaluates_and_transfers(model):
    feats, y = _task(model, n_per_class=3)
    cfg = CoCoOpConfig(epochs=2, batch_size=4, warmup_epochs=0, seed=5)
    full = train_cocoop(model, CLASSES, feats, y, cfg)
    half = train_cocoop(model, CLASSES, feats, y, replace(cfg, param_dtype="fp16"))
    # every fp32 entry moves; in fp16 some updates round away entirely
    assert full.history[-1]["meta_out_unmoved"] == 0.0 and full.history[-1]["ctx_unmoved"] == 0.0
    assert half.history[-1]["meta_out_unmoved"] > 0.0
    x = feats[:, 0]
    logits = cocoop_logits(model, half.model, x)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    moved = half.model.for_classnames(model, CLASSES)
    assert torch.allclose(cocoop_logits(model, moved, x), logits, atol=1e-6)
    assert cocoop_logits(model, half.model.for_classnames(model, ["car", "tree"]), x).shape == (len(x), 2)


@pytest.mark.parametrize("param_dtype", ["fp32", "fp16"])
def test_frozen_meta_net_stays_at_its_init_while_the_context_trains(model, param_dtype):
    feats, y = _task(model, n_per_class=3)
    cfg = CoCoOpConfig(epochs=2, batch_size=4, warmup_epochs=0, seed=6, train_meta_net=False, param_dtype=param_dtype)
    res = train_cocoop(model, CLASSES, feats, y, cfg)
    init = _seeded_cocoop(model, cfg)
    for trained, start in zip(res.model.meta_net.parameters(), init.meta_net.parameters()):
        assert trained.grad is None
        assert torch.equal(trained.detach(), start.detach().to(trained.dtype))
    assert not torch.equal(res.model.learner.ctx.detach().float(), init.learner.ctx.detach())
    assert res.history[-1]["meta_out_unmoved"] == 1.0 and res.history[-1]["ctx_unmoved"] < 1.0


def test_half_sgd_uses_fp32_scalars_and_rounds_each_op_once_to_fp16():
    # an update of half an fp16 step is a tie that rounds to even: p stays 1.0 (underflow)
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))
    opt = HalfSGD([p], lr=2**-12, momentum=0.5, weight_decay=0.0)
    p.grad = torch.ones(1, dtype=torch.float16)
    opt.step()
    assert p.item() == 1.0 and opt.state[p]["momentum_buffer"].item() == 1.0  # first step: buf = d
    opt.param_groups[0]["lr"] = 2**-10
    opt.step()  # buf = 0.5 * 1 + 1 = 1.5; p = 1 - 1.5 * 2^-10 = 1 - 3 * 2^-11, representable
    assert opt.state[p]["momentum_buffer"].item() == 1.5 and p.item() == 1 - 3 * 2**-11
    # lr = 1024 - 3 * 2^-16 is 1024 - 2^-14 in fp32, so 1024 - lr is 2^-14 (exact scalars: 3 * 2^-16)
    p = torch.nn.Parameter(torch.full((1,), 1024.0, dtype=torch.float16))
    p.grad = torch.ones(1, dtype=torch.float16)
    HalfSGD([p], lr=1024 - 3 * 2**-16, momentum=0.9, weight_decay=0.0).step()
    assert p.item() == 2**-14

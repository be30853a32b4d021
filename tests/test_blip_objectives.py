"""BLIP's objectives, exactly: hard negatives, momentum encoders, ITC with queue and distillation,
the alpha ramp, ITM and LM, and 2 gloo processes = 1 process on the union batch.

Models are tiny random `BlipModel`s built here (vision 32 px, patch 16, width 32;
text width 32, 2 layers, BLIP's vocabulary of 30524), dropout off where values
are compared across runs. Tolerance 1e-5 where float32 sums reorder.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from vlkit.blip.objectives import (
    BlipPretrainer,
    alpha_at,
    itc_loss,
    itm_loss,
    lm_loss,
    negative_weights,
    same_pair_mask,
    sample_hard_negatives,
)

ATOL = 1e-5


def tiny_blip(seed: int = 0, dropout: float = 0.0):
    from transformers import BlipTextConfig, BlipVisionConfig

    from vlkit.blip.model import BlipModel

    torch.manual_seed(seed)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16, layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64, bos_token_id=30522, pad_token_id=0,
                          sep_token_id=102, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BlipModel.from_config(vision, text, embed_dim=16)


def text_batch(n: int, length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] pads, right-padded, varied lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = 3 + int(torch.randint(0, length - 3, (1,), generator=g))
        ids[i, 0], ids[i, 1 : k - 1], ids[i, k - 1] = 101, torch.randint(1000, 3000, (k - 2,), generator=g), 102
        mask[i, :k] = 1
    return ids, mask


def batch(n: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids, mask = text_batch(n, seed=seed)
    return {
        "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "image_ids": torch.arange(n),
        "caption_ids": torch.arange(n) % max(2, n - 2),  # the last two captions repeat the first two
    }


# ---------------------------------------------------------------- hard negatives


def test_hard_negative_sampler_never_returns_a_positive_with_duplicates():
    g = torch.Generator().manual_seed(0)
    draws = 0
    for trial in range(300):
        n = 2 + trial % 11
        image_ids = torch.randint(0, max(1, n // 2), (n,), generator=g)  # duplicate images
        caption_ids = torch.randint(0, max(1, n // 2), (n,), generator=g)  # duplicate captions
        img = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
        txt = F.normalize(img + 0.3 * torch.randn(n, 8, generator=g), dim=-1)  # positives score highest
        temp = torch.tensor([0.001, 0.07, 0.5][trial % 3])
        neg = sample_hard_negatives(img, txt, temp, image_ids, caption_ids, g)
        excluded = same_pair_mask(image_ids, caption_ids)
        for i in range(n):
            for kind in ("text", "image"):
                j = int(neg[f"neg_{kind}"][i])
                admissible = not bool(excluded[i].all())
                assert bool(neg[f"valid_{kind}"][i]) == admissible
                if admissible:
                    draws += 1
                    assert image_ids[j] != image_ids[i] and caption_ids[j] != caption_ids[i], (trial, i, kind)
    assert draws > 1500  # the property was checked on many real draws, at temperatures down to 0.001


def test_negative_weights_are_blips_masked_softmax_renormalised():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(6, 6, generator=g) * 5
    image_ids = torch.tensor([0, 1, 2, 2, 3, 4])
    caption_ids = torch.tensor([0, 1, 2, 3, 1, 5])
    excluded = same_pair_mask(image_ids, caption_ids)
    assert excluded.diagonal().all() and excluded[2, 3] and excluded[1, 4] and not excluded[0, 5]
    w, valid = negative_weights(sim, excluded)
    blip = F.softmax(sim, dim=1).masked_fill(excluded, 0)  # blip_retrieval.py's weights
    assert valid.all()
    assert torch.allclose(w, blip / blip.sum(1, keepdim=True), atol=1e-7)
    # draws come from the generator: same seed, same draws
    a = sample_hard_negatives(F.normalize(sim, dim=-1), F.normalize(sim.t(), dim=-1), torch.tensor(0.07),
                              image_ids, caption_ids, torch.Generator().manual_seed(5))
    b = sample_hard_negatives(F.normalize(sim, dim=-1), F.normalize(sim.t(), dim=-1), torch.tensor(0.07),
                              image_ids, caption_ids, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hard_negative_frequencies_follow_the_weights():
    sim = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    excluded = torch.tensor([[True, False, False, False]])
    w, _ = negative_weights(sim, excluded)
    counts = torch.bincount(torch.multinomial(w[0], 40000, replacement=True, generator=torch.Generator().manual_seed(0)), minlength=4)
    expected = torch.tensor([0.0, math.e**1, 1.0, math.e**-1])
    assert torch.allclose(counts / 40000, expected / expected.sum(), atol=0.01)


# ---------------------------------------------------------------- ITC


def test_itc_loss_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    b, world_b, q, e = 2, 4, 8, 5
    rnd = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    img, txt = rnd(b, e), rnd(b, e)
    img_m, txt_m = rnd(world_b, e), rnd(world_b, e)
    queue_i, queue_t = rnd(q, e).t(), rnd(q, e).t()
    offset, temp, alpha = 2, torch.tensor(0.05, dtype=torch.float64), 0.3
    keys_i = torch.cat([img_m.t(), queue_i], 1)
    keys_t = torch.cat([txt_m.t(), queue_t], 1)
    got = itc_loss(img, txt, img_m[offset : offset + b], txt_m[offset : offset + b], keys_i, keys_t, temp, alpha, offset)

    def direct(query, query_m, keys):
        total = 0.0
        for i in range(b):
            s = [float(query[i] @ keys[:, j]) / 0.05 for j in range(world_b + q)]
            s_m = [float(query_m[offset + i] @ keys[:, j]) / 0.05 for j in range(world_b + q)]
            z, z_m = sum(math.exp(x) for x in s), sum(math.exp(x) for x in s_m)
            for j in range(world_b + q):
                target = alpha * math.exp(s_m[j]) / z_m + (1 - alpha) * (j == offset + i)
                total -= target * (s[j] - math.log(z))
        return total / b

    want = (direct(img, img_m, keys_t) + direct(txt, txt_m, keys_i)) / 2
    assert abs(float(got) - want) < 1e-10


def test_forward_itc_uses_batch_momentum_features_then_the_queue_and_enqueues_after():
    model = tiny_blip()
    pre = BlipPretrainer(model, queue_size=12, lock_image=False).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        pre.image_queue.copy_(F.normalize(torch.randn(16, 12, generator=g), dim=0))
        pre.text_queue.copy_(F.normalize(torch.randn(16, 12, generator=g), dim=0))
        pre.queue_ptr.fill_(8)
        model.temp.fill_(0.9)  # clamped to 0.5 before the forward, as BLIP does
    queue_i, queue_t = pre.image_queue.clone(), pre.text_queue.clone()
    x = batch(4)
    out = pre(alpha=0.4, generator=torch.Generator().manual_seed(0), **x)
    assert float(model.temp.detach()) == 0.5
    with torch.no_grad():  # momentum == online weights at step 0 (up to the EMA's rounding)
        embeds = model.image_embeds(x["pixel_values"])
        img, txt = model.image_feat(embeds), model.text_feat(x["input_ids"], x["attention_mask"])
        img_m = pre.momentum.image_feat(pixel_values=x["pixel_values"])
        txt_m = pre.momentum.text_feat(x["input_ids"], x["attention_mask"])
    want = itc_loss(img, txt, img_m, txt_m, torch.cat([img_m.t(), queue_i], 1), torch.cat([txt_m.t(), queue_t], 1),
                    torch.tensor(0.5), 0.4)
    assert torch.allclose(out["itc"], want, atol=ATOL)
    # enqueued after the loss: columns 8..11 now hold this batch's momentum features, the rest untouched, ptr wrapped
    assert torch.allclose(pre.image_queue[:, 8:12], img_m.t(), atol=1e-6)
    assert torch.allclose(pre.text_queue[:, 8:12], txt_m.t(), atol=1e-6)
    assert torch.equal(pre.image_queue[:, :8], queue_i[:, :8]) and int(pre.queue_ptr) == 0


def test_alpha_ramp_is_blips():
    # pretrain.py: alpha * min(1, (epoch * len + i) / (2 * len))
    assert [alpha_at(0.4, e, i, 10, 2) for e, i in [(0, 0), (0, 5), (1, 0), (1, 5), (2, 0), (5, 3)]] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    # the fine-tuning scripts: alpha * min(1, i / len) in epoch 0, alpha after
    assert [alpha_at(0.4, e, i, 10, 1) for e, i in [(0, 0), (0, 5), (1, 0), (3, 9)]] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert alpha_at(0.4, 0, 0, 10, 0) == 0.4


# ---------------------------------------------------------------- momentum encoders


def test_momentum_encoder_starts_equal_and_follows_the_ema():
    model = tiny_blip()
    pre = BlipPretrainer(model, queue_size=8, momentum=0.9, lock_image=False)
    pairs = pre.momentum.pairs(model)
    assert [n for n, _, _ in pairs] == ["vision_model", "vision_proj", "text_encoder", "text_proj"]
    for _, online, shadow in pairs:
        for p, p_m in zip(online.parameters(), shadow.parameters(), strict=True):
            assert torch.equal(p, p_m) and not p_m.requires_grad
    x = batch(4)
    pre.eval()
    with torch.no_grad():  # same features at step 0: the momentum forward is the online one
        assert torch.equal(pre.momentum.text_feat(x["input_ids"], x["attention_mask"]),
                           model.text_feat(x["input_ids"], x["attention_mask"]))
        assert torch.equal(pre.momentum.image_feat(pixel_values=x["pixel_values"]),
                           model.image_feat(model.image_embeds(x["pixel_values"])))
    expected = [[p_m.detach().double().clone() for p_m in shadow.parameters()] for _, _, shadow in pairs]
    exact = [[p_m.detach().clone() for p_m in shadow.parameters()] for _, _, shadow in pairs]  # BLIP's float32 formula
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        online_now = [[p.detach().double().clone() for p in online.parameters()] for _, online, _ in pairs]
        exact = [[m * 0.9 + p.detach() * (1.0 - 0.9) for m, p in zip(ms, online.parameters())]
                 for ms, (_, online, _) in zip(exact, pairs)]
        ptr = int(pre.queue_ptr)
        out = pre(alpha=0.4, generator=torch.Generator().manual_seed(step), **x)
        expected = [[m * 0.9 + p * 0.1 for m, p in zip(ms, ps)] for ms, ps in zip(expected, online_now)]
        with torch.no_grad():  # the enqueued features are those of the *updated* momentum encoder
            assert torch.allclose(pre.text_queue[:, ptr : ptr + 4],
                                  pre.momentum.text_feat(x["input_ids"], x["attention_mask"]).t(), atol=1e-6)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    moved = 0.0
    for (_, online, shadow), want, bitwise in zip(pairs, expected, exact):
        for p, p_m, w, b in zip(online.parameters(), shadow.parameters(), want, bitwise):
            assert torch.equal(p_m, b) and torch.allclose(p_m.double(), w, atol=1e-6)
            moved = max(moved, float((p_m - p).abs().max()))
    assert moved > 1e-2  # the online weights moved away, so the EMA was really exercised


def test_locked_image_tower_has_no_momentum_copy():
    model = tiny_blip()
    model.vision_model.requires_grad_(False)
    pre = BlipPretrainer(model, queue_size=8, lock_image=True).eval()
    assert pre.momentum.vision_model is None
    assert [n for n, _, _ in pre.momentum.pairs(model)] == ["vision_proj", "text_encoder", "text_proj"]
    x = batch(4)
    with torch.no_grad():
        embeds = model.image_embeds(x.pop("pixel_values"))
    out = pre(alpha=0.4, generator=torch.Generator().manual_seed(0), image_embeds=embeds, **x)
    with torch.no_grad():
        assert torch.allclose(pre.image_queue[:, :4], pre.momentum.image_feat(image_embeds=embeds).t(), atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in model.vision_model.parameters())


# ---------------------------------------------------------------- ITM and LM


def test_itm_loss_is_cross_entropy_over_positives_and_both_negative_sets():
    model = tiny_blip().eval()
    x = batch(3)
    embeds = model.image_embeds(x["pixel_values"])
    ids, mask = x["input_ids"], x["attention_mask"]
    neg_text, neg_image = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    valid_text, valid_image = torch.tensor([True, False, True]), torch.tensor([True, True, True])
    loss, logits = itm_loss(model, embeds, ids, mask, embeds, ids, mask, neg_text, neg_image, valid_text, valid_image)
    with torch.no_grad():
        terms = []
        for i in range(3):  # (image i, text i) is a match
            terms.append(-F.log_softmax(model.itm_logits(embeds[i : i + 1], ids[i : i + 1], mask[i : i + 1]), 1)[0, 1])
        for i in range(3):  # (image i, its negative text) is not; row 1 has no admissible negative and counts 0
            j = int(neg_text[i])
            t = -F.log_softmax(model.itm_logits(embeds[i : i + 1], ids[j : j + 1], mask[j : j + 1]), 1)[0, 0]
            terms.append(t * float(valid_text[i]))
        for i in range(3):  # (negative image, text i) is not
            j = int(neg_image[i])
            terms.append(-F.log_softmax(model.itm_logits(embeds[j : j + 1], ids[i : i + 1], mask[i : i + 1]), 1)[0, 0])
    assert torch.allclose(loss, torch.stack(terms).sum() / 9, atol=ATOL)
    assert logits.shape == (9, 2)


def test_lm_loss_on_one_process_is_blips_token_mean():
    model = tiny_blip().eval()
    x = batch(4)
    embeds = model.image_embeds(x["pixel_values"])
    n_targets = int(x["attention_mask"][:, 1:].sum())
    got = lm_loss(model, embeds, x["input_ids"], x["attention_mask"], n_targets, 1, 0.1)
    want = model.lm_loss(embeds, x["input_ids"], x["attention_mask"], label_smoothing=0.1)
    assert torch.allclose(got, want, atol=ATOL)


def test_forward_lm_learns_the_separate_caption_and_itc_itm_keep_theirs():
    """`lm_input_ids` (describing captions) change only the LM term: ITC and ITM equal the plain step's,
    the LM term equals the global token mean over the separate captions."""
    x = batch(4)
    lm_ids, lm_mask = text_batch(4, length=7, seed=5)
    outs = []
    for extra in ({}, {"lm_input_ids": lm_ids, "lm_attention_mask": lm_mask}):
        pre = BlipPretrainer(tiny_blip(), queue_size=8, lock_image=False).eval()
        outs.append(pre(alpha=0.4, generator=torch.Generator().manual_seed(0), **x, **extra))
    plain, separate = outs
    for k in ("itc", "itm"):
        assert torch.equal(plain[k], separate[k]), k
    model = pre.blip
    with torch.no_grad():
        embeds = model.image_embeds(x["pixel_values"])
        want = model.lm_loss(embeds, lm_ids, lm_mask, label_smoothing=0.1)
    assert torch.allclose(separate["lm"], want, atol=ATOL)
    assert not torch.allclose(plain["lm"], separate["lm"], atol=1e-3)


def test_a_subset_of_objectives_is_those_terms_of_the_full_step_and_trains_nothing_else():
    """CapFilt's fine-tuning: the filter on itc + itm, the captioner on lm. Each subset's terms equal the full
    step's; a term not chosen is 0 and its head gets no gradient; LM alone leaves the queue alone."""
    x = batch(4)
    full = BlipPretrainer(tiny_blip(), queue_size=8, lock_image=False).eval()
    want = full(alpha=0.4, generator=torch.Generator().manual_seed(0), **x)
    for objectives in (("itc", "itm"), ("lm",), ("itm",)):
        pre = BlipPretrainer(tiny_blip(), queue_size=8, lock_image=False, objectives=objectives).eval()
        queue = pre.image_queue.clone()
        got = pre(alpha=0.4, generator=torch.Generator().manual_seed(0), **x)
        for term in ("itc", "itm", "lm"):
            assert torch.equal(got[term], want[term] if term in objectives else torch.zeros(())), (objectives, term)
        assert torch.allclose(got["loss"], sum(want[t] for t in objectives), atol=ATOL)
        got["loss"].backward()
        itm_head = pre.blip.itm_head.weight.grad
        assert (itm_head is not None) == ("itm" in objectives), objectives
        assert torch.equal(pre.image_queue, queue) == (objectives == ("lm",)), objectives
    with pytest.raises(ValueError, match="choose among"):
        BlipPretrainer(tiny_blip(), queue_size=8, objectives=("itc", "mlm"))


# ---------------------------------------------------------------- two gloo processes


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _two_steps(pre, x, world: int, rank: int):
    """Two forwards (the queue fills in between) with one backward each; losses, draws, grads, queue."""
    n = x["input_ids"].shape[0] // world
    mine = {k: v[rank * n : (rank + 1) * n] for k, v in x.items()}
    ddp = pre
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(pre, broadcast_buffers=False)
    out = {}
    for step in range(2):
        pre.blip.zero_grad(set_to_none=True)
        res = ddp(alpha=0.4, generator=torch.Generator().manual_seed(7 + step), **mine)
        res["loss"].backward()
        out[step] = {"losses": {k: res[k].detach() for k in ("itc", "itm", "lm")},
                     "neg_text": res["neg_text"], "neg_image": res["neg_image"], "grads": grads(pre.blip)}
    out["queue"] = (pre.image_queue.clone(), pre.text_queue.clone(), int(pre.queue_ptr))
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pre = BlipPretrainer(tiny_blip(), queue_size=16, lock_image=False)
    res = _two_steps(pre, batch(8), world, rank)
    for step in (0, 1):
        for k, v in res[step]["losses"].items():
            dist.all_reduce(v)
            res[step]["losses"][k] = v / world
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_union_batch():
    """ITC (global momentum keys, shared queue), ITM (negatives drawn over the gathered batch with one
    generator), LM (global token mean): losses, draws, DDP-averaged gradients and queues match."""
    import torch.multiprocessing as mp

    ref = _two_steps(BlipPretrainer(tiny_blip(), queue_size=16, lock_image=False), batch(8), 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    for step in (0, 1):
        want = ref[step]
        assert torch.equal(torch.cat([r[step]["neg_text"] for r in results]), want["neg_text"])
        assert torch.equal(torch.cat([r[step]["neg_image"] for r in results]), want["neg_image"])
        for res in results:
            for k, v in want["losses"].items():
                assert torch.allclose(res[step]["losses"][k], v, atol=ATOL), (step, k)
            assert res[step]["grads"].keys() == want["grads"].keys() and "temp" in want["grads"]
            for k, v in want["grads"].items():
                assert torch.allclose(res[step]["grads"][k], v, atol=ATOL), (step, k)
    for res in results:
        assert res["queue"][2] == ref["queue"][2] == 0
        assert torch.allclose(res["queue"][0], ref["queue"][0], atol=1e-6)
        assert torch.allclose(res["queue"][1], ref["queue"][1], atol=1e-6)

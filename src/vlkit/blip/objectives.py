"""BLIP's three pretraining objectives: ITC with momentum distillation, ITM with hard negatives, LM.

One step of `BlipPretrainer.forward` follows the original BLIP (salesforce/BLIP
models/blip_pretrain.py, with the hard-negative mining of blip_retrieval.py) in
its order:

1. clamp the temperature to [0.001, 0.5] under no_grad, before the forward (as BLIP);
2. online features: image tokens, `image_feat`, `text_feat` (unimodal text encoder);
3. momentum update (EMA 0.995) of the momentum encoders, then the momentum
   features, under no_grad;
4. ITC over [momentum features of the batch, queue] with soft targets
   alpha * softmax(sim_m) + (1 - alpha) * one-hot;
5. enqueue the momentum features (gathered from every rank), after the loss;
6. ITM: one hard negative text per image and one hard negative image per text,
   drawn from softmax(sim) with every pair of the same image or the same caption
   zeroed; positives + both negative sets through the image-grounded encoder;
7. LM: the image-grounded decoder's label-smoothed next-token loss.

Where vlkit departs from the original, on purpose, so that N processes compute
exactly what one process computes on the union batch:

- ITC keys hold the momentum features of the *global* batch (all ranks), then the
  queue; BLIP's pretraining uses only its own rank's current momentum features
  (the other ranks' arrive one step later through the queue). One process: identical.
- ITM negatives are drawn over the all-gathered batch from the online ITC
  similarities, as blip_retrieval.py with `negative_all_rank` does (its pretraining
  draws per rank against momentum image features, and zeroes only the diagonal
  after adding 1e-4). The draws come from a given `torch.Generator` that every rank
  holds in the same state, for the whole global batch, so the draws do not depend
  on the process count. The distribution is softmax over the unmasked pairs, which
  is BLIP's softmax-then-zero renormalised (multinomial normalises anyway) but
  cannot underflow into an all-zero row at a small temperature. A row with no
  admissible negative (every pair shares its image or caption) keeps its draw out
  of the loss: its ITM term counts 0 (the loss is still divided by 3B).
- LM is the mean over the target tokens of the global batch (one process: BLIP's
  token mean), so ranks holding more tokens weigh more, as one process would.

A locked image tower is its own EMA (its weights never move), so it gets no
momentum copy: its tokens serve both the online and the momentum features.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.pretrain.distributed import gather_no_grad, gather_with_grad

TEMP_MIN, TEMP_MAX = 0.001, 0.5


OBJECTIVES = ("itc", "itm", "lm")  # BLIP pretrains on all three; CapFilt fine-tunes its filter on itc+itm, its captioner on lm


def alpha_at(alpha: float, epoch: int, step: int, steps_per_epoch: int, ramp_epochs: float) -> float:
    """Distillation weight at (epoch, step): linear from 0 to `alpha` over `ramp_epochs` epochs.

    BLIP's pretrain.py: alpha * min(1, (epoch * len + i) / (2 * len)); its fine-tuning
    scripts ramp over epoch 0 only (ramp_epochs=1). 0 means no ramp.
    """
    if ramp_epochs <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch))


class MomentumEncoders(nn.Module):
    """EMA copies of the trainable towers and projections (BLIP's `*_m` modules), never trained by gradient.

    `vision=False` (a locked image tower) keeps no vision copy. The copy of the text
    encoder includes its cross-attention layers, unused in mode "text", as BLIP's
    `text_encoder_m` does.
    """

    NAMES = ("vision_model", "vision_proj", "text_encoder", "text_proj")

    def __init__(self, model: nn.Module, coefficient: float = 0.995, vision: bool = True):
        super().__init__()
        self.coefficient = float(coefficient)
        self.vision_model = copy.deepcopy(model.vision_model) if vision else None
        self.vision_proj = copy.deepcopy(model.vision_proj)
        self.text_encoder = copy.deepcopy(model.text_encoder)
        self.text_proj = copy.deepcopy(model.text_proj)
        self.requires_grad_(False)

    def pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
        return [(n, getattr(model, n), getattr(self, n)) for n in self.NAMES if getattr(self, n) is not None]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """p_m <- p_m * m + p * (1 - m), BLIP's `_momentum_update`, for every parameter pair."""
        m = self.coefficient
        for _, online, shadow in self.pairs(model):
            for p, p_m in zip(online.parameters(), shadow.parameters(), strict=True):
                p_m.copy_(p_m * m + p.detach() * (1.0 - m))

    def image_feat(self, image_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised momentum image feature; a locked tower's own tokens when there is no vision copy."""
        if self.vision_model is not None:
            image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0]), dim=-1)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    offset: int = 0,
) -> torch.Tensor:
    """ITC with momentum distillation for b local rows.

    `image_feat`/`text_feat` [b, E]: online features (with grad); `*_feat_m` [b, E]: the
    momentum features of the same rows; `image_keys`/`text_keys` [E, K]: momentum
    features of the global batch then the queue; row i's positive is column offset + i.
    Returns the mean over rows of (i2t + t2i) / 2 soft-target cross-entropies.
    """
    b = image_feat.shape[0]
    cols = torch.arange(b, device=image_feat.device) + offset
    with torch.no_grad():
        sim_i2t_m = image_feat_m @ text_keys / temp
        sim_t2i_m = text_feat_m @ image_keys / temp
        one_hot = torch.zeros_like(sim_i2t_m)
        one_hot[torch.arange(b), cols] = 1.0
        i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * one_hot
        t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * one_hot
    sim_i2t = image_feat @ text_keys / temp
    sim_t2i = text_feat @ image_keys / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def same_pair_mask(image_ids: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """[B, B] True where rows i and j share their image or their caption (never a negative)."""
    return (image_ids[:, None] == image_ids[None, :]) | (caption_ids[:, None] == caption_ids[None, :])


@torch.no_grad()
def negative_weights(sim: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [B, B], valid [B]): softmax of each row over its admissible columns.

    A row without an admissible column gets a one-hot weight on itself and valid False.
    """
    valid = ~excluded.all(dim=1)
    w = F.softmax(sim.float().masked_fill(excluded, float("-inf")), dim=1)
    eye = torch.eye(sim.shape[0], dtype=w.dtype, device=w.device)
    w = torch.where(valid[:, None], w, eye)
    return w, valid


@torch.no_grad()
def sample_hard_negatives(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    image_ids: torch.Tensor,
    caption_ids: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One hard negative per image and per text of the global batch.

    `image_feat`, `text_feat` [B, E]: online ITC features of the global batch;
    `image_ids`, `caption_ids` [B]: identities (equal id = same image / same caption).
    Returns `neg_image` (for each text, the row of its negative image), `neg_text`
    (for each image, the row of its negative text) and their `valid_*` flags.
    Draws: negative images first, then texts, as BLIP does.
    """
    sim_i2t = image_feat.float() @ text_feat.float().t() / temp.float()
    excluded = same_pair_mask(image_ids, caption_ids)
    w_t2i, valid_image = negative_weights(sim_i2t.t(), excluded.t())
    w_i2t, valid_text = negative_weights(sim_i2t, excluded)
    neg_image = torch.multinomial(w_t2i.cpu(), 1, generator=generator).squeeze(1).to(image_ids.device)
    neg_text = torch.multinomial(w_i2t.cpu(), 1, generator=generator).squeeze(1).to(image_ids.device)
    return {"neg_image": neg_image, "neg_text": neg_text, "valid_image": valid_image, "valid_text": valid_text}


def itm_loss(
    model: nn.Module,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_embeds_world: torch.Tensor,
    input_ids_world: torch.Tensor,
    attention_mask_world: torch.Tensor,
    neg_text: torch.Tensor,
    neg_image: torch.Tensor,
    valid_text: torch.Tensor,
    valid_image: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM over b positives, b (image, negative text) and b (negative image, text) pairs.

    `neg_*`/`valid_*` are this rank's b rows of the global draw, indexing the `*_world`
    tensors. Labels [1]*b + [0]*2b; cross-entropy summed over admissible pairs / 3b.
    Returns (loss, logits [3b, 2]).
    """
    b = input_ids.shape[0]
    ids = torch.cat([input_ids, input_ids_world[neg_text], input_ids])
    mask = torch.cat([attention_mask, attention_mask_world[neg_text], attention_mask])
    images = torch.cat([image_embeds, image_embeds, image_embeds_world[neg_image]])
    logits = model.itm_logits(images, ids, mask)
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(logits.device)
    weight = torch.cat([torch.ones(b, dtype=torch.bool, device=logits.device), valid_text, valid_image]).float()
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce * weight).sum() / (3 * b), logits


def lm_loss(
    model: nn.Module,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets_global: int,
    world_size: int = 1,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """This rank's share of the global-batch LM token mean, scaled by `world_size` so
    that DDP's gradient averaging yields the gradient of the global mean."""
    per_seq = model.lm_loss(image_embeds, input_ids, attention_mask, label_smoothing=label_smoothing, reduction="none")
    return per_seq.sum() * world_size / max(1, targets_global)


def lm_targets(attention_mask: torch.Tensor) -> int:
    """Target tokens of right-padded texts: every real token after the first ([DEC])."""
    return int(attention_mask[:, 1:].sum())


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BlipPretrainer(nn.Module):
    """A `BlipModel` with its momentum encoders and feature queues; `forward` is one BLIP step's losses.

    Under DDP wrap this module (every rank passes its slice of the global batch; the
    objectives gather what they need). Queues live as buffers in BLIP's layout
    [embed_dim, queue_size], initialised to normalised Gaussian columns from `seed`
    (the same on every rank), with `queue_ptr`.
    """

    def __init__(self, blip: nn.Module, queue_size: int, momentum: float = 0.995, lock_image: bool = False,
                 label_smoothing: float = 0.1, seed: int = 0, objectives: Sequence[str] = OBJECTIVES):
        super().__init__()
        unknown = sorted(set(objectives) - set(OBJECTIVES))
        if unknown or not objectives:
            raise ValueError(f"objectives {list(objectives)}: choose among {list(OBJECTIVES)}")
        self.objectives = tuple(o for o in OBJECTIVES if o in objectives)
        self.blip = blip
        self.momentum = MomentumEncoders(blip, momentum, vision=not lock_image)
        self.lock_image = lock_image
        self.label_smoothing = label_smoothing
        self.queue_size = int(queue_size)
        embed_dim = blip.text_proj.out_features
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, self.queue_size, generator=g), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, self.queue_size, generator=g), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def clamp_temp_(self) -> None:
        self.blip.temp.clamp_(TEMP_MIN, TEMP_MAX)

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Write the global batch's momentum features at the pointer (BLIP's `_dequeue_and_enqueue`)."""
        n = image_feat_m.shape[0]
        if self.queue_size % n:
            raise ValueError(f"queue size {self.queue_size} is not a multiple of the global batch {n}")
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr : ptr + n] = image_feat_m.t()
        self.text_queue[:, ptr : ptr + n] = text_feat_m.t()
        self.queue_ptr[0] = (ptr + n) % self.queue_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        caption_ids: torch.Tensor,
        alpha: float,
        generator: torch.Generator,
        image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        lm_input_ids: torch.Tensor | None = None,
        lm_attention_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Losses of one step for this rank's rows (precomputed `image_embeds` of a locked
        tower, or `pixel_values`). `input_ids` must have the same length on every rank.
        The decoder learns `lm_input_ids` when given (another caption of the same rows),
        else `input_ids` as in BLIP.

        Returns the losses (`loss` = the sum of the chosen objectives' terms, each this rank's
        share, whose mean over ranks is the global value; a term not chosen is 0 and not
        computed) and the drawn negatives of this rank's rows (`neg_text`, `neg_image`: rows of
        the global batch; None without ITM). ITM's hard negatives need ITC's similarities, so
        ITM alone still runs the ITC features, momentum encoders and queue, without ITC's loss.
        """
        rank, world = _world()
        blip = self.blip
        self.clamp_temp_()
        if image_embeds is None:
            image_embeds = blip.image_embeds(pixel_values)
        zero = image_embeds.new_zeros((), dtype=torch.float32)
        out: dict[str, Any] = {"itc": zero, "itm": zero, "lm": zero, "neg_text": None, "neg_image": None}
        if "itc" in self.objectives or "itm" in self.objectives:
            out.update(self._contrastive(input_ids, attention_mask, image_ids, caption_ids, alpha, generator, image_embeds,
                                         pixel_values, rank, world))
        if "lm" in self.objectives:
            if lm_input_ids is None:
                lm_input_ids, lm_attention_mask = input_ids, attention_mask
            out["lm"] = lm_loss(blip, image_embeds, lm_input_ids, lm_attention_mask,
                                lm_targets(gather_no_grad(lm_attention_mask)), world, self.label_smoothing)
        out["loss"] = sum((out[o] for o in self.objectives), zero)
        return out

    def _contrastive(self, input_ids, attention_mask, image_ids, caption_ids, alpha: float, generator: torch.Generator,
                     image_embeds, pixel_values, rank: int, world: int) -> dict[str, Any]:
        """ITC on momentum features and queues (its loss kept when chosen), then ITM on hard negatives (when chosen)."""
        blip = self.blip
        image_feat = blip.image_feat(image_embeds)
        text_feat = blip.text_feat(input_ids, attention_mask)
        temp = blip.temp

        with torch.no_grad():
            self.momentum.update(blip)
            image_feat_m = self.momentum.image_feat(image_embeds=image_embeds, pixel_values=pixel_values)
            text_feat_m = self.momentum.text_feat(input_ids, attention_mask)
            image_m_world = gather_no_grad(image_feat_m)
            text_m_world = gather_no_grad(text_feat_m)
            image_keys = torch.cat([image_m_world.t(), self.image_queue.clone()], dim=1)
            text_keys = torch.cat([text_m_world.t(), self.text_queue.clone()], dim=1)
        b = input_ids.shape[0]
        out: dict[str, Any] = {}
        if "itc" in self.objectives:
            out["itc"] = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_keys, text_keys, temp, alpha, rank * b)
        self.enqueue(image_m_world, text_m_world)
        if "itm" not in self.objectives:
            return out

        with torch.no_grad():
            neg = sample_hard_negatives(
                gather_no_grad(image_feat.detach()), gather_no_grad(text_feat.detach()), temp.detach(),
                gather_no_grad(image_ids), gather_no_grad(caption_ids), generator,
            )
            mine = slice(rank * b, (rank + 1) * b)
            neg = {k: v[mine] for k, v in neg.items()}
            ids_world, mask_world = gather_no_grad(input_ids), gather_no_grad(attention_mask)
        embeds_world = gather_with_grad(image_embeds) if image_embeds.requires_grad else gather_no_grad(image_embeds)
        out["itm"], _ = itm_loss(
            blip, image_embeds, input_ids, attention_mask, embeds_world, ids_world, mask_world,
            neg["neg_text"], neg["neg_image"], neg["valid_text"], neg["valid_image"],
        )
        return {**out, "neg_text": neg["neg_text"], "neg_image": neg["neg_image"]}

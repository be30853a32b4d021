"""ITM re-ranking, exactly as BLIP evaluates retrieval (`train_retrieval.py: evaluation`).

For every query, the ITC cosine similarities pick the top `k` candidates; the
image-grounded encoder (ITM head, `[ENC]` first) re-scores each of those pairs,
and the final score of a candidate is

    score = itm_logits[:, 1] + itc_cosine

the raw match logit (not its softmax probability) plus the raw cosine (not
divided by the temperature), as BLIP's `score_matrix[i, topk_idx] = score + topk_sim`.
BLIP sets every other candidate to -100, a tie among all of them; vlkit keeps
them in their ITC order below every re-scored candidate, so recall@K for K <= k
is BLIP's exactly and mean/median rank stay meaningful. BLIP's `k_test` is 256
on COCO and 128 on Flickr30k; vlkit's default is 128.

Both directions: text -> image re-scores a text against its k nearest images,
image -> text an image against its k nearest texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.blip.model import BlipModel
    from vlkit.models.base import TextBatch

DEFAULT_RERANK_K = 128
RERANK_CHOICES = ("none", "itm")

# (query row, candidate columns [k]) -> ITM match logits [k] of those pairs
ItmFn = Callable[[int, torch.Tensor], torch.Tensor]


def check_rerank(rerank: str, k: int) -> None:
    """Validate --rerank / --rerank-k before anything is loaded."""
    if rerank not in RERANK_CHOICES:
        raise VlkitError(f"--rerank {rerank}: unknown; use {' or '.join(RERANK_CHOICES)}")
    if k < 1:
        raise VlkitError(f"--rerank-k {k}: must be at least 1 (BLIP re-ranks the top 128 or 256)")


def top_candidates(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest ITC scores of one row and their columns; ties go to the lower column (a stable order)."""
    order = torch.sort(sims, descending=True, stable=True).indices[:k]
    return sims[order], order


def rerank_scores(itc: torch.Tensor, k: int, itm: ItmFn) -> torch.Tensor:
    """[Q, N] ITC cosines -> [Q, N] scores: top-k by ITC get ITM logit[:, 1] + cosine, the rest stay below in ITC order."""
    if itc.ndim != 2:
        raise ValueError(f"itc must be [queries, candidates], got {tuple(itc.shape)}")
    k = min(int(k), itc.shape[1])
    out = torch.empty_like(itc)
    for q in range(itc.shape[0]):
        sims = itc[q]
        topk_sim, topk_idx = top_candidates(sims, k)
        score = itm(q, topk_idx).to(itc.dtype) + topk_sim
        # every candidate outside the top k: below the lowest re-scored one, keeping its ITC order
        row = sims - sims.max() - 1.0 + score.min()
        row[topk_idx] = score
        out[q] = row
    return out


@torch.no_grad()
def itm_logits_batched(
    blip: "BlipModel",
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """[B, 2] ITM logits (column 1 = match) of B image-text pairs, in chunks of `batch_size` pairs, on CPU."""
    device = next(blip.parameters()).device
    out = []
    for start in range(0, image_embeds.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        out.append(blip.itm_logits(image_embeds[sl].to(device), input_ids[sl].to(device), attention_mask[sl].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 2)


def itm_match_logits(blip: "BlipModel", image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[B] the "match" logit (column 1), the ITM term of BLIP's re-ranking score."""
    return itm_logits_batched(blip, image_embeds, input_ids, attention_mask, batch_size)[:, 1]


def rerank_text_to_image(
    blip: "BlipModel",
    itc_t2i: torch.Tensor,
    image_embeds: torch.Tensor,
    texts: "TextBatch",
    k: int = DEFAULT_RERANK_K,
    batch_size: int = 64,
) -> torch.Tensor:
    """[T, I] re-ranked scores: each text against its k nearest images (image tokens [I, 1+N, Dv])."""

    def itm(q: int, cands: torch.Tensor) -> torch.Tensor:
        n = cands.shape[0]
        ids = texts.input_ids[q : q + 1].expand(n, -1)
        mask = texts.attention_mask[q : q + 1].expand(n, -1)
        return itm_match_logits(blip, image_embeds[cands], ids, mask, batch_size)

    return rerank_scores(itc_t2i, k, itm)


def rerank_image_to_text(
    blip: "BlipModel",
    itc_i2t: torch.Tensor,
    image_embeds: torch.Tensor,
    texts: "TextBatch",
    k: int = DEFAULT_RERANK_K,
    batch_size: int = 64,
) -> torch.Tensor:
    """[I, T] re-ranked scores: each image against its k nearest texts."""

    def itm(q: int, cands: torch.Tensor) -> torch.Tensor:
        n = cands.shape[0]
        embeds = image_embeds[q : q + 1].expand(n, -1, -1)
        return itm_match_logits(blip, embeds, texts.input_ids[cands], texts.attention_mask[cands], batch_size)

    return rerank_scores(itc_i2t, k, itm)

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

    from vlkit.blip.rerank import evaluate_retrieval_rerank, rerank_search
    from vlkit.retrieval import Searcher, read_source
    evaluate_retrieval_rerank("path/to/blip", read_source("captions.jsonl"), k=128).to_dict()
    hits, skipped = rerank_search(Searcher.open("my-index"), text="a dog on a beach", k=10)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.blip.checkpoint import LoadedBlip
    from vlkit.blip.model import BlipModel
    from vlkit.models.base import TextBatch
    from vlkit.retrieval.collection import Source
    from vlkit.retrieval.search import Hit, Searcher

DEFAULT_RERANK_K = 128
RERANK_CHOICES = ("none", "itm")

# itm(queries, candidates): ITM match logits of the pairs (queries[i], candidates[i]), two equal-length index tensors
ItmFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_rerank(rerank: str, k: int) -> None:
    """Validate --rerank / --rerank-k before anything is loaded."""
    if rerank not in RERANK_CHOICES:
        raise VlkitError(f"--rerank {rerank}: unknown; use {' or '.join(RERANK_CHOICES)}")
    if k < 1:
        raise VlkitError(f"--rerank-k {k}: must be at least 1 (BLIP re-ranks the top 128 or 256)")


def check_rerank_direction(text_query: bool, target: str) -> None:
    """ITM scores image-text pairs: it re-ranks text -> images and image -> captions only."""
    if (text_query and target != "images") or (not text_query and target != "captions"):
        raise VlkitError(
            f"--rerank itm: scores image-text pairs, so it re-ranks text -> images and image -> captions, not "
            f"{'text' if text_query else 'image'} -> {target}; drop --rerank or change --target"
        )


def top_candidates(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest ITC scores of one row and their columns; ties go to the lower column (a stable order)."""
    order = torch.sort(sims, descending=True, stable=True).indices[:k]
    return sims[order], order


def rerank_scores(
    itc: torch.Tensor, k: int, itm: ItmFn, advance: Callable[[int], None] | None = None, pairs_per_call: int = 256
) -> torch.Tensor:
    """[Q, N] ITC cosines -> [Q, N] scores: top-k by ITC get ITM logit[:, 1] + cosine, the rest stay below in ITC order.

    `itm` scores the top-k pairs of several queries at once (about `pairs_per_call` pairs a call),
    so a small k still fills the encoder's batches.
    """
    if itc.ndim != 2:
        raise ValueError(f"itc must be [queries, candidates], got {tuple(itc.shape)}")
    k = min(int(k), itc.shape[1])
    step = max(1, int(pairs_per_call) // max(k, 1))
    out = torch.empty_like(itc)
    for start in range(0, itc.shape[0], step):
        queries = list(range(start, min(itc.shape[0], start + step)))
        tops = [top_candidates(itc[q], k) for q in queries]
        q_idx = torch.tensor(queries, dtype=torch.long).repeat_interleave(k)
        logits = itm(q_idx, torch.cat([idx for _, idx in tops])).to(itc.dtype).view(len(queries), k)
        for j, q in enumerate(queries):
            sims = itc[q]
            topk_sim, topk_idx = tops[j]
            score = logits[j] + topk_sim
            # every candidate outside the top k: below the lowest re-scored one, keeping its ITC order
            row = sims - sims.max() - 1.0 + score.min()
            row[topk_idx] = score
            out[q] = row
        if advance is not None:
            advance(len(queries))
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
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[T, I] re-ranked scores: each text against its k nearest images (image tokens [I, 1+N, Dv])."""

    def itm(queries: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        return itm_match_logits(blip, image_embeds[cands], texts.input_ids[queries], texts.attention_mask[queries], batch_size)

    return rerank_scores(itc_t2i, k, itm, advance)


def rerank_image_to_text(
    blip: "BlipModel",
    itc_i2t: torch.Tensor,
    image_embeds: torch.Tensor,
    texts: "TextBatch",
    k: int = DEFAULT_RERANK_K,
    batch_size: int = 64,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[I, T] re-ranked scores: each image against its k nearest texts."""

    def itm(queries: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        return itm_match_logits(blip, image_embeds[queries], texts.input_ids[cands], texts.attention_mask[cands], batch_size)

    return rerank_scores(itc_i2t, k, itm, advance)


# ---------------------------------------------------------------- `vlkit eval retrieval --rerank itm`


@dataclass
class RerankEval:
    """recall@K both ways by ITC alone and by ITC + ITM re-ranking, on the same images and texts."""

    itc: dict[str, dict[str, float]]
    itm: dict[str, dict[str, float]]
    images: int
    texts: int
    without_caption: int
    k: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_to_image": self.itm["text_to_image"],
            "image_to_text": self.itm["image_to_text"],
            "itc": self.itc,
            "itc_itm": self.itm,
            "rerank": {"method": "itm", "k": self.k, "score": "itm_logit[:, 1] + itc_cosine on the ITC top k (BLIP)"},
            "images": self.images,
            "texts": self.texts,
            "images_without_caption": self.without_caption,
            "skipped": [list(s) for s in self.skipped],
            "seconds": self.seconds,
        }


@torch.no_grad()
def evaluate_retrieval_rerank(
    loaded: "LoadedBlip | str",
    source: "Source",
    *,
    k: int = DEFAULT_RERANK_K,
    batch_size: int = 32,
    ks: tuple[int, ...] = (1, 5, 10),
    progress: bool = False,
    image_embeds: torch.Tensor | None = None,
) -> RerankEval:
    """Retrieval on a caption table as BLIP evaluates it: ITC ranks, then ITM re-ranks the top k.

    Queries and relevance are those of `vlkit.retrieval.evaluate` (each distinct caption one
    text query, true for every image carrying it). Texts are fed as in BLIP's evaluation
    (`pre_caption`, 30 words, 35 tokens). The image tokens of every image are kept in memory
    ([images, 1+N, width] floats: about 100 KB an image for the shipped model); a caller that
    already has them (one tower pass shared by several evaluations) passes `image_embeds`,
    one row per captioned item of `source` in order, and no image is read.
    """
    from vlkit.blip.captioning import pixel_batches, progress_bar
    from vlkit.blip.match import blip_texts
    from vlkit.retrieval.metrics import ranks_from_scores, summarize_ranks

    check_rerank("itm", k)
    if isinstance(loaded, str):
        from vlkit.blip.checkpoint import load_blip

        loaded = load_blip(loaded)
    start = time.perf_counter()
    blip = loaded.model
    blip._need_encoder("ITM re-ranking")
    device = next(blip.parameters()).device
    items = [it for it in source.items if it.captions]
    if not items:
        raise VlkitError(f"{source.description['source']}: no captions found; pass --caption-field or --caption-template")
    skipped: list[tuple[str, str]] = []
    if image_embeds is not None:
        if len(image_embeds) != len(items):
            raise ValueError(f"image_embeds: {len(image_embeds)} rows for {len(items)} captioned images")
        ok = list(range(len(items)))
    else:
        embeds, ok = [], []
        for batch in pixel_batches([str(it.path) for it in items], loaded.preprocess, batch_size, skipped):
            embeds.append(blip.image_embeds(batch.pixels.to(device)).cpu())
            ok.extend(batch.index)
        if not ok:
            raise VlkitError(f"{source.description['source']}: none of its {len(items)} captioned images could be read")
        image_embeds = torch.cat(embeds)
    image_feats = torch.cat([blip.image_feat(image_embeds[s : s + batch_size].to(device)).cpu() for s in range(0, len(ok), batch_size)])
    text_to_images: dict[str, list[int]] = {}
    for img, i in enumerate(ok):
        for caption in items[i].captions:
            text_to_images.setdefault(caption, []).append(img)
    texts = list(text_to_images)
    tokens = blip_texts(loaded.tokenizer, texts)
    text_feats = torch.cat(
        [blip.text_feat(tokens.input_ids[s : s + batch_size].to(device), tokens.attention_mask[s : s + batch_size].to(device)).cpu() for s in range(0, len(texts), batch_size)]
    )
    itc = text_feats.float() @ image_feats.float().T  # [T, I]
    relevant_t2i = list(text_to_images.values())
    relevant_i2t: list[list[int]] = [[] for _ in ok]
    for t, imgs in enumerate(relevant_t2i):
        for img in imgs:
            relevant_i2t[img].append(t)
    with progress_bar(progress, len(texts) + len(ok), "ITM re-ranking") as advance:
        t2i = rerank_text_to_image(blip, itc, image_embeds, tokens, k, batch_size, advance)
        i2t = rerank_image_to_text(blip, itc.T.contiguous(), image_embeds, tokens, k, batch_size, advance)

    def metrics(s_t2i: torch.Tensor, s_i2t: torch.Tensor) -> dict[str, dict[str, float]]:
        return {
            "text_to_image": summarize_ranks(ranks_from_scores(s_t2i.numpy(), relevant_t2i), ks),
            "image_to_text": summarize_ranks(ranks_from_scores(s_i2t.numpy(), relevant_i2t), ks),
        }

    return RerankEval(
        itc=metrics(itc, itc.T),
        itm=metrics(t2i, i2t),
        images=len(ok),
        texts=len(texts),
        without_caption=len(source.items) - len(items),
        k=min(k, len(ok)),
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )



# ---------------------------------------------------------------- `vlkit search --rerank itm`


def blip_of(model: Any, spec: str) -> "BlipModel":
    """The BlipModel behind a loaded VLModel, with the ITM head re-ranking needs; else a one-line error."""
    blip = getattr(model, "blip", None)
    if blip is None:
        raise VlkitError(f"model {spec}: is not a BLIP model, so it has no ITM head for --rerank itm; use an index built with a BLIP retrieval model")
    blip._need_encoder("ITM re-ranking")
    return blip


@torch.no_grad()
def rerank_search(
    searcher: "Searcher",
    *,
    text: str | None = None,
    image: str | os.PathLike | None = None,
    k: int = 10,
    target: str = "images",
    rerank_k: int = DEFAULT_RERANK_K,
    batch_size: int = 32,
) -> tuple[list["Hit"], list[tuple[str, str]]]:
    """Search as BLIP retrieves: the index's ITC top `rerank_k`, re-scored by ITM logit[:, 1] + cosine, best `k` kept.

    Text -> images re-scores the query against each candidate image (read again from
    the index's image root; one that can no longer be read is dropped and returned in
    the skipped list); image -> captions the query image against each candidate caption.
    Each hit keeps its ITC cosine and ITM logit in `metadata`.
    """
    from vlkit.blip.captioning import pixel_batches
    from vlkit.blip.match import blip_texts
    from vlkit.retrieval.search import Hit

    check_rerank("itm", rerank_k)
    if (text is None) == (image is None):
        raise VlkitError("--rerank itm: give exactly one of --text or --image")
    check_rerank_direction(text is not None, target)
    if k < 1:
        raise VlkitError(f"k={k}: must be at least 1")
    model = searcher.model
    blip = blip_of(model, model.spec)
    tokenizer, preprocess = model.tokenizer, model.preprocess
    device = next(blip.parameters()).device
    skipped: list[tuple[str, str]] = []
    if text is not None:
        hits = searcher.search_text(text, max(k, rerank_k), "images")[:rerank_k]
        paths = [str(searcher.index.image_root / h.metadata["path"]) for h in hits]
        embeds, keep = [], []
        for batch in pixel_batches(paths, preprocess, batch_size, skipped):
            embeds.append(blip.image_embeds(batch.pixels.to(device)))
            keep.extend(batch.index)
        hits = [hits[i] for i in keep]
        if not hits:
            return [], skipped
        image_embeds = torch.cat(embeds)
        query = blip_texts(tokenizer, [text])
        n = len(hits)
        itm = itm_match_logits(blip, image_embeds, query.input_ids.expand(n, -1), query.attention_mask.expand(n, -1), batch_size)
    else:
        hits = searcher.search_image(image, max(k, rerank_k), "captions")[:rerank_k]  # type: ignore[arg-type]
        if not hits:
            return [], skipped
        batches = list(pixel_batches([os.fspath(image)], preprocess, 1, skipped))  # type: ignore[arg-type]
        if not batches:
            raise VlkitError(f"{image}: {skipped[0][1]}; give a readable image file")
        query_embeds = blip.image_embeds(batches[0].pixels.to(device))
        captions = blip_texts(tokenizer, [h.metadata["text"] for h in hits])
        n = len(hits)
        itm = itm_match_logits(blip, query_embeds.expand(n, -1, -1), captions.input_ids, captions.attention_mask, batch_size)
    cos = torch.tensor([h.score for h in hits])
    final = itm + cos
    order = torch.sort(final, descending=True, stable=True).indices[:k].tolist()
    out = [
        Hit(rank, hits[j].id, float(final[j]), hits[j].kind, {**hits[j].metadata, "itc_cosine": float(cos[j]), "itm_logit": float(itm[j])})
        for rank, j in enumerate(order, start=1)
    ]
    return out, skipped

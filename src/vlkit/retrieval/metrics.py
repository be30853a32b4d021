"""Retrieval metrics in the CLIP paper's convention.

A query's rank is the position of its *best-placed* true match (so an image with
five captions is a hit at K when any of them is in the top K). Ties with a wrong
candidate count against the query: a model that scores everything equally gets
the worst rank, never a lucky one.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def ranks_from_scores(scores: np.ndarray, relevant: Sequence[Iterable[int]], chunk: int = 1024) -> np.ndarray:
    """1-based rank of the best true match for each query row of `scores` [Q, N].

    rank = 1 + number of non-relevant candidates scoring >= the best relevant one.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"scores {scores.shape} and {len(relevant)} relevance sets disagree")
    out = np.empty(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], chunk):
        block = scores[start : start + chunk]
        mask = np.zeros(block.shape, dtype=bool)
        for i, rel in enumerate(relevant[start : start + chunk]):
            rel = list(rel)
            if not rel:
                raise ValueError(f"query {start + i} has no true match")
            mask[i, rel] = True
        best = np.where(mask, block, -np.inf).max(axis=1, keepdims=True)
        out[start : start + chunk] = 1 + ((block >= best) & ~mask).sum(axis=1)
    return out


def summarize_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """recall@K (fraction of queries with rank <= K, in percent), mean and median rank."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float(100.0 * (ranks <= k).mean()) for k in ks}
    out["mean_rank"] = float(ranks.mean())
    out["median_rank"] = float(np.median(ranks))
    out["queries"] = int(ranks.size)
    return out


def retrieval_metrics(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_to_images: Sequence[Iterable[int]],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, dict[str, float]]:
    """recall@K, mean and median rank for text->image and image->text.

    `text_to_images[t]` lists the images text `t` truly describes; image->text uses
    the inverse relation (an image's true texts are all captions that name it).
    Features are L2-normalised, so the dot product is the cosine similarity.
    """
    text_to_images = [sorted(set(r)) for r in text_to_images]
    image_to_texts: list[list[int]] = [[] for _ in range(image_features.shape[0])]
    for t, imgs in enumerate(text_to_images):
        for i in imgs:
            image_to_texts[i].append(t)
    missing = [i for i, r in enumerate(image_to_texts) if not r]
    if missing:
        raise ValueError(f"{len(missing)} images have no caption (first: {missing[0]})")
    sim = np.asarray(text_features, dtype=np.float32) @ np.asarray(image_features, dtype=np.float32).T
    return {
        "text_to_image": summarize_ranks(ranks_from_scores(sim, text_to_images), ks),
        "image_to_text": summarize_ranks(ranks_from_scores(sim.T, image_to_texts), ks),
    }

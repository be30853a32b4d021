"""`vlkit eval retrieval`: recall@K both ways on a caption table, with one model.

Every distinct caption is one text query; its true images are all images that carry
it (identical captions are merged, so a query is never punished for finding the
other image with the same words). Each image's true texts are all its captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vlkit.errors import VlkitError
from vlkit.retrieval.collection import Source
from vlkit.retrieval.index import ImageEmbedder, embed_images_local
from vlkit.retrieval.metrics import DEFAULT_KS, retrieval_metrics

if TYPE_CHECKING:
    from vlkit.models.base import VLModel


@dataclass
class RetrievalEval:
    """Metrics per direction plus what was evaluated and what was left out."""

    metrics: dict[str, dict[str, float]]
    images: int
    texts: int
    without_caption: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def evaluate_retrieval(
    model: "VLModel",
    source: Source,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    embedder: ImageEmbedder | None = None,
) -> RetrievalEval:
    """Embed the source's captioned images and captions with `model` and score retrieval."""
    items = [it for it in source.items if it.captions]
    without = len(source.items) - len(items)
    if not items:
        raise VlkitError(f"{source.description['source']}: no captions found; pass --caption-field or --caption-template")
    feats, ok, skipped = (embedder or embed_images_local)(model, [str(it.path) for it in items])
    by_path = {str(it.path): it for it in items}
    texts: dict[str, list[int]] = {}
    for img, p in enumerate(ok):
        for caption in by_path[p].captions:
            texts.setdefault(caption, []).append(img)
    if not texts:
        raise VlkitError(f"{source.description['source']}: none of its {len(items)} captioned images could be read")
    text_feats = model.embed_texts(list(texts)).detach().float().cpu().numpy()
    metrics = retrieval_metrics(np.asarray(feats), text_feats, list(texts.values()), ks)
    return RetrievalEval(metrics, images=len(ok), texts=len(texts), without_caption=without, skipped=[*source.skipped, *skipped])


def as_dict(result: RetrievalEval) -> dict[str, Any]:
    return {
        "text_to_image": result.metrics["text_to_image"],
        "image_to_text": result.metrics["image_to_text"],
        "images": result.images,
        "texts": result.texts,
        "images_without_caption": result.without_caption,
        "skipped": [list(s) for s in result.skipped],
    }

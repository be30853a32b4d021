"""Search an index in every direction: text or image query, image or caption targets.

text -> images, image -> images, image -> captions and text -> captions all reduce
to one step: embed the query with the index's own model, then ask the target
collection's faiss index for the nearest vectors by inner product (= cosine, the
features are normalised).
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from vlkit.errors import VlkitError
from vlkit.retrieval.index import RetrievalIndex, check_model, embed_images_local

if TYPE_CHECKING:
    from vlkit.models.base import VLModel

TARGETS = ("images", "captions")


@dataclass
class Hit:
    """One result: its rank (1-based), id, cosine score, kind and metadata.

    Image hits carry the image path (relative to the index's image root) and its row
    metadata; caption hits carry the caption text and the id of the image it describes.
    """

    rank: int
    id: str
    score: float
    kind: str
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Searcher:
    """An index plus the model that built it: the Python API behind `vlkit search` and `vlkit serve`."""

    def __init__(self, index: RetrievalIndex, model: "VLModel"):
        check_model(index.manifest, model, index.dir)
        self.index = index
        self.model = model
        self._lock = threading.Lock()  # one model call at a time when served from threads

    @classmethod
    def open(cls, index_dir: str | os.PathLike, model: "VLModel | str | None" = None) -> "Searcher":
        """Open `index_dir` with `model` (a loaded VLModel, a spec, or None for the index's own spec)."""
        index = RetrievalIndex(index_dir)
        if model is None or isinstance(model, str):
            from vlkit.models import load_model

            model = load_model(model or index.model_spec)
        model.eval()
        return cls(index, model)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return self.model.embed_texts(list(texts)).detach().float().cpu().numpy()

    def embed_image(self, path: str | os.PathLike) -> np.ndarray:
        """[1, D] feature of one image file; a file that cannot be read is a VlkitError naming it."""
        with self._lock:
            feats, ok, skipped = embed_images_local(self.model, [str(Path(path))])
        if not ok:
            reason = skipped[0][1] if skipped else "could not be embedded"
            raise VlkitError(f"{path}: {reason}; give a readable image file")
        return feats

    def _hit(self, target: str, row: int, rank: int, score: float) -> Hit:
        rec = self.index.collection(target).items[row]
        if target == "images":
            meta = {"path": rec["path"], **rec["meta"]}
            if rec["id"] in self.index.captions_by_image:
                meta["captions"] = self.index.captions_by_image[rec["id"]]
            return Hit(rank, rec["id"], score, "image", meta)
        image = self.index.images_by_id.get(rec["image_id"], {})
        return Hit(rank, rec["id"], score, "caption", {"text": rec["text"], "image_id": rec["image_id"], "path": image.get("path")})

    def search_vectors(self, queries: np.ndarray, k: int = 10, target: str = "images") -> list[list[Hit]]:
        """Top-`k` hits in `target` for each query vector (rows of `queries`)."""
        if target not in TARGETS:
            raise VlkitError(f"target '{target}': unknown; use one of {', '.join(TARGETS)}")
        if k < 1:
            raise VlkitError(f"k={k}: must be at least 1")
        scores, ids = self.index.collection(target).search(queries, k)
        return [
            [self._hit(target, int(i), rank, float(s)) for rank, (s, i) in enumerate(zip(srow, irow), start=1) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    def search_text(self, text: str, k: int = 10, target: str = "images") -> list[Hit]:
        """Text -> images (target='images') or text -> captions (target='captions')."""
        if not text.strip():
            raise VlkitError("query text: empty; give some words to search for")
        return self.search_vectors(self.embed_texts([text]), k, target)[0]

    def search_image(self, path: str | os.PathLike, k: int = 10, target: str = "images") -> list[Hit]:
        """Image -> images (target='images') or image -> captions (target='captions')."""
        return self.search_vectors(self.embed_image(path), k, target)[0]

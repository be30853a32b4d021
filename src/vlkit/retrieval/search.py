"""Search an index in every direction: text or image query, image or caption targets.

text -> images, image -> images, image -> captions and text -> captions all reduce
to one step: embed the query with the index's own model, then ask the target
collection's faiss index for the nearest vectors by inner product (= cosine, the
features are normalised). Queries are embedded in the precision the index was
built in unless told otherwise (`vlkit.precision`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from vlkit.data.images import DEFAULT_MAX_PIXELS
from vlkit.errors import VlkitError
from vlkit.retrieval.index import RetrievalIndex, check_model, embed_texts

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
    """An index plus the model that built it: the Python API behind `vlkit search` and `vlkit serve`.

    `precision` None embeds queries in the index's own precision (what its vectors
    were made in). Another one is allowed: the model and so the embedding space are
    the same, only the rounding of the query differs; `precision_note` says so.
    """

    def __init__(self, index: RetrievalIndex, model: "VLModel", precision: str | None = None):
        from vlkit import precision as precisions

        check_model(index.manifest, model, index.dir)
        self.index = index
        self.model = model
        self.precision = precisions.check(precision or index.precision, "precision")
        self._lock = threading.Lock()  # one model call at a time when served from threads

    @property
    def precision_note(self) -> str | None:
        """One line when queries are embedded in another precision than the index's vectors, else None."""
        if self.precision == self.index.precision:
            return None
        return (f"note: {self.index.dir} holds {self.index.precision} vectors; queries are embedded in {self.precision} "
                "(same model, scores differ only by rounding)")

    @classmethod
    def open(cls, index_dir: str | os.PathLike, model: "VLModel | str | None" = None, precision: str | None = None) -> "Searcher":
        """Open `index_dir` with `model` (a loaded VLModel, a spec, or None for the index's own spec)."""
        index = RetrievalIndex(index_dir)
        if model is None or isinstance(model, str):
            from vlkit.models import load_model

            model = load_model(model or index.model_spec)
        model.eval()
        return cls(index, model, precision)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return embed_texts(self.model, list(texts), self.precision)

    def embed_image(
        self, image: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None, formats: Sequence[str] | None = None
    ) -> np.ndarray:
        """[1, D] feature of one image file (or the bytes of an upload).

        Decoded by `vlkit.data.images.load_image` like every indexed image, outside the
        model lock, so a slow or hostile file never holds up other queries; a file that
        cannot be read raises `BadImage` (a VlkitError) naming it and why.
        """
        from vlkit.features import encode_pixels, load_pixels

        pixels = load_pixels(self.model, image if isinstance(image, (bytes, bytearray)) else Path(image), max_pixels, name, formats)
        with self._lock:
            return encode_pixels(self.model, [pixels], precision=self.precision).numpy()

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
        collection = self.index.collection(target)
        scores, ids = collection.search(queries, min(k, len(collection.items)))
        return [
            [self._hit(target, int(i), rank, float(s)) for rank, (s, i) in enumerate(zip(srow, irow), start=1) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    def search_text(self, text: str, k: int = 10, target: str = "images") -> list[Hit]:
        """Text -> images (target='images') or text -> captions (target='captions')."""
        if not text.strip():
            raise VlkitError("query text: empty; give some words to search for")
        return self.search_vectors(self.embed_texts([text]), k, target)[0]

    def search_image(
        self,
        image: str | os.PathLike | bytes,
        k: int = 10,
        target: str = "images",
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str | None = None,
        formats: Sequence[str] | None = None,
    ) -> list[Hit]:
        """Image -> images (target='images') or image -> captions (target='captions'); `image` is a path or bytes."""
        self.index.collection(target)  # an unknown or absent target fails before the image is decoded
        return self.search_vectors(self.embed_image(image, max_pixels, name, formats), k, target)[0]

    def size(self, target: str) -> int:
        """How many vectors `target` holds (0 when the index has none)."""
        return len(self.index.collections[target].items) if target in self.index.collections else 0

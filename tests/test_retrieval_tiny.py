"""Every search direction with the embedded vlkit-tiny on the bundled emoji sample.

The gallery is the sample's 448 google-style emoji, captioned with their labels;
queries are the 448 labels ("an emoji of {label}.") and every third openmoji
drawing (150 images of other emoji styles, not in the index). A hit is an item of
the same emoji label in the top 5; chance is 5 in 448 (1.1%). The bars sit well
below what vlkit-tiny scored when these tests were written (text->image 0.78,
image->image 0.67, image->text 0.56, text->text 1.00 on all 448 probes) and far
above chance, so a retrained model must still be a working retriever to pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vlkit
from vlkit.errors import VlkitError
from vlkit.retrieval.collection import Source, read_source
from vlkit.retrieval.index import build_index, embed_images_local
from vlkit.retrieval.search import Searcher

SAMPLE = Path(vlkit.__file__).parent / "assets" / "sample" / "built" / "emoji" / "metadata.jsonl"
K = 5


@pytest.fixture(scope="module")
def tiny():
    from vlkit.models import load_model

    try:
        return load_model("vlkit-tiny").eval()
    except VlkitError as e:
        pytest.skip(f"vlkit-tiny is not in this installation yet: {e}")


@pytest.fixture(scope="module")
def sample(tiny, tmp_path_factory):
    if not SAMPLE.is_file():
        pytest.skip(f"bundled sample missing: {SAMPLE}")
    source = read_source(SAMPLE, caption_template="{label}")
    gallery = [it for it in source.items if it.meta["style"] == "google"]
    probes = [it for it in source.items if it.meta["style"] == "openmoji"][::3]
    out = tmp_path_factory.mktemp("tiny") / "index"
    build_index(out, tiny, Source(gallery, source.root, source.description), progress=False)
    feats, ok, _ = embed_images_local(tiny, [str(it.path) for it in probes])
    assert len(ok) == len(probes)
    labels = sorted({it.meta["label"] for it in gallery})
    searcher = Searcher.open(out, tiny)
    label_queries = searcher.embed_texts([f"an emoji of {lab}." for lab in labels])
    return searcher, feats, [it.meta["label"] for it in probes], labels, label_queries


def _hit_rate(searcher: Searcher, queries: np.ndarray, labels: list[str], target: str) -> float:
    hits = searcher.search_vectors(queries, K, target)
    if target == "images":
        found = [any(h.metadata["label"] == lab for h in row) for row, lab in zip(hits, labels)]
    else:
        found = [any(h.metadata["text"] == lab for h in row) for row, lab in zip(hits, labels)]
    return float(np.mean(found))


def test_text_to_image(sample):
    searcher, _, _, labels, label_queries = sample
    rate = _hit_rate(searcher, label_queries, labels, "images")
    assert rate >= 0.6, f"text->image top-{K} hit rate {rate:.2f}"
    hits = searcher.search_text("an emoji of red heart.", k=K)
    assert any(h.metadata["label"] == "red heart" for h in hits), [h.metadata["label"] for h in hits]


def test_image_to_image_across_styles(sample):
    searcher, feats, probe_labels, _, _ = sample
    rate = _hit_rate(searcher, feats, probe_labels, "images")
    assert rate >= 0.45, f"image->image top-{K} hit rate {rate:.2f}"


def test_image_to_text(sample):
    searcher, feats, probe_labels, _, _ = sample
    rate = _hit_rate(searcher, feats, probe_labels, "captions")
    assert rate >= 0.35, f"image->text top-{K} hit rate {rate:.2f}"


def test_text_to_text(sample):
    searcher, _, _, labels, label_queries = sample
    rate = _hit_rate(searcher, label_queries, labels, "captions")
    assert rate >= 0.95, f"text->text top-{K} hit rate {rate:.2f}"

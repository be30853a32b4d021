"""Every search direction with the embedded vlkit-tiny on the bundled emoji sample.

The gallery is the sample's twitter and google emoji (896 images, captioned with
their labels); queries are labels ("an emoji of {label}.") and the openmoji
drawings of the same emoji, which are not in the index. A hit is an item of the
same emoji label in the top 5. Chance is about 5 in 448 (1%).
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
    gallery = [it for it in source.items if it.meta["style"] in ("twitter", "google")]
    probes = [it for it in source.items if it.meta["style"] == "openmoji"]
    out = tmp_path_factory.mktemp("tiny") / "index"
    build_index(out, tiny, Source(gallery, source.root, source.description), progress=False)
    return Searcher.open(out, tiny), probes


def _hit_rate(searcher: Searcher, queries: np.ndarray, labels: list[str], target: str) -> float:
    hits = searcher.search_vectors(queries, K, target)
    if target == "images":
        found = [any(h.metadata["label"] == lab for h in row) for row, lab in zip(hits, labels)]
    else:
        found = [any(h.metadata["text"] == lab for h in row) for row, lab in zip(hits, labels)]
    return float(np.mean(found))


def test_text_to_image(sample):
    searcher, probes = sample
    labels = sorted({it.meta["label"] for it in probes})
    rate = _hit_rate(searcher, searcher.embed_texts([f"an emoji of {lab}." for lab in labels]), labels, "images")
    assert rate >= 0.5, f"text->image top-{K} hit rate {rate:.2f}"
    hits = searcher.search_text("an emoji of red heart.", k=K)
    assert any(h.metadata["label"] == "red heart" for h in hits), [h.metadata["label"] for h in hits]


def test_image_to_image_across_styles(sample):
    searcher, probes = sample
    feats, ok, _ = embed_images_local(searcher.model, [str(it.path) for it in probes])
    labels = [it.meta["label"] for it in probes]
    assert len(ok) == len(probes)
    rate = _hit_rate(searcher, feats, labels, "images")
    assert rate >= 0.3, f"image->image top-{K} hit rate {rate:.2f}"


def test_image_to_text(sample):
    searcher, probes = sample
    feats, _, _ = embed_images_local(searcher.model, [str(it.path) for it in probes])
    rate = _hit_rate(searcher, feats, [it.meta["label"] for it in probes], "captions")
    assert rate >= 0.3, f"image->text top-{K} hit rate {rate:.2f}"


def test_text_to_text(sample):
    searcher, probes = sample
    labels = sorted({it.meta["label"] for it in probes})
    rate = _hit_rate(searcher, searcher.embed_texts([f"an emoji of {lab}." for lab in labels]), labels, "captions")
    assert rate >= 0.8, f"text->text top-{K} hit rate {rate:.2f}"

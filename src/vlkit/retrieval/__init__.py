"""Retrieval in every direction over a faiss index built with one model.

    from vlkit.retrieval import Searcher, build_index, read_source
    build_index("my-index", model, read_source("photos/"))
    hits = Searcher.open("my-index").search_text("a dog on a beach", k=10)
    [(h.id, h.score, h.metadata) for h in hits]

`collection` reads folders and caption tables, `index` stores embeddings and faiss
indexes on disk, `search` queries them, `metrics`/`evaluate` compute recall@K,
`server` serves a page and JSON API, `embed_ray` embeds on Ray Data.
"""

from vlkit.retrieval.collection import Source, SourceItem, read_source
from vlkit.retrieval.evaluate import RetrievalEval, evaluate_retrieval
from vlkit.retrieval.index import RetrievalIndex, add_images, build_index, choose_index_spec
from vlkit.retrieval.metrics import ranks_from_scores, retrieval_metrics
from vlkit.retrieval.search import Hit, Searcher

__all__ = [
    "Hit",
    "RetrievalEval",
    "RetrievalIndex",
    "Searcher",
    "Source",
    "SourceItem",
    "add_images",
    "build_index",
    "choose_index_spec",
    "evaluate_retrieval",
    "ranks_from_scores",
    "read_source",
    "retrieval_metrics",
]

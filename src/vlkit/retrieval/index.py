"""A retrieval index on disk: embeddings, metadata, the model fingerprint, faiss indexes.

Layout of an index folder::

    index.json                 manifest: model (spec, fingerprint, dim, precision), image root,
                               sources, faiss type + parameters per collection, counts
    shards/000000.safetensors  image and caption embeddings of one chunk of work
    shards/000000.json         that chunk's image/caption metadata and skipped images
    images.faiss, captions.faiss
    skipped.json               every image that could not be read, with the reason

Work is written chunk by chunk (tensors first, then the shard's JSON, each file
atomically), so an interrupted build loses at most the chunk in flight and a rerun
embeds only what no committed shard holds. Nothing is created before every input
has been checked: a build that fails validation, or whose images are all
unreadable, leaves no folder behind. Images outside the image root (the server
serves files only from there) are skipped and listed, like unreadable ones. Row *i* of a faiss index is row *i* of
the shards concatenated in order. Small collections get an exact inner-product
index; above `EXACT_MAX` vectors an IVF-PQ index (with exact re-ranking of its
candidates) whose parameters are recorded in the manifest.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from vlkit import io
from vlkit.errors import VlkitError
from vlkit.retrieval.collection import Source, SourceItem

if TYPE_CHECKING:
    import faiss

    from vlkit.models.base import VLModel

FORMAT = "vlkit-retrieval-index"
VERSION = 1
EXACT_MAX = 100_000
COLLECTIONS = ("images", "captions")
INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
MANIFEST = "index.json"

# (model, absolute image paths) -> (features [N_ok, D] float32, ok paths in input order, [(path, reason)])
ImageEmbedder = Callable[["VLModel", list[str]], tuple[np.ndarray, list[str], list[tuple[str, str]]]]


def embed_images_local(
    model: "VLModel", paths: list[str], batch_size: int = 64, precision: str = "fp32"
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """The single-process image path: vlkit's feature extractor, uncached (the shards are the cache)."""
    from vlkit.features import extract_image_features

    res = extract_image_features(model, paths, batch_size=batch_size, cache=False, progress=False, precision=precision)
    feats = res.features.detach().float().cpu().numpy().reshape(len(res.paths), int(model.embed_dim))
    return feats, [str(p) for p in res.paths], [(str(p), str(r)) for p, r in res.skipped]


# ---------------------------------------------------------------- faiss index choice


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of `dim` that is at most dim/4: about 4 dimensions per PQ code byte."""
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def choose_index_spec(n: int, dim: int, kind: str = "auto", exact_max: int = EXACT_MAX) -> dict[str, Any]:
    """The faiss index (type and every parameter) for `n` vectors of width `dim`.

    Exact search is affordable and best below `exact_max`; above, IVF-PQ keeps memory
    per vector small and scans only `nprobe` of `nlist` lists, and its top
    `k * k_factor` candidates are re-scored exactly (RFlat) to win back recall.
    """
    if kind not in INDEX_TYPES:
        raise VlkitError(f"index type '{kind}': unknown; use one of {', '.join(INDEX_TYPES)}")
    if kind == "auto":
        kind = "flat" if n < exact_max else "ivfpq"
    if kind == "flat":
        return {"type": "flat", "factory": "Flat", "metric": "inner_product"}
    if kind == "hnsw":
        return {"type": "hnsw", "factory": "HNSW32,Flat", "metric": "inner_product", "M": 32, "efConstruction": 80, "efSearch": 128}
    # IVF-PQ: ~sqrt(n) lists (a power of two), trained on at most 64 points per list.
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    nlist = int(min(65536, max(1, min(nlist, n // 39 or 1))))
    pq_m = _pq_subquantizers(dim)
    pq_bits = 8 if n >= 256 * 39 else max(1, int(math.log2(max(2, n // 39))))
    train_size = int(min(n, max(64 * nlist, 256 * 39)))
    return {
        "type": "ivfpq",
        "factory": f"IVF{nlist},PQ{pq_m}x{pq_bits},RFlat",
        "metric": "inner_product",
        "nlist": nlist,
        "pq_m": pq_m,
        "pq_bits": pq_bits,
        "nprobe": min(nlist, 32),
        "k_factor": 16,  # bench/retrieval_ann.py, 1M x 256: recall@10 0.84 at 4, 0.99 at 16, same latency
        "train_size": train_size,
        "train_seed": 0,
    }


def apply_search_params(index: "faiss.Index", spec: dict[str, Any]) -> None:
    """Search-time knobs (nprobe, k_factor, efSearch) are not all stored by faiss: set them from the spec."""
    import faiss

    if spec["type"] == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = spec["efSearch"]
    elif spec["type"] == "ivfpq":
        faiss.downcast_index(index).k_factor = spec["k_factor"]
        faiss.extract_index_ivf(index).nprobe = spec["nprobe"]


def build_faiss(vectors: np.ndarray, spec: dict[str, Any]) -> "faiss.Index":
    """Train (on a seeded sample) and fill a faiss inner-product index as `spec` says."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index = faiss.index_factory(dim, spec["factory"], faiss.METRIC_INNER_PRODUCT)
    if spec["type"] == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = spec["efConstruction"]
    if spec["type"] == "ivfpq":
        # polysemous codes only speed up Hamming-filtered search, which vlkit does not use;
        # training them costs minutes even on small samples
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    if not index.is_trained:
        rng = np.random.default_rng(spec.get("train_seed", 0))
        take = np.sort(rng.choice(n, size=min(n, spec["train_size"]), replace=False))
        index.train(vectors[take])
    index.add(vectors)
    apply_search_params(index, spec)
    return index


def write_faiss(index: "faiss.Index", path: Path) -> None:
    import faiss

    with io.atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss(path: Path, spec: dict[str, Any]) -> "faiss.Index":
    """Read a faiss file; a missing or damaged one is a VlkitError with the way to rebuild it."""
    import faiss

    index_dir = path.parent
    fix = f"rerun `vlkit index add {index_dir} --images <the same images>` to rebuild it from the stored embeddings"
    if not path.is_file():
        raise VlkitError(f"{path}: missing; {fix}")
    try:
        index = faiss.read_index(str(path))
    except Exception as e:  # faiss raises RuntimeError with a C++ backtrace in its message
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VlkitError(f"{path}: not a readable faiss index ({first[:100]}); {fix}") from None
    apply_search_params(index, spec)
    return index


# ---------------------------------------------------------------- on-disk state


@dataclass
class Shard:
    number: int
    images: list[dict[str, Any]]
    captions: list[dict[str, Any]]
    skipped: list[list[str]]


def _shard_dir(index_dir: Path) -> Path:
    return index_dir / "shards"


def list_shards(index_dir: Path) -> list[Shard]:
    """Committed shards (those whose JSON exists), in order."""
    out = []
    for meta in sorted(_shard_dir(index_dir).glob("[0-9]" * 6 + ".json")):
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            out.append(Shard(int(meta.stem), data["images"], data["captions"], data["skipped"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise VlkitError(
                f"{meta}: damaged shard record; delete it and its .safetensors, then rerun the same "
                "`vlkit index build`/`index add` to embed those images again"
            ) from None
    return out


def _write_shard(index_dir: Path, number: int, image_emb: np.ndarray, caption_emb: np.ndarray, meta: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    base = _shard_dir(index_dir) / f"{number:06d}"
    with io.atomic_path(base.with_suffix(".safetensors")) as tmp:
        save_file({"images": np.ascontiguousarray(image_emb, np.float32), "captions": np.ascontiguousarray(caption_emb, np.float32)}, str(tmp))
    io.write_json(base.with_suffix(".json"), meta)  # last: this file commits the shard


def load_embeddings(index_dir: Path, collection: str, dim: int) -> np.ndarray:
    """All committed embeddings of one collection, in faiss row order."""
    from safetensors.numpy import load_file

    parts = []
    for s in list_shards(index_dir):
        path = _shard_dir(index_dir) / f"{s.number:06d}.safetensors"
        try:
            parts.append(load_file(str(path))[collection])
        except Exception:
            raise VlkitError(
                f"{path}: missing or damaged embeddings; delete it and {path.with_suffix('.json').name}, then rerun the same "
                "`vlkit index build`/`index add` to embed those images again"
            ) from None
    parts = [p for p in parts if p.size]
    return np.concatenate(parts) if parts else np.empty((0, dim), np.float32)


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise VlkitError(f"{index_dir}: not a vlkit index (no {MANIFEST}); build one with `vlkit index build`")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise VlkitError(f"{path}: damaged ({e}); rebuild the index with `vlkit index build`") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("version") != VERSION:
        raise VlkitError(f"{index_dir}: {MANIFEST} is not a version-{VERSION} vlkit index; rebuild it with this vlkit")
    return man


def index_precision(man: dict[str, Any]) -> str:
    """The precision the index's vectors were made in; indexes from before precision modes are fp32."""
    return str(man["model"].get("precision", "fp32"))


def check_precision(man: dict[str, Any], precision: str | None, index_dir: str | Path) -> str:
    """The precision to add vectors in: the index's own when `precision` is None; another is refused,
    so one index never mixes vectors made in different precisions."""
    from vlkit import precision as precisions

    built = index_precision(man)
    if precision is None:
        return built
    precisions.check(precision)
    if precision != built:
        raise VlkitError(
            f"{index_dir}: its vectors were made with --precision {built}; adding {precision} vectors would mix "
            f"precisions in one index; use --precision {built} or build a separate index"
        )
    return precision


def embed_texts(model: "VLModel", texts: list[str], precision: str = "fp32") -> np.ndarray:
    """[N, D] float32 text features under `precision` (captions here, queries in `vlkit.retrieval.search`)."""
    import torch

    from vlkit import precision as precisions

    runner = precisions.prepare(model, precision, "text")
    with torch.inference_mode(), precisions.autocast(precision, model.device):
        return runner.embed_texts(texts).detach().float().cpu().numpy()


def check_model(man: dict[str, Any], model: "VLModel", index_dir: str | Path) -> None:
    """Refuse to mix embedding spaces: the query/added model must be the one that built the index."""
    want, got = man["model"]["fingerprint"], model.fingerprint()
    if want != got:
        raise VlkitError(
            f"{index_dir}: built with model '{man['model']['spec']}' (fingerprint {want}), not '{model.spec}' "
            f"(fingerprint {got}); use --model {man['model']['spec']} or build a separate index"
        )


def create_index(
    out: str | Path,
    model: "VLModel",
    image_root: str | Path,
    *,
    index_type: str = "auto",
    exact_max: int = EXACT_MAX,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Start an empty index folder (manifest only, marked incomplete); the manifest records the
    precision its vectors are made in, which `index add` keeps and `vlkit search` defaults to."""
    from vlkit import precision as precisions

    precisions.check(precision)
    if index_type not in INDEX_TYPES:
        raise VlkitError(f"index type '{index_type}': unknown; use one of {', '.join(INDEX_TYPES)}")
    out = Path(out)
    check_new_index_dir(out)
    man = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"spec": model.spec, "fingerprint": model.fingerprint(), "embed_dim": int(model.embed_dim), "precision": precision},
        "image_root": str(Path(image_root).resolve()),
        "index_type": index_type,
        "exact_max": exact_max,
        "sources": [],
        "collections": {name: {"count": 0, "faiss": None} for name in COLLECTIONS},
        "skipped": 0,
        "complete": False,
    }
    io.write_json(out / MANIFEST, man)
    return man


@dataclass
class AddReport:
    """What one build/add did: counts, skipped images, the chosen index types."""

    embedded: int = 0
    already_done: int = 0
    captions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    collections: dict[str, Any] = field(default_factory=dict)


def check_new_index_dir(out: Path) -> None:
    """`out` may become a new index: absent, an empty folder, or an unfinished one that committed nothing."""
    if out.exists() and not out.is_dir():
        raise VlkitError(f"{out}: is an existing file; pick a new --out folder")
    if out.is_dir() and any(p.name not in (MANIFEST, "shards") for p in out.iterdir()):
        raise VlkitError(f"{out}: exists and is not empty; pick a new --out or remove the folder")
    if (out / "shards").is_dir() and any((out / "shards").iterdir()):
        raise VlkitError(f"{out}: holds shards of another build; pick a new --out or remove the folder")


def plan(
    source: Source, root: Path, done: set[str] = frozenset()  # type: ignore[assignment]
) -> tuple[list[tuple[str, "SourceItem"]], list[tuple[str, str]], int]:
    """What an add would embed: (path under root, item) pairs not in `done`, the items
    skipped because they lie outside `root` (links followed), and the count already done.

    The image root is where `vlkit serve` serves files from, so an index holds only
    files under it; the rest are skipped and listed like unreadable images.
    """
    pending: list[tuple[str, SourceItem]] = []
    outside: list[tuple[str, str]] = []
    seen: set[str] = set()
    already = 0
    for item in source.items:
        if not item.path.is_relative_to(root):
            listed = item.listed or str(item.path)
            via_link = item.listed is not None and Path(item.listed).absolute() != item.path
            why = (f"symlink to {item.path}, outside the image root {root}" if via_link
                   else f"outside the image root {root} (pass --image-root to a folder holding every image)")
            outside.append((listed, why))
            continue
        rel = item.path.relative_to(root).as_posix()
        if rel in done or rel in seen:
            already += 1
            continue
        seen.add(rel)
        pending.append((rel, item))
    return pending, outside, already


def _no_images_error(source: Source, skipped: list[tuple[str, str]], total: int) -> VlkitError:
    first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    return VlkitError(f"{source.description['source']}: none of its {total} images can be indexed{first}; nothing was written")


def add_images(
    index_dir: str | Path,
    model: "VLModel",
    source: Source,
    *,
    chunk_size: int = 512,
    embedder: ImageEmbedder | None = None,
    progress: bool = True,
    precision: str | None = None,
) -> AddReport:
    """Embed the source's images (and captions) that the index does not hold yet, then refresh faiss.

    Resumable: only images absent from every committed shard (indexed or skipped) are embedded.
    Paths the source skipped and images outside the image root are listed in the report and in
    skipped.json. `precision` None means the index's own; another one is refused. A given
    `embedder` must embed in that precision (the CLI builds it so).
    """
    if chunk_size < 1:
        raise VlkitError(f"chunk size {chunk_size}: must be at least 1")
    index_dir = Path(index_dir)
    man = read_manifest(index_dir)
    check_model(man, model, index_dir)
    precision = check_precision(man, precision, index_dir)
    if embedder is None:
        from functools import partial

        embedder = partial(embed_images_local, precision=precision)
    root = Path(man["image_root"])
    shards = list_shards(index_dir)
    done = {rec["path"] for s in shards for rec in s.images} | {p for s in shards for p, _ in s.skipped}
    pending, outside, already = plan(source, root, done)  # every input is checked before the index is touched
    report = AddReport(already_done=already)
    new_skips = [[p, why] for p, why in (*source.skipped, *outside) if p not in done]
    if not pending and not already and new_skips:
        raise _no_images_error(source, [tuple(x) for x in new_skips], len(new_skips))
    if source.description not in man["sources"]:
        man["sources"].append(source.description)
    man["complete"] = False
    io.write_json(index_dir / MANIFEST, man)

    next_number = shards[-1].number + 1 if shards else 0
    if new_skips and not pending:  # nothing to embed, but the skips are still recorded
        dim = man["model"]["embed_dim"]
        empty = np.empty((0, dim), np.float32)
        _write_shard(index_dir, next_number, empty, empty, {"images": [], "captions": [], "skipped": new_skips})
        report.skipped.extend((p, why) for p, why in new_skips)
        new_skips = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("embedding images", total=len(pending))
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start : start + chunk_size]
            by_abs = {str(item.path): (rel, item) for rel, item in chunk}
            feats, ok, skipped = embedder(model, list(by_abs))
            if feats.shape[0] != len(ok):
                raise RuntimeError(f"embedder returned {feats.shape[0]} features for {len(ok)} images")
            images, captions, texts = [], [], []
            for p in ok:
                rel, item = by_abs[p]
                cap_ids = [f"{rel}#{j}" for j in range(len(item.captions))]
                images.append({"id": rel, "path": rel, "meta": item.meta, "captions": cap_ids})
                for cid, text in zip(cap_ids, item.captions):
                    captions.append({"id": cid, "image_id": rel, "text": text})
                    texts.append(text)
            cap_emb = embed_texts(model, texts, precision) if texts else np.empty((0, man["model"]["embed_dim"]), np.float32)
            skipped_rel = [[by_abs[p][0], reason] for p, reason in skipped] + new_skips
            new_skips = []
            _write_shard(index_dir, next_number, feats, cap_emb, {"images": images, "captions": captions, "skipped": skipped_rel})
            next_number += 1
            report.embedded += len(ok)
            report.captions += len(captions)
            report.skipped.extend((r, why) for r, why in skipped_rel)
            bar.advance(task, len(chunk))
    report.collections = finalize(index_dir)
    return report


def finalize(index_dir: str | Path) -> dict[str, Any]:
    """Bring the faiss indexes in line with the committed shards and mark the index complete.

    An approximate index of the same type is extended (its training is kept); an exact
    one, or one whose size now calls for another type, is rebuilt.
    """
    index_dir = Path(index_dir)
    man = read_manifest(index_dir)
    dim = man["model"]["embed_dim"]
    for name in COLLECTIONS:
        emb = load_embeddings(index_dir, name, dim)
        path = index_dir / f"{name}.faiss"
        current = man["collections"][name].get("faiss")
        if emb.shape[0] == 0:
            path.unlink(missing_ok=True)
            man["collections"][name] = {"count": 0, "faiss": None}
            continue
        want = choose_index_spec(emb.shape[0], dim, man["index_type"], man["exact_max"])
        index = None
        if current and path.is_file() and current["type"] == want["type"] != "flat":
            try:
                index = read_faiss(path, current)
            except VlkitError:  # damaged: rebuilt from the shards below
                index = None
            if index is not None and index.ntotal > emb.shape[0]:
                index = None  # more vectors than the shards: not ours to extend
        if index is not None:
            index.add(np.ascontiguousarray(emb[index.ntotal :]))
            spec = current
        else:
            index, spec = build_faiss(emb, want), want
        write_faiss(index, path)
        man["collections"][name] = {"count": int(emb.shape[0]), "faiss": spec}
    skipped = [s for shard in list_shards(index_dir) for s in shard.skipped]
    io.write_json(index_dir / "skipped.json", skipped)
    man["skipped"] = len(skipped)
    man["complete"] = True
    io.write_json(index_dir / MANIFEST, man)
    return man["collections"]


def build_index(
    out: str | Path,
    model: "VLModel",
    source: Source,
    *,
    image_root: str | Path | None = None,
    index_type: str = "auto",
    exact_max: int = EXACT_MAX,
    chunk_size: int = 512,
    embedder: ImageEmbedder | None = None,
    progress: bool = True,
    precision: str = "fp32",
) -> AddReport:
    """Build a new index, or resume one whose earlier build was interrupted.

    Everything is checked before the folder is created; when no image of the source
    can be read, the folder this call created is removed again and a VlkitError says so.
    `precision` ("fp32", "bf16", "int8") is recorded in the manifest; a resumed build
    must use the one it started with.
    """
    out = Path(out)
    if preflight_build(out, source, image_root=image_root, index_type=index_type, chunk_size=chunk_size, precision=precision):
        check_model(read_manifest(out), model, out)
        return add_images(out, model, source, chunk_size=chunk_size, embedder=embedder, progress=progress, precision=precision)
    root = Path(image_root or source.root).resolve()
    existed = out.exists()
    create_index(out, model, root, index_type=index_type, exact_max=exact_max, precision=precision)
    try:
        report = add_images(out, model, source, chunk_size=chunk_size, embedder=embedder, progress=progress, precision=precision)
    except VlkitError:
        if not list_shards(out):  # committed work is kept for a resume; an empty start is not
            _remove_new(out, existed)
        raise
    if report.embedded == 0:
        _remove_new(out, existed)
        raise _no_images_error(source, report.skipped, len(source.items) + len(source.skipped))
    return report


def preflight_build(
    out: str | Path,
    source: Source,
    *,
    image_root: str | Path | None = None,
    index_type: str = "auto",
    chunk_size: int = 512,
    precision: str = "fp32",
) -> bool:
    """Every check of `build_index` that needs no model (the CLI runs it before loading one).

    True when `out` holds an interrupted build to resume (in the same precision); False
    for a new build, after checking that `out` can hold one and that some image of the
    source lies under the image root.
    """
    from vlkit import precision as precisions

    out = Path(out)
    if chunk_size < 1:
        raise VlkitError(f"chunk size {chunk_size}: must be at least 1")
    if index_type not in INDEX_TYPES:
        raise VlkitError(f"index type '{index_type}': unknown; use one of {', '.join(INDEX_TYPES)}")
    precisions.check(precision)
    if out.is_dir() and (out / MANIFEST).is_file() and list_shards(out):
        man = read_manifest(out)
        if man["complete"]:
            raise VlkitError(f"{out}: an index already exists there; add to it with `vlkit index add {out} --images ...` or pick another --out")
        check_precision(man, precision, out)
        return True
    # a new build (or a folder left by a build that committed nothing, which starts over)
    check_new_index_dir(out)
    if image_root is not None and not Path(image_root).is_dir():
        raise VlkitError(f"--image-root {image_root}: is not a folder")
    pending, outside, _ = plan(source, Path(image_root or source.root).resolve())
    if not pending:
        raise _no_images_error(source, [*source.skipped, *outside], len(source.items) + len(source.skipped))
    return False


def _remove_new(out: Path, existed: bool) -> None:
    """Remove what a failed new build wrote: the folder itself, or its contents when it existed (empty) before."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / "shards", ignore_errors=True)
    for name in ("images.faiss", "captions.faiss", "skipped.json"):
        (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- reading for search


@dataclass
class Collection:
    """One searchable collection: its items (faiss row order) and its faiss index."""

    name: str
    items: list[dict[str, Any]]
    index: "faiss.Index"
    spec: dict[str, Any]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` scores and row ids per query; fewer than `k` rows come back as id -1."""
        k = max(1, min(k, len(self.items)))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class RetrievalIndex:
    """A complete index opened for search: manifest, image root and the collections it has."""

    def __init__(self, index_dir: str | Path):
        self.dir = Path(index_dir)
        self.manifest = read_manifest(self.dir)
        if not self.manifest["complete"]:
            raise VlkitError(f"{self.dir}: its build was interrupted; rerun the same `vlkit index build` (or `index add`) command to finish it")
        self.image_root = Path(self.manifest["image_root"])
        shards = list_shards(self.dir)
        items = {"images": [r for s in shards for r in s.images], "captions": [r for s in shards for r in s.captions]}
        self.collections: dict[str, Collection] = {}
        for name in COLLECTIONS:
            info = self.manifest["collections"][name]
            if info["count"]:
                index = read_faiss(self.dir / f"{name}.faiss", info["faiss"])
                dim = self.manifest["model"]["embed_dim"]
                if index.ntotal != len(items[name]) or info["count"] != len(items[name]) or index.d != dim:
                    raise VlkitError(
                        f"{self.dir}: {name}.faiss and the shards disagree; rerun "
                        f"`vlkit index add {self.dir} --images <the same images>` to rebuild it from the stored embeddings"
                    )
                self.collections[name] = Collection(name, items[name], index, info["faiss"])
        self.images_by_id = {r["id"]: r for r in items["images"]}
        self.captions_by_image: dict[str, list[str]] = {}
        for r in items["captions"]:
            self.captions_by_image.setdefault(r["image_id"], []).append(r["text"])

    @property
    def model_spec(self) -> str:
        return self.manifest["model"]["spec"]

    @property
    def precision(self) -> str:
        """The precision the index's vectors were made in (fp32 for indexes older than precision modes)."""
        return index_precision(self.manifest)

    def collection(self, name: str) -> Collection:
        if name not in COLLECTIONS:
            raise VlkitError(f"target '{name}': unknown; use 'images' or 'captions'")
        if name not in self.collections:
            hint = "build it from a caption table with --caption-field/--caption-template" if name == "captions" else "add images"
            raise VlkitError(f"{self.dir}: has no indexed {name}; {hint}")
        return self.collections[name]

    def counts(self) -> dict[str, int]:
        return {name: self.manifest["collections"][name]["count"] for name in COLLECTIONS}

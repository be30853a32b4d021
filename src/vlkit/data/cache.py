"""On-disk cache of image features, so a second pass over the same images is
a file read instead of a decode + forward pass.

Layout: one shard file per (model fingerprint, preprocessing[, precision]) key,
`<root>/<key>.safetensors`, holding every cached image of that pair: a float32
`features` tensor [N, D] and the row index (absolute path, size, mtime_ns and,
with `hash_content=True`, a SHA-256 of the bytes) as JSON in a uint8 tensor.
One file per pair, not per image, keeps thousands of entries cheap to open
and to look up (one dict lookup per `os.stat`).

Staleness: the shard key covers the model, the preprocessing and, for features
made in bf16 or int8, the precision (`vlkit.precision.describe`; fp32 adds nothing,
so fp32 shards keep the keys they had before precision modes); each entry
covers the file's identity. A changed model, preprocessing or file is a miss,
and the new features replace the old row. Shards are written with an atomic
rename (`vlkit.io`) under an advisory lock, merging entries that another process
saved meanwhile, so concurrent runs lose no work and readers never see a torn file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

from vlkit import io

log = logging.getLogger(__name__)

FORMAT = "vlkit-features/1"


def default_cache_root() -> Path:
    """`$VLKIT_CACHE/features`, else `~/.cache/vlkit/features`."""
    base = os.environ.get("VLKIT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "vlkit") / "features"


class FileId(NamedTuple):
    """What makes a cached entry valid for a file: where it is and which bytes it holds.

    A NamedTuple, not a dataclass: a warm run builds one per image, so it must be cheap."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None


def file_id(path: str | os.PathLike, hash_content: bool = False) -> FileId:
    """Identity of `path` from one `stat` (plus a content hash if asked). Raises OSError."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    digest = None
    if hash_content:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return FileId(p, st.st_size, st.st_mtime_ns, digest)


def shard_key(model_fingerprint: str, preprocess: dict, hash_content: bool, precision: dict | None = None) -> str:
    """Stable key of a (model, preprocessing, identity rule[, precision]) tuple.

    `precision` None (fp32) leaves the key exactly as it was before precision modes.
    """
    fields = {"format": FORMAT, "model": model_fingerprint, "preprocess": preprocess, "hash_content": hash_content}
    if precision is not None:
        fields["precision"] = precision
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class FeatureCache:
    """Entry point: a folder of shards. `shard(fingerprint, preprocess)` opens one.

    `hash_content=True` identifies files by size + SHA-256 instead of size +
    mtime: robust to copies and `touch`, at the cost of reading every file.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, hash_content: bool = False) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.hash_content = hash_content

    def shard(self, model_fingerprint: str, preprocess: dict, precision: dict | None = None) -> "FeatureShard":
        """The shard of features made by this model and preprocessing, in `precision` (None = fp32)."""
        key = shard_key(model_fingerprint, preprocess, self.hash_content, precision)
        return FeatureShard(self.root / f"{key}.safetensors", model_fingerprint, preprocess, self.hash_content, precision)

    def file_id(self, path: str | os.PathLike) -> FileId:
        return file_id(path, self.hash_content)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, hash_content={self.hash_content})"


class FeatureShard:
    """The cached features of one (model, preprocessing, precision) key; load lazily, save explicitly."""

    def __init__(self, path: Path, model_fingerprint: str, preprocess: dict, hash_content: bool, precision: dict | None = None) -> None:
        self.path = path
        self.model_fingerprint = model_fingerprint
        self.preprocess = preprocess
        self.hash_content = hash_content
        self.precision = precision
        # as stored in the file's metadata; absent for fp32 shards, old and new
        self._precision_meta = json.dumps(precision, sort_keys=True, default=str) if precision is not None else None
        self._rows: dict[str, tuple[tuple, int]] = {}  # path -> (identity, row in _features)
        self._features: torch.Tensor | None = None
        self._new: dict[str, tuple[tuple, torch.Tensor]] = {}  # written since the last save
        self._disk_stamp: tuple[int, int, int] | None = None
        self._loaded = False

    # ------------------------------------------------------------------ reading

    def _identity(self, fid: FileId) -> tuple:
        return (fid.size, fid.sha256) if self.hash_content else (fid.size, fid.mtime_ns)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._rows, self._features, self._disk_stamp = self._read_disk()
            self._loaded = True

    def _read_disk(self) -> tuple[dict[str, tuple[tuple, int]], torch.Tensor | None, tuple[int, int, int] | None]:
        """Index and features as saved now; a missing or unreadable shard reads as empty."""
        stamp = _stamp(self.path)
        if stamp is None:
            return {}, None, None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features")
                index = json.loads(bytes(f.get_tensor("index").numpy()).decode("utf-8"))
            if meta.get("format") != FORMAT or meta.get("model") != self.model_fingerprint:
                raise ValueError("shard belongs to another model or format")
            if meta.get("precision") != self._precision_meta:
                raise ValueError("shard holds features of another precision")
            rows = {
                p: ((size, tag), i)
                for i, (p, size, tag) in enumerate(zip(index["path"], index["size"], index["tag"]))
            }
            if features.shape[0] != len(rows):
                raise ValueError("index and features disagree")
        except Exception as e:  # a damaged shard is a cache miss, rewritten on the next save
            log.warning("ignoring unreadable feature cache %s (%s)", self.path, e)
            return {}, None, stamp
        return rows, features, stamp

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._rows) + sum(1 for p in self._new if p not in self._rows)

    def get(self, ids: Sequence[FileId]) -> tuple[list[int], torch.Tensor | None]:
        """Positions in `ids` that hit, and their features [hits, D] (None if no hit)."""
        self._ensure_loaded()
        hits: list[int] = []
        rows: list[int] = []
        fresh: list[tuple[int, torch.Tensor]] = []
        for i, fid in enumerate(ids):
            ident = self._identity(fid)
            new = self._new.get(fid.path)
            if new is not None and new[0] == ident:
                hits.append(i)
                fresh.append((len(rows), new[1]))
                rows.append(-1)
                continue
            old = self._rows.get(fid.path)
            if old is not None and old[0] == ident:
                hits.append(i)
                rows.append(old[1])
        if not hits:
            return [], None
        out = torch.empty(len(rows), self._dim(), dtype=torch.float32)
        base = [(k, r) for k, r in enumerate(rows) if r >= 0]
        if base:
            assert self._features is not None
            ks, rs = zip(*base)
            out[list(ks)] = self._features[list(rs)]
        for k, vec in fresh:
            out[k] = vec
        return hits, out

    def _dim(self) -> int:
        if self._features is not None:
            return self._features.shape[1]
        return next(iter(self._new.values()))[1].shape[0]

    # ------------------------------------------------------------------ writing

    def put(self, ids: Sequence[FileId], features: torch.Tensor) -> None:
        """Remember features for these files (kept in memory until `save`)."""
        if len(ids) != features.shape[0]:
            raise ValueError(f"{len(ids)} file ids for {features.shape[0]} feature rows")
        self._ensure_loaded()
        feats = features.detach().to("cpu", torch.float32)
        if (self._features is not None or self._new) and feats.shape[1] != self._dim():
            raise ValueError(f"feature width {feats.shape[1]} != cached width {self._dim()}")
        for fid, vec in zip(ids, feats):
            self._new[fid.path] = (self._identity(fid), vec.clone())

    @property
    def dirty(self) -> bool:
        return bool(self._new)

    def save(self) -> None:
        """Write new entries: lock, merge with what is on disk now, atomic replace."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_suffix(".lock")):
            if self._disk_stamp == _stamp(self.path):
                rows, features = self._rows, self._features
            else:  # another process saved since we loaded: keep its entries too
                rows, features, _ = self._read_disk()
            # rows are numbered 0..N-1 in dict order, so `features` is already in `paths` order
            paths = list(rows)
            idents = [rows[p][0] for p in paths]
            base = features if paths and features is not None else None
            position = {p: i for i, p in enumerate(paths)}
            extra = []
            for p, (ident, vec) in self._new.items():
                if p in position:  # a stale row: overwrite it in a private copy
                    if base is features:
                        base = features.clone()
                    base[position[p]] = vec
                    idents[position[p]] = ident
                else:
                    position[p] = len(paths)
                    paths.append(p)
                    idents.append(ident)
                    extra.append(vec)
            blocks = ([base] if base is not None else []) + ([torch.stack(extra)] if extra else [])
            all_features = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
            index = {"path": paths, "size": [i[0] for i in idents], "tag": [i[1] for i in idents]}
            blob = torch.frombuffer(bytearray(json.dumps(index).encode("utf-8")), dtype=torch.uint8)
            meta = {
                "format": FORMAT,
                "model": self.model_fingerprint,
                "preprocess": json.dumps(self.preprocess, sort_keys=True, default=str),
                "hash_content": str(self.hash_content),
            }
            if self._precision_meta is not None:
                meta["precision"] = self._precision_meta
            io.save_safetensors(self.path, {"features": all_features, "index": blob}, metadata=meta)
            self._rows = {p: (ident, i) for i, (p, ident) in enumerate(zip(paths, idents))}
            self._features = all_features
            self._disk_stamp = _stamp(self.path)
            self._new.clear()
            self._loaded = True


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Advisory exclusive lock (POSIX); elsewhere the atomic rename alone protects readers."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

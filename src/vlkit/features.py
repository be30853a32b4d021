"""Image features for a list of files: decode, preprocess, encode, cache.

`extract_image_features` is the one road from image files to model features
that zero-shot classification, few-shot adaptation and retrieval share:

- cache hits (same model fingerprint, same preprocessing, same file identity)
  are answered from the on-disk `FeatureCache` with one `stat` per file and no
  decoding at all;
- misses are decoded and preprocessed by a thread pool (PIL and torch release
  the GIL) a bounded window ahead of the encoder, so decoding overlaps encoding
  while memory stays at a few batches;
- unreadable files are skipped and listed with a reason; the run goes on.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from vlkit.data.cache import FeatureCache, FeatureShard, FileId
from vlkit.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, BadImage, load_image

if TYPE_CHECKING:
    from vlkit.models.base import VLModel

log = logging.getLogger(__name__)

# Seconds between intermediate cache saves on long runs, so an interrupted run
# resumes from its last save instead of from scratch.
SAVE_EVERY_S = 60.0


@dataclass
class FeatureResult:
    """Features of the readable images, in input order, and what was skipped."""

    features: torch.Tensor  # [N_ok, D] float32, L2-normalised, on CPU
    paths: list[str]  # the readable inputs, input order, as given
    skipped: list[tuple[str, str]]  # (path, reason), input order
    cache_hits: int = 0
    encoded: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def extract_image_features(
    model: "VLModel",
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 64,
    cache: bool | FeatureCache | None = True,
    num_workers: int | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    precision: str = "fp32",
) -> FeatureResult:
    """Normalised image features of `paths` under `model`, skipping unreadable files.

    cache: True uses the default `FeatureCache()` ($VLKIT_CACHE/features or
    ~/.cache/vlkit/features), a `FeatureCache` uses that one, False/None reads
    and writes nothing. num_workers: decoding threads (None = `default_num_workers`;
    0 = decode in the calling thread). precision: "fp32", "bf16" or "int8"
    (`vlkit.precision`); features are float32 in every mode, and cached under a
    key that includes the precision (fp32's key is the one it always had).
    """
    from vlkit import precision as precisions

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    precisions.check(precision, "precision")
    t_start = time.perf_counter()
    names = [os.fspath(p) for p in paths]
    n = len(names)
    store = FeatureCache() if cache is True else (cache if isinstance(cache, FeatureCache) else None)
    shard = store.shard(model.fingerprint(), model.preprocess.describe(), precisions.describe(precision, "image")) if store is not None else None

    out: torch.Tensor | None = None
    ok = torch.zeros(n, dtype=torch.bool)
    reasons: dict[int, str] = {}
    ids: list[FileId | None] = [None] * n
    hits = 0

    def place(index: Sequence[int], feats: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = torch.empty(n, feats.shape[1], dtype=torch.float32)
        rows = torch.as_tensor(index, dtype=torch.long)
        out[rows] = feats
        ok[rows] = True

    # 1. cache lookup: one stat per file, one dict lookup, one gather
    misses = list(range(n))
    if shard is not None:
        assert store is not None
        known = []
        for i, name in enumerate(names):
            try:
                ids[i] = store.file_id(name)
                known.append(i)
            except OSError:
                pass  # load_image below gives the reason
        hit_pos, hit_feats = shard.get([ids[i] for i in known])  # type: ignore[misc]
        if hit_feats is not None:
            hit_index = [known[k] for k in hit_pos]
            place(hit_index, hit_feats)
            hits = len(hit_index)
            hit_set = set(hit_index)
            misses = [i for i in range(n) if i not in hit_set]
    t_lookup = time.perf_counter()

    # 2. decode + preprocess the misses a bounded window ahead, encode in batches
    encoded = 0
    load = _loader(model, max_pixels)
    device = model.device
    workers = default_num_workers(device) if num_workers is None else num_workers
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    last_save = time.monotonic()
    with _progress_bar(progress, n, hits) as advance:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlkit-decode") if workers > 0 and misses else None
        try:
            batch_idx: list[int] = []
            batch_x: list[torch.Tensor] = []

            def flush() -> None:
                nonlocal encoded, last_save
                feats = encode_pixels(model, batch_x, dtype, precision=precision)
                place(batch_idx, feats)
                if shard is not None:
                    valid = [k for k, i in enumerate(batch_idx) if ids[i] is not None]
                    if valid:
                        shard.put([ids[batch_idx[k]] for k in valid], feats[valid])  # type: ignore[misc]
                        if time.monotonic() - last_save > SAVE_EVERY_S:
                            shard.save()
                            last_save = time.monotonic()
                encoded += len(batch_idx)
                advance(len(batch_idx))
                batch_idx.clear()
                batch_x.clear()

            for i, (x, reason) in _ordered(load, names, misses, pool, window=2 * batch_size + 2 * workers):
                if x is None:
                    reasons[i] = reason  # type: ignore[assignment]
                    advance(1)
                    continue
                batch_idx.append(i)
                batch_x.append(x)
                if len(batch_x) == batch_size:
                    flush()
            if batch_x:
                flush()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if shard is not None:
                shard.save()  # also on interrupt: finished batches are kept for the next run

    keep = ok.nonzero().squeeze(1)
    if out is None:
        features = torch.empty(0, int(getattr(model, "embed_dim", 0)), dtype=torch.float32)
    else:
        features = out if len(keep) == n else out.index_select(0, keep)
    skipped = [(names[i], reasons[i]) for i in sorted(reasons)]
    if skipped:
        log.warning("skipped %d of %d images that could not be read", len(skipped), n)
    t_end = time.perf_counter()
    return FeatureResult(
        features=features,
        paths=[names[i] for i in keep.tolist()],
        skipped=skipped,
        cache_hits=hits,
        encoded=encoded,
        timings={"lookup_s": t_lookup - t_start, "total_s": t_end - t_start},
    )


def default_num_workers(device: torch.device) -> int:
    """Decoding threads: on a GPU the CPU only decodes, so use up to 8 cores; on a
    CPU the encoder already uses every core, so decode with half of them (>= 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return max(1, min(4, cpus // 2))
    return max(1, min(8, cpus))


def encode_pixels(
    model: "VLModel", pixels: Sequence[torch.Tensor], dtype: torch.dtype | None = None, *, precision: str = "fp32"
) -> torch.Tensor:
    """Normalised float32 CPU features of preprocessed images: the one encoder step shared
    by batch extraction and single queries (`vlkit search --image`, the server).

    `precision` (`vlkit.precision`): bf16 runs the forward under bfloat16 autocast,
    int8 on the model's cached int8 copy; `model` itself is never changed."""
    from vlkit import precision as precisions

    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    runner = precisions.prepare(model, precision)
    with torch.inference_mode(), precisions.autocast(precision, model.device):
        x = torch.stack(list(pixels)).to(device=model.device, dtype=dtype, non_blocking=True)
        feats = torch.nn.functional.normalize(runner.encode_image(x).float(), dim=-1).cpu()
    return feats.clone()  # a normal tensor: usable for training outside inference mode


def load_pixels(
    model: "VLModel", source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None, formats: Sequence[str] | None = None
) -> torch.Tensor:
    """`load_image` + the model's preprocessing; raises `BadImage` (a VlkitError) with the reason.

    `source` is a path or the bytes of an upload. Preprocessing that applies its own
    alpha policy (open_clip's resize, then convert("RGB")) gets the transparency;
    everything else gets RGB on white.
    """
    preprocess = model.preprocess
    background = None if preprocess.describe().get("alpha") == "drop" else DEFAULT_BACKGROUND
    image = load_image(source, max_pixels=max_pixels, background=background, name=name, formats=formats)
    try:
        return preprocess(image)
    except Exception as e:  # e.g. a processor that cannot handle a 1x1 image
        text = " ".join(str(e).split())[:120] or type(e).__name__
        label = name or ("upload" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source))
        raise BadImage(label, f"preprocessing failed: {text}") from None


def _loader(model: "VLModel", max_pixels: int) -> Callable[[str], tuple[torch.Tensor | None, str | None]]:
    """path -> (pixels, None) or (None, reason); never raises for a bad file."""

    def load(path: str) -> tuple[torch.Tensor | None, str | None]:
        try:
            return load_pixels(model, path, max_pixels), None
        except BadImage as e:
            return None, e.reason

    return load


def _ordered(
    load: Callable[[str], tuple[torch.Tensor | None, str | None]],
    names: list[str],
    order: list[int],
    pool: ThreadPoolExecutor | None,
    window: int,
):
    """Yield (index, load(names[index])) in `order`, at most `window` loads in flight."""
    if pool is None:
        for i in order:
            yield i, load(names[i])
        return
    pending: deque[tuple[int, Future]] = deque()
    todo = iter(order)
    for i in todo:
        pending.append((i, pool.submit(load, names[i])))
        if len(pending) >= window:
            break
    while pending:
        i, fut = pending.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(load, names[nxt])))
        yield i, fut.result()


class _progress_bar:
    """A rich progress bar on stderr (or nothing); the context value is `advance(k)`."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self._progress = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled or self.total == 0:
            return lambda k: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]image features"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.__enter__()
        task = self._progress.add_task("encode", total=self.total, completed=self.done, rate=f"{self.done} cached")
        start = time.perf_counter()
        progress = self._progress

        def advance(k: int) -> None:
            elapsed = max(time.perf_counter() - start, 1e-9)
            completed = progress.tasks[0].completed + k
            rate = (completed - self.done) / elapsed
            progress.update(task, advance=k, rate=f"{rate:6.1f} img/s, {self.done} cached")

        return advance

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

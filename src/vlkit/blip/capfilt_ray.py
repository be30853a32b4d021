"""CapFilt's caption and filter passes on Ray Data (the `ray` extra), writing exactly what the single process writes.

Every shard still to do is one Ray row. An actor loads its models once from their specs, checks that
each fingerprint is the driver's (so no worker captions or filters with another checkpoint), and runs
the very functions the single process runs on a shard: `capfilt.caption_rows` (with the shard's own
seed) unless the shard's captions exist already, then `capfilt.filter_rows` on those captions. Both
passes run in one actor pool, so `run --ray` starts its workers once. The rows come back to the driver
as JSON, which writes each shard's files atomically as they arrive, captions before filter: the shard
files, and everything `write_collection` makes of them, are byte for byte the single process's
whatever order the workers finish in, and an interrupted Ray run resumes at the files it has not
written, like any other. Workers need only read the images; the CapFilt folder stays on the driver.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from vlkit.blip import capfilt

if TYPE_CHECKING:
    from vlkit.blip.capfilt import Shard
    from vlkit.blip.checkpoint import LoadedBlip
    from vlkit.blip.generate import CaptionSettings


class _ShardActor:
    """A Ray Data callable class: the captioner and/or filter loaded once per actor; shards in, their rows (JSON) out."""

    def __init__(self, models: dict[str, tuple[str, str]], options: dict[str, Any], torch_threads: int):
        import torch

        from vlkit.blip.checkpoint import load_blip

        torch.set_num_threads(torch_threads)
        by_spec: dict[str, LoadedBlip] = {}
        self.models: dict[str, LoadedBlip] = {}
        for role, (spec, fingerprint) in models.items():
            loaded = by_spec.get(spec) or by_spec.setdefault(spec, load_blip(spec))
            if loaded.fingerprint() != fingerprint:
                raise RuntimeError(f"BLIP model '{spec}' on this Ray worker has fingerprint {loaded.fingerprint()}, driver has {fingerprint}")
            self.models[role] = loaded
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vlkit.blip.match import Pair

        o = self.options
        captions_out, filter_out = [], []
        for index, pairs, captioned in zip(batch["index"], batch["pairs"], batch["captions"]):
            shard = capfilt.Shard(int(index), tuple(Pair(**p) for p in json.loads(str(pairs))), Path("."))
            new = not str(captioned)
            rows = capfilt.caption_rows(self.models["caption"], shard, o["settings"], o["caption_batch_size"]) if new else json.loads(str(captioned))
            captions_out.append(json.dumps(rows, ensure_ascii=False) if new else "")
            filtered = capfilt.filter_rows(self.models["filter"], shard, rows, o["threshold"], o["filter_batch_size"]) if "filter" in self.models else None
            filter_out.append("" if filtered is None else json.dumps(filtered, ensure_ascii=False))
        return {"index": np.asarray(batch["index"]), "captions": np.asarray(captions_out, dtype=object),
                "filter": np.asarray(filter_out, dtype=object)}


def _worker_spec(spec: str) -> str:
    """The model spec as every local worker can resolve it (a folder or file by its absolute path)."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def passes_ray(
    todo: Sequence["Shard"],
    *,
    captioner: "LoadedBlip | None" = None,
    settings: "CaptionSettings | None" = None,
    filt: "LoadedBlip | None" = None,
    threshold: float = capfilt.DEFAULT_THRESHOLD,
    caption_batch_size: int = 16,
    filter_batch_size: int = 32,
    address: str = "local",
    num_workers: int = 2,
    torch_threads: int = 1,
    on_shard: Callable[["Shard", bool], None] | None = None,
) -> None:
    """The caption pass (with `captioner`), the filter pass (with `filt`) or both, on Ray Data with
    `num_workers` actors; each model's `spec` must load on every worker. `on_shard(shard, done_before)`
    reports each shard once."""
    import ray

    from vlkit.retrieval.embed_ray import init_ray

    if captioner is not None:
        if settings is None:
            raise ValueError("passes_ray: a captioner needs its caption settings")
        settings.validate()
    if filt is not None:
        capfilt.check_threshold(threshold)
    missing: list[Shard] = []
    items: list[dict[str, Any]] = []
    for shard in todo:
        need_caption = captioner is not None and not shard.captions_path.exists()
        need_filter = filt is not None and not shard.filter_path.exists()
        if not (need_caption or need_filter):
            if on_shard is not None:
                on_shard(shard, True)
            continue
        captioned = "" if need_caption else json.dumps(capfilt.read_captions(shard), ensure_ascii=False)
        missing.append(shard)
        items.append({"index": shard.index, "pairs": json.dumps([asdict(p) for p in shard.pairs], ensure_ascii=False), "captions": captioned})
    if not items:
        return
    models = {role: (_worker_spec(m.spec), m.fingerprint()) for role, m in (("caption", captioner), ("filter", filt)) if m is not None}
    options = {"settings": settings, "caption_batch_size": caption_batch_size, "threshold": threshold, "filter_batch_size": filter_batch_size}
    init_ray(address, num_workers)
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ShardActor,
        fn_constructor_kwargs={"models": models, "options": options, "torch_threads": torch_threads},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(num_workers, len(items))),
        num_cpus=1,
    )
    by_index = {s.index: s for s in missing}
    for row in rows.iter_rows():
        shard = by_index[int(row["index"])]
        if str(row["captions"]):
            capfilt.write_rows(shard.captions_path, json.loads(str(row["captions"])))
        if str(row["filter"]):
            capfilt.write_rows(shard.filter_path, json.loads(str(row["filter"])))
        if on_shard is not None:
            on_shard(shard, False)


def caption_pass_ray(captioner: "LoadedBlip", todo: Sequence["Shard"], settings: "CaptionSettings", *, batch_size: int = 16,
                     **ray_options: Any) -> None:
    """`capfilt.caption_pass` on Ray Data (`ray_options`: address, num_workers, torch_threads, on_shard)."""
    passes_ray(todo, captioner=captioner, settings=settings, caption_batch_size=batch_size, **ray_options)


def filter_pass_ray(filt: "LoadedBlip", todo: Sequence["Shard"], threshold: float = capfilt.DEFAULT_THRESHOLD, *,
                    batch_size: int = 32, **ray_options: Any) -> None:
    """`capfilt.filter_pass` on Ray Data (needs every shard's captions file; `ray_options` as `caption_pass_ray`)."""
    for shard in todo:
        if not shard.filter_path.exists():
            capfilt.read_captions(shard)  # a missing captions file is the single process's error, before Ray starts
    passes_ray(todo, filt=filt, threshold=threshold, filter_batch_size=batch_size, **ray_options)

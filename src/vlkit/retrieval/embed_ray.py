"""Embedding on Ray Data, for collections too large for one process (the `ray` extra).

Each Ray actor loads the model once from its spec (a folder path or a registered
name every node can resolve), checks that its fingerprint is the one the driver
expects (so no node embeds with a different checkpoint), and runs the very same
single-process extractor on its batches. Rows carry their input position, so the
result comes back in input order whatever order the workers finish in.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.models.base import VLModel


class _EmbedActor:
    """A Ray Data callable class: one loaded model per actor, batches of image paths in, features out."""

    def __init__(self, spec: str, fingerprint: str, torch_threads: int, precision: str = "fp32"):
        import torch

        from vlkit.models import load_model

        torch.set_num_threads(torch_threads)
        self.precision = precision
        self.model = load_model(spec).eval()
        if self.model.fingerprint() != fingerprint:
            raise RuntimeError(f"model '{spec}' on this Ray worker has fingerprint {self.model.fingerprint()}, driver has {fingerprint}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vlkit.retrieval.index import embed_images_local

        paths = [str(p) for p in batch["path"]]
        feats, ok, skipped = embed_images_local(self.model, paths, batch_size=len(paths), precision=self.precision)
        row = {p: i for i, p in enumerate(ok)}
        reasons = dict(skipped)
        out = np.zeros((len(paths), self.model.embed_dim), np.float32)
        for j, p in enumerate(paths):
            if p in row:
                out[j] = feats[row[p]]
        return {
            "position": np.asarray(batch["position"]),
            "feature": out,
            "ok": np.asarray([p in row for p in paths]),
            "reason": np.asarray([reasons.get(p, "") for p in paths], dtype=object),
        }


def init_ray(address: str, num_workers: int) -> None:
    """Connect to `address` ('local' starts a private local instance with `num_workers` CPUs)."""
    try:
        import ray
    except ImportError:
        raise VlkitError("--ray: Ray is not installed; install the extra with `pip install 'vlkit[ray]'`") from None
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(num_cpus=num_workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def embed_images_ray(
    model: "VLModel",
    paths: list[str],
    *,
    address: str = "local",
    num_workers: int = 2,
    batch_size: int = 64,
    torch_threads: int = 1,
    precision: str = "fp32",
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embed `paths` on Ray Data with `num_workers` actors (each in `precision`); same contract as the local embedder.

    `model.spec` must be loadable on every worker; the driver's model is used only for
    its spec, fingerprint and width.
    """
    import ray

    init_ray(address, num_workers)
    if not paths:
        return np.empty((0, model.embed_dim), np.float32), [], []
    spec = model.spec
    if os.path.isdir(spec):
        spec = os.path.abspath(spec)
    ds = ray.data.from_items([{"position": i, "path": p} for i, p in enumerate(paths)], override_num_blocks=max(1, min(len(paths) // batch_size + 1, 4 * num_workers)))
    out = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"spec": spec, "fingerprint": model.fingerprint(), "torch_threads": torch_threads, "precision": precision},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=1,
    )
    rows: list[dict[str, Any]] = sorted(out.take_all(), key=lambda r: int(r["position"]))
    ok_rows = [r for r in rows if bool(r["ok"])]
    feats = np.stack([np.asarray(r["feature"], np.float32) for r in ok_rows]) if ok_rows else np.empty((0, model.embed_dim), np.float32)
    ok = [paths[int(r["position"])] for r in ok_rows]
    skipped = [(paths[int(r["position"])], str(r["reason"])) for r in rows if not bool(r["ok"])]
    return feats, ok, skipped


def ray_embedder(address: str, num_workers: int = 2, batch_size: int = 64, precision: str = "fp32"):
    """An `ImageEmbedder` (see vlkit.retrieval.index) that runs on Ray."""

    def embed(model: "VLModel", paths: list[str]) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        return embed_images_ray(model, paths, address=address, num_workers=num_workers, batch_size=batch_size, precision=precision)

    return embed

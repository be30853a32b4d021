"""Embedding throughput: single process vs Ray Data with 2 workers, side by side.

The same image files, the same model, the same batch size, in one run:

1. single process: `vlkit.retrieval.index.embed_images_local` (vlkit's feature
   extractor, no cache) with torch using all `--threads` threads;
2. Ray Data: `vlkit.retrieval.embed_ray.embed_images_ray` on a local Ray instance with
   `--workers` actors, one torch thread each (so both paths use the same cores).

Ray start-up (`ray.init`) is timed apart. Ray Data starts its actors (and each
loads the model) per dataset, so every Ray pass includes that cost; two passes
are shown to expose run-to-run noise. Embeddings are compared (max abs difference).

Throughput does not depend on the weights' values, so `--untrained CONFIG` measures
an untrained model of a pretraining config's architecture (e.g. configs/vlkit-tiny.json),
exported to a temporary folder that every Ray worker loads, when the trained weights
are not at hand.

Writes bench/out/retrieval_ray_throughput.json and .md.

    .venv/bin/python bench/retrieval_ray_throughput.py --images 2000
    .venv/bin/python bench/retrieval_ray_throughput.py --untrained configs/vlkit-tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vlkit-tiny")
    ap.add_argument("--data-dir", default=os.environ.get("VLKIT_DATA", "~/.cache/vlkit/data"))
    ap.add_argument("--dataset", default="emoji", help="a built dataset (its metadata.jsonl images)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--untrained", default=None, help="pretraining config: measure a random model of its architecture")
    args = ap.parse_args()

    import torch

    from vlkit.models import load_model
    from vlkit.retrieval.collection import read_source
    from vlkit.retrieval.embed_ray import embed_images_ray, init_ray
    from vlkit.retrieval.index import embed_images_local

    table = Path(args.data_dir).expanduser() / "built" / args.dataset / "metadata.jsonl"
    paths = [str(it.path) for it in read_source(table, caption_field=None).items][: args.images]
    torch.set_num_threads(args.threads)
    label = args.model
    if args.untrained:
        import tempfile

        from vlkit.pretrain.build import build_model
        from vlkit.pretrain.config import config_from_dict
        from vlkit.pretrain.export import export_vlkit

        cfg = config_from_dict(json.loads(Path(args.untrained).read_text()), args.untrained).model
        folder = Path(tempfile.mkdtemp(prefix="vlkit-untrained-"))
        export_vlkit(build_model(cfg)[0], cfg, folder)
        args.model, label = str(folder), f"untrained {Path(args.untrained).stem} architecture"
    model = load_model(args.model).eval()

    t = time.perf_counter()
    single, ok_single, _ = embed_images_local(model, paths, batch_size=args.batch_size)
    t_single = time.perf_counter() - t

    t = time.perf_counter()
    init_ray("local", args.workers)
    t_init = time.perf_counter() - t
    passes = []
    for _ in range(2):
        t = time.perf_counter()
        got, ok_ray, _ = embed_images_ray(model, paths, num_workers=args.workers, batch_size=args.batch_size)
        passes.append(time.perf_counter() - t)
    assert ok_ray == ok_single
    diff = float(np.abs(got - single).max())

    n = len(ok_single)
    rows = [
        {"path": f"single process, torch {args.threads} threads", "seconds": t_single, "images_per_s": n / t_single},
        {"path": f"Ray Data, {args.workers} workers x 1 thread, pass 1", "seconds": passes[0], "images_per_s": n / passes[0]},
        {"path": f"Ray Data, {args.workers} workers x 1 thread, pass 2", "seconds": passes[1], "images_per_s": n / passes[1]},
    ]
    record = {"model": label, "images": n, "batch_size": args.batch_size, "ray_init_s": t_init, "max_abs_diff": diff, "rows": rows, "cpus": os.cpu_count()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "retrieval_ray_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"{n} {args.dataset} images ({model.preprocess.image_size} px input), model: {label}, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs; ray.init {t_init:.1f} s (not included); max |ray - single| = {diff:.2e}.",
        "",
        "| path | seconds | images/s |",
        "|---|---|---|",
    ] + [f"| {r['path']} | {r['seconds']:.1f} | {r['images_per_s']:.0f} |" for r in rows]
    (OUT / "retrieval_ray_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Approximate index at scale: query latency (p50/p99) and recall@10 against exact search.

Builds the index `vlkit index build` picks for a collection of `--n` vectors (IVF-PQ
with exact re-ranking above 100k; see `vlkit.retrieval.index.choose_index_spec`)
over synthetic unit vectors of the model's width (vlkit-tiny: 256), and the exact
inner-product scan on the same vectors, then measures side by side in one process:

- single-query latency (one query per `search` call, as a server sees them) for the
  approximate index at several nprobe values and for the exact scan;
- recall@10: the fraction of the exact top-10 that the approximate top-10 contains.

Synthetic data (`--data`): `clustered` draws vectors around 4,096 random centres
(real embedding collections are clustered: many photos of similar things); queries
are fresh draws, not database members. `isotropic` is plain Gaussian noise on the
sphere, the worst case for any partitioning index (no structure to exploit).

Writes bench/out/retrieval_ann_<data>.json and .md.

    .venv/bin/python bench/retrieval_ann.py                      # 1M x 256, clustered
    .venv/bin/python bench/retrieval_ann.py --n 200000 --data isotropic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def synthetic(n: int, dim: int, kind: str, rng: np.random.Generator, centres: np.ndarray | None) -> np.ndarray:
    """`n` unit vectors, in blocks so peak memory stays near the output size."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            assert centres is not None
            x = centres[rng.integers(0, len(centres), m)] + 0.08 * x  # at dim 256: ~0.78 cosine to its centre, ~0.6 between members
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latencies(search, queries: np.ndarray) -> np.ndarray:
    times = np.empty(len(queries))
    for i in range(len(queries)):
        t = time.perf_counter()
        search(queries[i : i + 1])
        times[i] = time.perf_counter() - t
    return times * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256, help="vlkit-tiny's embed_dim")
    ap.add_argument("--data", choices=["clustered", "isotropic"], default="clustered")
    ap.add_argument("--queries", type=int, default=1000, help="for recall@10 and approximate latency")
    ap.add_argument("--exact-latency-queries", type=int, default=100)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--k-factor", type=int, nargs="+", default=[4, 16, 64], help="re-ranked candidates per result")
    ap.add_argument("--latency-queries", type=int, default=300, help="single-query calls timed per setting")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="faiss threads for building and batch search")
    ap.add_argument("--latency-threads", type=int, default=1, help="faiss threads while timing single queries (no OpenMP hand-off per query)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import faiss

    from vlkit.retrieval.index import build_faiss, choose_index_spec

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((4096, args.dim), dtype=np.float32) * 0.1 if args.data == "clustered" else None
    t0 = time.perf_counter()
    base = synthetic(args.n, args.dim, args.data, rng, centres)
    queries = synthetic(args.queries, args.dim, args.data, rng, centres)
    t_data = time.perf_counter() - t0

    spec = choose_index_spec(args.n, args.dim)
    t0 = time.perf_counter()
    index = build_faiss(base, spec)
    t_build = time.perf_counter() - t0
    index_bytes = faiss.serialize_index(index).nbytes

    t0 = time.perf_counter()
    _, exact_ids = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    t_exact_batch = time.perf_counter() - t0

    faiss.omp_set_num_threads(args.latency_threads)
    ivf = faiss.extract_index_ivf(index)
    refine = faiss.downcast_index(index)
    rows = []
    for nprobe in sorted(set(args.nprobe + [spec["nprobe"]])):
        for k_factor in sorted(set(args.k_factor + [spec["k_factor"]])):
            ivf.nprobe, refine.k_factor = nprobe, k_factor
            _, ids = index.search(queries, 10)
            recall = float(np.mean([len(set(a) & set(b)) / 10.0 for a, b in zip(ids, exact_ids)]))
            lat = latencies(lambda q: index.search(q, 10), queries[: args.latency_queries])
            rows.append({"index": f"{spec['factory']} nprobe={nprobe} k_factor={k_factor}", "nprobe": nprobe, "k_factor": k_factor,
                         "default": nprobe == spec["nprobe"] and k_factor == spec["k_factor"],
                         "recall@10": recall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
            print(rows[-1], flush=True)
    exact_lat = latencies(lambda q: faiss.knn(q, base, 10, metric=faiss.METRIC_INNER_PRODUCT), queries[: args.exact_latency_queries])
    rows.append({"index": "exact scan (Flat)", "nprobe": None, "k_factor": None, "default": False, "recall@10": 1.0,
                 "p50_ms": float(np.percentile(exact_lat, 50)), "p99_ms": float(np.percentile(exact_lat, 99))})
    print(rows[-1], flush=True)

    result = {
        "n": args.n, "dim": args.dim, "data": args.data, "queries": args.queries,
        "latency_queries": args.latency_queries, "exact_latency_queries": args.exact_latency_queries, "spec": spec, "threads": args.threads, "latency_threads": args.latency_threads,
        "seconds": {"data": t_data, "build": t_build, "exact_batch_knn": t_exact_batch},
        "index_bytes": index_bytes, "flat_bytes": int(base.nbytes), "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stem = OUT / f"retrieval_ann_{args.data}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{args.n:,} synthetic {args.data} unit vectors, dim {args.dim}; recall over {args.queries} queries (fresh draws), "
        f"latency over {args.latency_queries} (exact: {args.exact_latency_queries}); "
        f"index `{spec['factory']}` built in {t_build:.0f} s ({index_bytes / 2**20:.0f} MiB, flat vectors {base.nbytes / 2**20:.0f} MiB); "
        f"{args.threads} faiss threads to build, {args.latency_threads} to time single-query calls.",
        "",
        "| index | recall@10 vs exact | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for r in rows:
        name = r["index"] + (" (default)" if r["default"] else "")
        lines.append(f"| {name} | {r['recall@10']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

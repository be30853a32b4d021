"""A bounded burst of mixed good and hostile requests against `vlkit serve` on 127.0.0.1.

Builds a small index of the bundled sample with the shipped vlkit-tiny, serves it with
uvicorn in this process on a free port, and sends N requests from W threads: good text
and image queries, and hostile ones drawn from tests/reliability_corpus.py (bombs,
truncated and wrong-format uploads, oversize bodies, bad k/target, path traversal).
Reports requests, status counts per kind, errors (5xx or a good request not 200), p50/p99
latency of the good requests and the process's peak RSS; writes results.json and
table.md under bench/results/reliability-server/.

    nice -n 15 env PYTHONPATH=src:tests OMP_NUM_THREADS=2 python bench/reliability_server.py --requests 600 --workers 8
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from reliability_corpus import bad_image_files, bomb_png, header_only_png, noise_jpeg, png_bytes, truncated_jpeg  # noqa: E402


def requests_plan(n: int, seed: int) -> list[tuple[str, str, dict]]:
    """(kind, good|hostile, request) triples; half good, half hostile, shuffled by `seed`."""
    bad = bad_image_files()
    hostile = [
        ("bomb-30000", {"upload": header_only_png(30000, 30000)}),
        ("bomb-9000", {"upload": bomb_png(9000, 9000)}),
        ("truncated", {"upload": truncated_jpeg(0.4)}),
        ("svg", {"upload": bad["svg.png"]}),
        ("empty", {"upload": b""}),
        ("random", {"upload": bad["random.bin.png"]}),
        ("oversize", {"upload": b"\x00" * 6_000_000}),  # over the 5 MiB default limit
        ("k=0", {"get": "/api/search", "params": {"q": "red", "k": 0}}),
        ("k=huge", {"get": "/api/search", "params": {"q": "red", "k": 10**12}}),
        ("target", {"get": "/api/search", "params": {"q": "red", "target": "videos"}}),
        ("long-q", {"get": "/api/search", "params": {"q": "x" * 20000}}),
        ("traversal", {"get": "/files/../../../../etc/passwd"}),
        ("traversal-enc", {"get": "/files/..%2f..%2findex.json"}),
    ]
    good = [
        ("text", {"get": "/api/search", "params": {"q": "a smiling face", "k": 5}}),
        ("image-png", {"upload": png_bytes((64, 64), (230, 200, 40))}),
        ("image-jpg", {"upload": noise_jpeg(96)}),
    ]
    rng = random.Random(seed)
    plan = [(k, "good", r) for k, r in (rng.choice(good) for _ in range(n // 2))]
    plan += [(k, "hostile", r) for k, r in (rng.choice(hostile) for _ in range(n - n // 2))]
    rng.shuffle(plan)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "reliability-server")
    args = ap.parse_args()

    import tempfile

    import httpx
    import uvicorn

    from vlkit.models import load_model
    from vlkit.retrieval.collection import read_source
    from vlkit.retrieval.index import build_index
    from vlkit.retrieval.search import Searcher
    from vlkit.retrieval.server import Limits, create_app

    sample = Path(__import__("vlkit").__file__).parent / "assets" / "sample" / "built" / "emoji"
    model = load_model("vlkit-tiny")
    tmp = Path(tempfile.mkdtemp(prefix="vlkit-rel-server-"))
    build_index(tmp / "index", model, read_source(sample), progress=False)
    limits = Limits()
    app = create_app(Searcher.open(tmp / "index", model), limits)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    local = threading.local()

    def send(item):
        kind, quality, req = item
        client = getattr(local, "client", None) or httpx.Client(base_url=url, timeout=120)
        local.client = client
        start = time.perf_counter()
        try:
            if "upload" in req:
                r = client.post("/api/search/image", files={"file": ("q.png", req["upload"], "image/png")}, data={"k": "5"})
            else:
                r = client.get(req["get"], params=req.get("params"))
            status = r.status_code
            json_reason = status < 400 or bool(r.headers.get("content-type", "").startswith("application/json") and r.json().get("detail"))
        except httpx.HTTPError as e:
            status, json_reason = f"client error: {type(e).__name__}", False
        return kind, quality, status, time.perf_counter() - start, json_reason

    plan = requests_plan(args.requests, args.seed)
    wall = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(send, plan))
    wall = time.perf_counter() - wall
    server.should_exit = True
    thread.join(timeout=10)

    by_kind: dict[str, Counter] = defaultdict(Counter)
    for kind, quality, status, _, _ in results:
        by_kind[f"{quality}:{kind}"][str(status)] += 1
    good_lat = sorted(t for _, q, s, t, _ in results if q == "good" and s == 200)
    errors = [r for r in results if not isinstance(r[2], int) or r[2] >= 500 or (r[1] == "good" and r[2] != 200)]
    no_reason = [r for r in results if isinstance(r[2], int) and 400 <= r[2] < 500 and not r[4]]

    def pct(p: float) -> float:
        return round(1000 * good_lat[min(len(good_lat) - 1, int(p * len(good_lat)))], 1) if good_lat else float("nan")

    report = {
        "command": "nice -n 15 env PYTHONPATH=src:tests OMP_NUM_THREADS=2 python bench/reliability_server.py "
                   f"--requests {args.requests} --workers {args.workers} --seed {args.seed}",
        "index": {"source": "bundled sample (emoji)", "model": "vlkit-tiny", "counts": Searcher.open(tmp / "index", model).index.counts()},
        "limits": limits.as_dict(),
        "requests": len(results), "workers": args.workers, "wall_s": round(wall, 2),
        "status_counts": dict(Counter(str(r[2]) for r in results)),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "errors": len(errors), "error_examples": [list(map(str, e[:3])) for e in errors[:5]],
        "4xx_without_json_reason": len(no_reason),
        "good_ok": len(good_lat), "good_latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| request kind | requests | statuses |", "| --- | ---: | --- |"]
    for k, v in sorted(by_kind.items()):
        lines.append(f"| {k} | {sum(v.values())} | {', '.join(f'{s}: {c}' for s, c in sorted(v.items()))} |")
    lines += ["", f"{report['requests']} requests from {args.workers} threads in {report['wall_s']} s; errors (5xx, client failures, "
              f"good requests not 200): {report['errors']}; 4xx without a JSON reason: {report['4xx_without_json_reason']}; "
              f"good requests p50 {report['good_latency_ms']['p50']} ms, p99 {report['good_latency_ms']['p99']} ms; "
              f"peak RSS {report['peak_rss_mib']} MiB.", ""]
    (args.out / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Pretraining scale-out benchmark: pairs/s of 1 vs N processes, and peak memory of
GradCache vs a plain large batch, measured side by side in one invocation.

Synthetic pairs (random 64 px images, random pooled text vectors) through the
vlkit-tiny image tower and projections, so the numbers measure the trainer, not
the disk. Each configuration runs in a fresh process (torchrun for N > 1, gloo on
CPU / nccl on CUDA); memory is the peak resident set (CPU) or peak allocated
(CUDA) minus the process's footprint before the first step.

    .venv/bin/python bench/pretrain_scaling.py --out bench/out/pretrain_scaling
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One measured configuration (runs inside torchrun or alone)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlkit.pretrain.config import load_config
    from vlkit.pretrain.distributed import cleanup, init_distributed
    from vlkit.pretrain.gradcache import gradcache_backward
    from vlkit.pretrain.losses import ClipLoss
    from vlkit.pretrain.build import build_image_tower
    from vlkit.pretrain.model import DualEncoder, tower_width

    info = init_distributed(args.device)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config).model
    torch.manual_seed(0)
    tower = build_image_tower(cfg)
    model = DualEncoder(tower, tower_width(tower, "pooler", cfg.image_size), torch.nn.Identity(), 384, cfg.embed_dim).to(info.device)
    net = DDP(model) if info.distributed else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = ClipLoss(info.rank, info.world_size)
    local = args.batch // info.world_size
    g = torch.Generator().manual_seed(info.rank)
    px = torch.randn(local, 3, cfg.image_size, cfg.image_size, generator=g).to(info.device)
    tx = torch.randn(local, 384, generator=g).to(info.device)
    cuda = info.device.startswith("cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if args.micro:
            gradcache_backward(net, px, tx, loss_fn, args.micro, no_sync=net.no_sync if info.distributed else contextlib.nullcontext)
        else:
            loss_fn(*net(px, tx)).backward()
        opt.step()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (also reaches the peak memory)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if info.is_main:
        print(json.dumps({"pairs_per_s": args.batch * args.steps / dt, "peak_bytes_rank0": peak, "world_size": info.world_size}))
    cleanup()


def launch(nproc: int, batch: int, micro: int, threads: int, steps: int, config: str, device: str) -> dict:
    common = ["--worker", "--batch", str(batch), "--micro", str(micro), "--threads", str(threads), "--steps", str(steps),
              "--config", config, "--device", device]
    if nproc == 1:
        cmd = [sys.executable, __file__, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__, *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--config", default=str(ROOT / "configs" / "vlkit-tiny.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--micro", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cores", type=int, default=2, help="CPU cores shared by all processes of a run")
    ap.add_argument("--big-batch", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "pretrain_scaling"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    # Throughput: the same global batch on 1 process (all cores) vs 2 processes (cores split), interleaved.
    for rep in range(args.repeats):
        for nproc in (1, 2):
            r = launch(nproc, args.batch, 0, max(1, args.cores // nproc), args.steps, args.config, args.device)
            rows.append({"kind": "throughput", "repeat": rep, "processes": nproc, "threads_per_process": max(1, args.cores // nproc),
                         "global_batch": args.batch, **r})
            print(json.dumps(rows[-1]), flush=True)
    # Memory: one big contrastive batch, plain vs GradCache micro-batches (1 process).
    for micro in (0, args.micro_batch):
        r = launch(1, args.big_batch, micro, args.cores, 2, args.config, args.device)
        rows.append({"kind": "memory", "global_batch": args.big_batch, "micro_batch": micro or None, **r})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = ["| measurement | setting | pairs/s | peak memory (MiB) |", "|---|---|---|---|"]
    for r in rows:
        setting = (f"{r['processes']} proc x {r['threads_per_process']} thr, batch {r['global_batch']} (rep {r['repeat']})"
                   if r["kind"] == "throughput" else f"batch {r['global_batch']}, " + (f"GradCache micro {r['micro_batch']}" if r["micro_batch"] else "plain"))
        md.append(f"| {r['kind']} | {setting} | {r['pairs_per_s']:.1f} | {r['peak_bytes_rank0'] / 2**20:.0f} |")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

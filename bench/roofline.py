"""Roofline: this machine's matmul peak, each model's FLOPs, and the fraction of
peak that vlkit's pipelines reach next to the model's forward alone.

1. Peak: the best of `--peak-repeats` large square `torch.matmul`s (`--matmul-size`,
   2048 by default) in fp32 and in bf16, at the thread count of the run
   (`--threads`, default torch's choice). Where the CPU has no native bf16 matmul
   the bf16 probe shrinks so it stays short, and the row says so.
2. FLOPs, counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls,
   convolutions, attention; 2 FLOPs per multiply-add): image forward per image,
   text forward per prompt, for
   - `b32`: a random HF `CLIPModel` with ViT-B/32's dimensions (vision 12 x 768,
     patch 32 at 224 px; text 12 x 512, 77 positions; projection 512), built in
     memory with the BPE of bench/zeroshot_throughput.py trained on the class
     prompts (each class name about one token, as in CLIP's vocabulary) and
     OpenAI CLIP's image processor (shortest edge 224, bicubic, center crop 224);
   - `vlkit-tiny`: the embedded default model.
3. Achieved GFLOP/s and fraction of peak, each workload next to its forward alone:
   - image forward alone: `model.encode_image` on ready pixel tensors, batch
     `--batch-size` (the same images, preprocessed beforehand);
   - image embedding end to end: `vlkit.features.extract_image_features` with the
     cache off, JPEG files in, features out (`--images` synthetic photo-like
     500x375 JPEGs, or `--data DIR`), batch `--batch-size`;
   - text forward alone: `model.encode_text` on the classifier's prompts,
     tokenized beforehand, in the classifier's batches;
   - text classifier: `vlkit.zeroshot.zeroshot_classifier`, cache off, `--classes`
     names x 1 template ("a photo of a {}.");
   - CoOp: the text forward of every class prompt (16 context vectors, class
     token at the end) alone, and a training step
     (`vlkit.adapt.coop.coop_loss_backward` + SGD step, backward included) on
     `--coop-classes` classes and a batch of 32 cached image features.
   Every workload's FLOPs are counted on the call itself (its first, untimed
   run, which is also its warm-up), so a path that skips work (the shared text
   prefix) shows fewer FLOPs, not a higher fraction of peak. Each row is timed
   `--repeat` times, forward and pipeline interleaved, and the best run is
   reported (the machine's capability; every run is in the JSON).
   Precisions: fp32, and bf16 under `torch.autocast("cpu", torch.bfloat16)`.

Goal ratios (issue 15, ViT-B/32 shape at batch 64): end-to-end image embedding
from JPEGs >= 80% of the forward-only throughput at the same precision, and bf16
end to end >= 1.8x fp32 end to end.

Pipeline breakdown: single-thread CPU time per image of decoding
(`vlkit.data.images.load_image`) and of the model's preprocessing, and the
pipeline's own split of its wall time (`FeatureResult.timings`: encoder time,
time the encoder waited for decoded images, batch assembly).

Writes bench/out/roofline<tag>.json and bench/out/roofline<tag>.md.

    .venv/bin/python bench/roofline.py                    # full run: about 6 minutes on 2 quiet cores
    .venv/bin/python bench/roofline.py --quick            # smoke run: small sizes, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

TEMPLATE = "a photo of a {}."
PRECISIONS = ("fp32", "bf16")
# ViT-B/32 (transformers' CLIPConfig defaults, spelled out): what the issue's goals are stated on.
B32 = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32),
    text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77),
    projection_dim=512,
)


# ------------------------------------------------------------------ machine


def cpu_info() -> dict[str, Any]:
    """CPU model and the ISA flags that decide the fp32/bf16 ceilings."""
    model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = None
    return {
        "cpu": model,
        "isa": {f: f in flags for f in wanted},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": mkldnn_bf16,
    }


def _best_matmul_s(n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: allocation, kernel choice
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(dtype: torch.dtype, n: int, repeats: int, budget_s: float = 3.0) -> dict[str, Any]:
    """Best dense-matmul GFLOP/s at size n; shrinks n (and says so) where one matmul
    would take longer than `budget_s` (a CPU without native bf16 runs it ~100x slower)."""
    size = n
    probe = 512
    probe_s = _best_matmul_s(probe, dtype, 1)
    while size > probe and probe_s * (size / probe) ** 3 > budget_s:
        size //= 2
    best = _best_matmul_s(size, dtype, repeats)
    return {"n": size, "requested_n": n, "repeats": repeats, "best_s": best, "gflops": 2 * size**3 / best / 1e9}


# ------------------------------------------------------------------ models


def build_b32(folder: Path, classnames: list[str], seed: int):
    """A random ViT-B/32-shaped CLIP as a vlkit model, built the way `load_hf_clip` builds
    one from a folder (only the tokenizer is written to disk: the weights stay in memory)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    from zeroshot_throughput import build_tokenizer

    from vlkit.models.dual_encoder import DualEncoderModel
    from vlkit.models.hf import load_tokenizer
    from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig

    tok = build_tokenizer(folder, [TEMPLATE.format(c) for c in classnames] + [TEMPLATE.format("x")])
    text = dict(B32["text"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=B32["vision"], projection_dim=B32["projection_dim"])
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    model = DualEncoderModel(
        spec="random ViT-B/32-shaped CLIP",
        kind="hf-clip",
        vision_model=clip.vision_model,
        text_model=clip.text_model,
        visual_projection=clip.visual_projection,
        text_projection=clip.text_projection,
        log_logit_scale=clip.logit_scale,
        tokenizer=load_tokenizer(folder, config.text_config.max_position_embeddings, "CLIPModel", config.text_config.vocab_size),
        preprocess=PilImagePreprocess(PreprocessConfig.from_hf(_clip_image_processor(CLIPImageProcessor))),
        text_pooling="eot",
        description={"class": "CLIPModel", "config": config.to_diff_dict()},
    )
    return model.eval()


def _clip_image_processor(cls):
    """OpenAI CLIP's processor settings (transformers' defaults), without the torchvision notice."""
    import logging

    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return cls()
    finally:
        logger.setLevel(level)


def load_models(names: list[str], classnames: list[str], seed: int, workdir: Path) -> dict[str, Any]:
    from vlkit.models import load_model

    models = {}
    for name in names:
        if name == "b32":
            models[name] = build_b32(workdir / "b32-tokenizer", classnames, seed)
        else:
            models[name] = load_model(name).eval()
    return models


# ------------------------------------------------------------------ measuring


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(FLOPs, result) of one call of `fn`, as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return int(counter.get_total_flops()), result


def precision_ctx(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Clock:
    """Wall and process CPU time of a block (CPU time: the steadier figure on a shared machine)."""

    def __enter__(self) -> "Clock":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


class Workload:
    """One timed thing: a callable, how many items one call handles, its counted FLOPs."""

    def __init__(self, name: str, fn: Callable[[], Any], items: int, unit: str) -> None:
        self.name, self.fn, self.items, self.unit = name, fn, items, unit
        self.flops = 0
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.extra: list[dict[str, float]] = []

    def warm_and_count(self, flops_fn: Callable[[], Any] | None = None, scale: float = 1.0) -> None:
        """First, untimed run under FlopCounterMode (or `flops_fn` scaled, where the full
        call is long and its FLOPs are exactly proportional to a shorter one)."""
        flops, _ = count_flops(flops_fn or self.fn)
        self.flops = int(flops * scale)

    def run(self) -> None:
        with Clock() as clock:
            result = self.fn()
        self.walls.append(clock.wall)
        self.cpus.append(clock.cpu)
        timings = getattr(result, "timings", None)
        if isinstance(timings, dict):
            self.extra.append(dict(timings))

    def summary(self, peak_gflops: float) -> dict[str, Any]:
        best = min(self.walls)
        k = self.walls.index(best)
        gflops = self.flops / best / 1e9
        out = {
            "workload": self.name,
            "items": self.items,
            "unit": self.unit,
            "gflop": self.flops / 1e9,
            "wall_s_best": best,
            "wall_s_each": self.walls,
            "cpu_s_each": self.cpus,
            "items_per_s": self.items / best,
            "gflops": gflops,
            "fraction_of_peak": gflops / peak_gflops if peak_gflops else None,
        }
        if self.extra:
            out["pipeline_timings_best"] = self.extra[k]
        return out


def interleaved(workloads: list[Workload], repeat: int) -> None:
    """Warm-up/count each, then `repeat` rounds running each once, so a change in the
    neighbours' load hits every workload of the round."""
    for _ in range(repeat):
        for w in workloads:
            w.run()


# ------------------------------------------------------------------ workloads


def image_workloads(model, paths: list[str], batch_size: int, forward_batches: int, precision: str) -> list[Workload]:
    from vlkit.data.images import load_image
    from vlkit.features import extract_image_features

    first = paths[:batch_size]
    pixels = torch.stack([model.preprocess(load_image(p)) for p in first])
    n_fwd = forward_batches * len(first)

    def forward() -> None:
        with torch.inference_mode(), precision_ctx(precision):
            for _ in range(forward_batches):
                model.encode_image(pixels)

    def end_to_end():
        with precision_ctx(precision):
            result = extract_image_features(model, paths, batch_size=batch_size, cache=False, progress=False)
        assert not result.skipped and len(result) == len(paths), result.skipped
        return result

    def one_batch() -> None:
        with torch.inference_mode(), precision_ctx(precision):
            model.encode_image(pixels)

    def e2e_small():
        with precision_ctx(precision):
            return extract_image_features(model, first[:4], batch_size=batch_size, cache=False, progress=False)

    fwd = Workload("image forward alone", forward, n_fwd, "images")
    e2e = Workload("image embedding from JPEG files (extract_image_features)", end_to_end, len(paths), "images")
    per_image_fwd, _ = count_flops(one_batch)
    fwd.flops = per_image_fwd * forward_batches
    per_image_e2e, _ = count_flops(e2e_small)
    # every image runs the same forward: the end-to-end count is exactly per-image x images
    if per_image_e2e * len(first) != per_image_fwd * 4:
        print(f"  note: pipeline FLOPs per image {per_image_e2e / 4:.4g} != forward's {per_image_fwd / len(first):.4g}", flush=True)
    e2e.flops = per_image_e2e * len(paths) // 4
    end_to_end()  # warm-up of the thread pool and the decoder, untimed
    return [fwd, e2e]


def text_workloads(model, classnames: list[str], batch_size: int, precision: str) -> list[Workload]:
    from vlkit import zeroshot

    prompts = zeroshot.format_prompts(classnames, [TEMPLATE])
    batches = [model.tokenize(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]

    def forward() -> None:
        with torch.inference_mode(), precision_ctx(precision):
            for b in batches:
                model.encode_text(b.input_ids, b.attention_mask)

    def classifier():
        with precision_ctx(precision):
            return zeroshot.zeroshot_classifier(model, classnames, [TEMPLATE], batch_size=batch_size, cache=False)

    fwd = Workload(f"text forward alone ({len(classnames)} prompts)", forward, len(classnames), "classes")
    clf = Workload(f"text classifier (zeroshot_classifier, {len(classnames)} classes x 1 template)", classifier, len(classnames), "classes")
    fwd.warm_and_count()
    clf.warm_and_count()
    fwd.tokens = sum(int(b.attention_mask.shape[1]) * len(b.input_ids) for b in batches)  # type: ignore[attr-defined]
    return [fwd, clf]


def coop_workloads(model, classnames: list[str], steps: int, precision: str, seed: int) -> list[Workload]:
    from vlkit.adapt.coop import coop_loss_backward, freeze
    from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions

    freeze(model)
    learner = PromptLearner(model, classnames, PromptOptions(), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(32, model.embed_dim, generator=gen), dim=-1)
    labels = torch.randint(0, len(classnames), (32,), generator=gen)

    def forward() -> None:
        with torch.inference_mode(), precision_ctx(precision):
            for _ in range(steps):
                embeds, mask = learner.assemble(model)
                model.encode_text_embeddings(embeds, mask)

    def train() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            coop_loss_backward(model, learner, feats, labels, precision=precision)  # type: ignore[arg-type]
            opt.step()

    def one_forward() -> None:
        with torch.inference_mode(), precision_ctx(precision):
            embeds, mask = learner.assemble(model)
            model.encode_text_embeddings(embeds, mask)

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        coop_loss_backward(model, learner, feats, labels, precision=precision)  # type: ignore[arg-type]
        opt.step()

    n = len(classnames)
    fwd = Workload(f"CoOp text forward alone ({n} class prompts, full pass)", forward, steps, "passes")
    step = Workload(f"CoOp training step ({n} classes, batch 32, backward + SGD)", train, steps, "steps")
    fwd.warm_and_count(one_forward, scale=steps)
    step.warm_and_count(one_step, scale=steps)
    return [fwd, step]


# ------------------------------------------------------------------ breakdown


def pipeline_breakdown(model, paths: list[str], n: int) -> dict[str, float]:
    """Single-thread CPU ms per image of decoding and of the model's preprocessing."""
    from vlkit.data.images import load_image

    sample = paths[:n]
    t0 = time.thread_time()
    images = [load_image(p) for p in sample]
    t1 = time.thread_time()
    for im in images:
        model.preprocess(im)
    t2 = time.thread_time()
    return {"decode_ms_per_image": (t1 - t0) / len(sample) * 1e3, "preprocess_ms_per_image": (t2 - t1) / len(sample) * 1e3}


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["b32", "vlkit-tiny"], help="b32 (random ViT-B/32 CLIP) and/or a vlkit model spec")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="auto: skip the bf16 rows where the CPU's bf16 matmul is slower than its fp32 one")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--images", type=int, default=256, help="synthetic JPEGs for the end-to-end rows (ignored with --data)")
    ap.add_argument("--data", type=Path, default=None, help="a folder of images instead of synthetic JPEGs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--forward-batches", type=int, default=2, help="batches per forward-alone timing")
    ap.add_argument("--classes", type=int, default=1000, help="classes of the text classifier")
    ap.add_argument("--coop-classes", type=int, default=100)
    ap.add_argument("--coop-steps", type=int, default=2, help="CoOp steps (and forward passes) per timing")
    ap.add_argument("--text-batch-size", type=int, default=256, help="prompts per text-tower batch (zeroshot_classifier's default)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved timings per row (best reported)")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--breakdown-images", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="smoke run: 48 images, batch 16, 100 classes, 10 CoOp classes, 1 repeat")
    ap.add_argument("--tag", default="", help="suffix for the output files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.forward_batches = 48, 16, 1
        args.classes, args.coop_classes, args.coop_steps, args.repeat = 100, 10, 1, 1
        args.matmul_size, args.peak_repeats, args.breakdown_images = 1024, 3, 8
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from zeroshot_throughput import class_names, make_images

    from vlkit import io
    from vlkit.data.datasets import find_images

    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    machine = cpu_info()
    print(f"{machine['cpu']}, {torch.get_num_threads()} torch threads, capability {machine['torch_cpu_capability']}, "
          f"load {load_before:.1f}", flush=True)

    peaks = {"fp32": matmul_peak(torch.float32, args.matmul_size, args.peak_repeats)}
    if "bf16" in args.precisions:
        peaks["bf16"] = matmul_peak(torch.bfloat16, args.matmul_size, args.peak_repeats)
    for p, v in peaks.items():
        print(f"  peak {p}: {v['gflops']:.1f} GFLOP/s (matmul {v['n']}^2)", flush=True)
    precisions = list(args.precisions)
    bf16_note = None
    if "bf16" in precisions and args.bf16 != "on":
        slower = peaks["bf16"]["gflops"] < peaks["fp32"]["gflops"]
        if args.bf16 == "off" or slower:
            precisions.remove("bf16")
            bf16_note = ("bf16 rows not run (--bf16 off)" if args.bf16 == "off" else
                         f"bf16 rows not run: this CPU's bf16 matmul peak ({peaks['bf16']['gflops']:.1f} GFLOP/s) is below its "
                         f"fp32 peak ({peaks['fp32']['gflops']:.1f} GFLOP/s): no native bf16 (avx512_bf16/amx: "
                         f"{machine['isa']['avx512_bf16']}/{machine['isa']['amx_bf16']}, oneDNN bf16: {machine['mkldnn_bf16']}); "
                         "--bf16 on runs them anyway")
            print(f"  {bf16_note}", flush=True)

    all_classes = class_names(max(args.classes, args.coop_classes), args.seed)
    if args.data is not None:
        paths = [str(p) for p in find_images(args.data)]
        image_source = str(args.data)
    else:
        paths = make_images(OUT / "roofline-images", args.images, args.seed)
        image_source = f"synthetic photo-like 500x375 JPEGs (quality 90), seed {args.seed}"

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vlkit-roofline-") as tmp:
        models = load_models(args.models, all_classes, args.seed, Path(tmp))
        for name, model in models.items():
            entry = results[name] = {"parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
            entry["breakdown"] = pipeline_breakdown(model, paths, args.breakdown_images)
            entry["flops"] = model_flops(model)
            text_path = getattr(__import__("vlkit.zeroshot", fromlist=["text_path"]), "text_path", None)
            entry["zeroshot_text_path"] = text_path(model) if text_path else "full"
            entry["rows"] = {}
            for precision in precisions:
                print(f"{name} {precision}", flush=True)
                peak = peaks[precision]["gflops"]
                groups = [
                    image_workloads(model, paths, args.batch_size, args.forward_batches, precision),
                    text_workloads(model, all_classes[: args.classes], args.text_batch_size, precision),
                    coop_workloads(model, all_classes[: args.coop_classes], args.coop_steps, precision, args.seed),
                ]
                rows = []
                for group in groups:
                    interleaved(group, args.repeat)
                    for w in group:
                        rows.append(w.summary(peak))
                        r = rows[-1]
                        print(f"  {w.name:70s} {r['items_per_s']:9.2f} {w.unit}/s  {r['gflops']:7.1f} GFLOP/s  "
                              f"{100 * r['fraction_of_peak']:5.1f}% of peak", flush=True)
                entry["rows"][precision] = rows

    result = {
        "benchmark": "roofline",
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "pillow": __import__("PIL").__version__,
        "images": len(paths),
        "image_source": image_source,
        "batch_size": args.batch_size,
        "classes": args.classes,
        "coop_classes": args.coop_classes,
        "repeat": args.repeat,
        "peaks": peaks,
        "bf16_note": bf16_note,
        "models": results,
        "goals": goals(results),
    }
    io.write_json(OUT / f"roofline{args.tag}.json", result)
    table = markdown(result)
    io.write_text(OUT / f"roofline{args.tag}.md", table)
    print(table)
    return result


def model_flops(model) -> dict[str, float]:
    """GFLOPs of one image forward and of one prompt's text forward at 77 (or the
    tower's context length) tokens."""
    size = model.preprocess.image_size
    x = torch.zeros(1, 3, size, size)
    length = int(model.tokenizer.context_length)
    ids = torch.ones(1, length, dtype=torch.long)
    with torch.inference_mode():
        img, _ = count_flops(lambda: model.encode_image(x))
        txt, _ = count_flops(lambda: model.encode_text(ids, torch.ones_like(ids)))
    return {"image_gflop_per_image": img / 1e9, "text_gflop_per_prompt_full_context": txt / 1e9, "text_context_length": length}


def _row(rows: list[dict], prefix: str) -> dict | None:
    return next((r for r in rows if r["workload"].startswith(prefix)), None)


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's ratios, per model: end-to-end vs forward at each precision, bf16 vs fp32 end to end."""
    out: dict[str, Any] = {}
    for name, entry in results.items():
        g: dict[str, Any] = {}
        for precision, rows in entry["rows"].items():
            fwd, e2e = _row(rows, "image forward"), _row(rows, "image embedding")
            if fwd and e2e:
                g[f"e2e_vs_forward_{precision}"] = e2e["items_per_s"] / fwd["items_per_s"]
        if "fp32" in entry["rows"] and "bf16" in entry["rows"]:
            a, b = _row(entry["rows"]["fp32"], "image embedding"), _row(entry["rows"]["bf16"], "image embedding")
            if a and b:
                g["bf16_e2e_vs_fp32_e2e"] = b["items_per_s"] / a["items_per_s"]
        out[name] = g
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    isa = ", ".join(k for k, v in m["isa"].items() if v) or "none of the listed"
    lines = [
        f"Roofline on {m['cpu']} ({r['cpu_count']} cores; {isa}; torch {r['torch']} capability {m['torch_cpu_capability']}, "
        f"oneDNN bf16: {m['mkldnn_bf16']}), {r['torch_threads']} torch thread(s); load average {r['load_average_before']:.1f} "
        f"before, {r['load_average_after']:.1f} after. Best of {r['repeat']} interleaved timing(s) per row.",
        f"Images: {r['images']} {r['image_source']}, batch {r['batch_size']}.",
        "",
        "| precision | matmul | peak GFLOP/s |",
        "|---|---:|---:|",
    ]
    for p, v in r["peaks"].items():
        lines.append(f"| {p} | {v['n']}x{v['n']} | {v['gflops']:.1f} |")
    if r["bf16_note"]:
        lines += ["", f"Note: {r['bf16_note']}."]
    lines += ["", "| model | params M | image forward GFLOP/image | text forward GFLOP/prompt (full context) | "
              "decode ms/image | preprocess ms/image | zero-shot text path |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, e in r["models"].items():
        f, b = e["flops"], e["breakdown"]
        lines.append(f"| {name} | {e['parameters_m']} | {f['image_gflop_per_image']:.3f} | "
                     f"{f['text_gflop_per_prompt_full_context']:.3f} ({f['text_context_length']} tokens) | "
                     f"{b['decode_ms_per_image']:.2f} | {b['preprocess_ms_per_image']:.2f} | {e['zeroshot_text_path']} |")
    lines += ["", "| model | precision | workload | items | best wall s | items/s | GFLOP | GFLOP/s | % of peak | vs forward alone |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in r["models"].items():
        for precision, rows in e["rows"].items():
            for i, row in enumerate(rows):
                pair = rows[i - 1] if i % 2 else None
                vs = f"{row['items_per_s'] / pair['items_per_s']:.2f}x" if pair and row["unit"] == pair["unit"] else ""
                if pair and row["unit"] != pair["unit"]:  # CoOp: a step vs one forward pass
                    vs = f"{pair['wall_s_best'] / row['wall_s_best']:.2f}x (time ratio)"
                lines.append(f"| {name} | {precision} | {row['workload']} | {row['items']} {row['unit']} | {row['wall_s_best']:.2f} | "
                             f"{row['items_per_s']:.2f} | {row['gflop']:.1f} | {row['gflops']:.1f} | "
                             f"{100 * row['fraction_of_peak']:.1f} | {vs} |")
    lines += ["", "Goals (ViT-B/32 shape, batch 64): end-to-end image embedding >= 80% of forward-only throughput; "
              "bf16 end to end >= 1.8x fp32 end to end."]
    for name, g in r["goals"].items():
        parts = [f"{k}: {v:.2f}" + (" (goal 0.80)" if k.startswith("e2e") else " (goal 1.8)") for k, v in g.items()]
        lines.append(f"- {name}: " + ("; ".join(parts) if parts else "no ratio (rows not run)"))
    for name, e in r["models"].items():
        for precision, rows in e["rows"].items():
            t = _row(rows, "image embedding").get("pipeline_timings_best") if _row(rows, "image embedding") else None
            if t:
                lines.append(f"- {name} {precision} pipeline split (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

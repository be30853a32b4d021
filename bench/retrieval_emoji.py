"""Retrieval recall on the held-out Facebook-style emoji (evaluation only, never trained on).

Text -> image and image -> text recall@1/5/10, mean and median rank, with the CLIP
paper's "any true match in the top K" convention (`vlkit.retrieval.evaluate`), for
two caption forms built from each emoji's English label: the bare label and
"an emoji of {label}.". Chance level is K / gallery size.

Needs the built data (`vlkit data build emoji` -> <data dir>/built/emoji-facebook)
and a model (default vlkit-tiny). Writes bench/out/retrieval_emoji.json and .md.

    .venv/bin/python bench/retrieval_emoji.py
    .venv/bin/python bench/retrieval_emoji.py --model path/to/checkpoint --dataset emoji-facebook
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
TEMPLATES = {"label": "{label}", "an emoji of {label}.": "an emoji of {label}."}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vlkit-tiny")
    ap.add_argument("--data-dir", default=os.environ.get("VLKIT_DATA", "~/.cache/vlkit/data"))
    ap.add_argument("--dataset", default="emoji-facebook")
    args = ap.parse_args()

    from vlkit.models import load_model
    from vlkit.retrieval.collection import read_source
    from vlkit.retrieval.evaluate import as_dict, evaluate_retrieval
    from vlkit.retrieval.index import embed_images_local

    table = Path(args.data_dir).expanduser() / "built" / args.dataset / "metadata.jsonl"
    model = load_model(args.model).eval()
    image_features: dict[tuple[str, ...], tuple] = {}

    def embedder(model, paths):  # the images are the same for every caption form: embed them once
        key = tuple(paths)
        if key not in image_features:
            image_features[key] = embed_images_local(model, paths, batch_size=128)
        return image_features[key]

    results = {}
    for name, template in TEMPLATES.items():
        t = time.perf_counter()
        res = evaluate_retrieval(model, read_source(table, caption_template=template), embedder=embedder)
        results[name] = {**as_dict(res), "seconds": time.perf_counter() - t}
        print(name, json.dumps({k: results[name][k] for k in ("text_to_image", "image_to_text")}), flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model, "fingerprint": model.fingerprint(), "dataset": args.dataset, "table": str(table), "results": results}
    (OUT / "retrieval_emoji.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    first = next(iter(results.values()))
    lines = [
        f"{args.dataset}: {first['images']} images, model {args.model} (fingerprint {model.fingerprint()}); "
        f"chance R@1/5/10 for text->image = {100 / first['images']:.2f}/{500 / first['images']:.2f}/{1000 / first['images']:.2f} %.",
        "",
        "| captions | direction | queries | R@1 | R@5 | R@10 | mean rank | median rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for direction in ("text_to_image", "image_to_text"):
            m = r[direction]
            lines.append(
                f"| {name} | {direction.replace('_', ' ')} | {m['queries']} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} "
                f"| {m['mean_rank']:.1f} | {m['median_rank']:.0f} |"
            )
    (OUT / "retrieval_emoji.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""CapFilt's filter against known noise, and how noisy the captioner's synthetic captions are (issue #11, item 3).

Web set with ground truth: every Facebook-style emoji (held out: never trained or tuned on), its web
text "an emoji of <name>." kept true for most images, replaced for `--swap` of them by another emoji's
name (a swap) and for `--near` of them by the name of another emoji of the same subgroup (a near miss:
the caption of a related image). The shipped filter (`vlkit.blip.capfilt.filter_pass`, threshold 0.5)
then drops what it scores below the threshold. Reported, with "noisy" = swapped or near miss:

- precision and recall of dropping noisy texts at the threshold, kept shares per kind, ROC AUC of the
  ITM probability separating true from noisy texts (scikit-learn), and the ROC curve (roc.png);
- for synthetic captions (nucleus sampling, top-p 0.9, as BLIP; and beam search, 3 beams): the noise
  ratio as BLIP reports it (the share the filter drops), beside the ground-truth share of synthetic
  captions that do not name the emoji, and the filter's precision/recall on those;
- wall time per 1,000 web images of the caption and filter passes.

    PYTHONPATH=src python bench/capfilt_filter_quality.py --model vlkit-blip-tiny --out bench/results/capfilt-filter
    PYTHONPATH=src python bench/capfilt_filter_quality.py --captioner F/captioner/model --filter F/filter/model \
        --out bench/results/capfilt-finetuned        # F: a `vlkit capfilt finetune` folder
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path


def words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def web_table(rows: list[dict], swap: float, near: float, seed: int) -> list[dict]:
    """One web row per image: its true name, or a swapped / near-miss name, with the kind recorded."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_swap, n_near = round(swap * len(rows)), round(near * len(rows))
    kind = {i: "swap" for i in order[:n_swap]} | {i: "near" for i in order[n_swap : n_swap + n_near]}
    by_subgroup: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_subgroup.setdefault(r.get("subgroup", ""), []).append(i)
    out = []
    for i, r in enumerate(rows):
        k = kind.get(i, "true")
        name = r["base_label"]
        if k == "near":
            others = [j for j in by_subgroup[r.get("subgroup", "")] if rows[j]["base_label"] != name]
            if not others:
                k = "swap"
            else:
                name = rows[rng.choice(others)]["base_label"]
        if k == "swap":
            while rows[(j := rng.randrange(len(rows)))]["base_label"] == r["base_label"] or rows[j].get("subgroup") == r.get("subgroup"):
                pass
            name = rows[j]["base_label"]
        out.append({"image": r["image"], "caption": f"an emoji of {name}.", "kind": k, "true_name": r["base_label"]})
    return out


def precision_recall(dropped: list[bool], noisy: list[bool]) -> dict:
    tp = sum(d and n for d, n in zip(dropped, noisy))
    return {"precision": 100.0 * tp / max(1, sum(dropped)), "recall": 100.0 * tp / max(1, sum(noisy)),
            "dropped": sum(dropped), "noisy": sum(noisy)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vlkit-blip-tiny", help="captioner and filter, unless --captioner / --filter name others")
    ap.add_argument("--captioner", default=None, help="e.g. <capfilt folder>/captioner/model from `vlkit capfilt finetune`")
    ap.add_argument("--filter", default=None, help="e.g. <capfilt folder>/filter/model from `vlkit capfilt finetune`")
    ap.add_argument("--data-dir", default=os.environ.get("VLKIT_DATA", "~/.cache/vlkit/data"))
    ap.add_argument("--swap", type=float, default=0.3)
    ap.add_argument("--near", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N images (a quick look; 0: all)")
    ap.add_argument("--out", default="bench/results/capfilt-filter")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.metrics import roc_auc_score, roc_curve

    from vlkit import io
    from vlkit.blip import capfilt
    from vlkit.blip.checkpoint import load_blip
    from vlkit.blip.generate import settings_for
    from vlkit.blip.match import read_pairs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    table = Path(args.data_dir).expanduser() / "built" / "emoji-facebook" / "metadata.jsonl"
    rows = [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    web = web_table(rows, args.swap, args.near, args.seed)
    captioner_spec, filter_spec = args.captioner or args.model, args.filter or args.model
    captioner = load_blip(captioner_spec)
    filt = captioner if filter_spec == captioner_spec else load_blip(filter_spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"captioner": captioner_spec, "filter": filter_spec, "images": len(web), "threshold": args.threshold, "swap": args.swap, "near": args.near,
                    "seed": args.seed, "threads": torch.get_num_threads()}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "web.jsonl"
        path.write_text("".join(json.dumps({"image": str(table.parent / w["image"]), "caption": w["caption"]}) + "\n" for w in web))
        pairs = read_pairs(path)
        for method, settings in (("nucleus", settings_for("nucleus", seed=args.seed)), ("beam", settings_for("beam"))):
            todo = capfilt.shards(pairs, Path(tmp) / method, 1024)
            t0 = time.perf_counter()
            capfilt.caption_pass(captioner, todo, settings)
            t1 = time.perf_counter()
            capfilt.filter_pass(filt, todo, args.threshold)
            t2 = time.perf_counter()
            prov = [r for s in todo for r in (json.loads(line) for line in s.filter_path.read_text().splitlines())]
            runs[method] = {"provenance": prov, "caption_s_per_1000": 1000 * (t1 - t0) / len(web), "filter_s_per_1000": 1000 * (t2 - t1) / len(web)}

    kind_of = {str(table.parent / w["image"]): w for w in web}
    web_rows = [r for r in runs["nucleus"]["provenance"] if r["source"] == "web"]
    noisy = [kind_of[r["path"]]["kind"] != "true" for r in web_rows]
    scores = [r["itm_probability"] for r in web_rows]
    record["web"] = {
        **precision_recall([not r["kept"] for r in web_rows], noisy),
        "auc": roc_auc_score([not n for n in noisy], scores),
        "kept_%": {k: 100.0 * sum(r["kept"] for r in web_rows if kind_of[r["path"]]["kind"] == k)
                   / max(1, sum(kind_of[r["path"]]["kind"] == k for r in web_rows)) for k in ("true", "swap", "near")},
        "counts": {k: sum(kind_of[r["path"]]["kind"] == k for r in web_rows) for k in ("true", "swap", "near")},
    }
    record["synthetic"] = {}
    for method, run in runs.items():
        syn = [r for r in run["provenance"] if r["source"] == "synthetic"]
        wrong = [words(kind_of[r["path"]]["true_name"]) not in words(r["text"]) for r in syn]
        record["synthetic"][method] = {
            "captions": len(syn), "noise_ratio_%": 100.0 * sum(not r["kept"] for r in syn) / len(syn),
            "not_naming_the_emoji_%": 100.0 * sum(wrong) / len(syn),
            "filter_on_wrong": precision_recall([not r["kept"] for r in syn], wrong),
            "caption_s_per_1000": run["caption_s_per_1000"], "filter_s_per_1000": run["filter_s_per_1000"],
            "examples": [{"caption": r["text"], "true": kind_of[r["path"]]["true_name"], "p": round(r["itm_probability"], 3)} for r in syn[:6]],
        }
    fpr, tpr, _ = roc_curve([not n for n in noisy], scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"web texts (AUC {record['web']['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("noisy texts kept (false positive rate)")
    ax.set_ylabel("true texts kept (true positive rate)")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    with io.atomic_path(out / "roc.png") as tmp_png:
        fig.savefig(tmp_png, format="png", dpi=110)
    (out / "filter.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    w = record["web"]
    lines = [f"{len(web)} Facebook-style emoji, {w['counts']['swap']} swapped and {w['counts']['near']} near-miss web texts, "
             f"captioner {captioner_spec}, filter {filter_spec} at ITM > {args.threshold}, {record['threads']} threads.", "",
             "| web texts | precision of dropping noise | recall | ROC AUC | kept: true / swapped / near miss |", "|---|---|---|---|---|",
             f"| {len(web_rows)} | {w['precision']:.1f}% | {w['recall']:.1f}% | {w['auc']:.3f} | "
             f"{w['kept_%']['true']:.1f}% / {w['kept_%']['swap']:.1f}% / {w['kept_%']['near']:.1f}% |", "",
             "| synthetic captions | noise ratio (dropped by the filter) | not naming the emoji | filter precision / recall on those "
             "| caption s / 1000 images | filter s / 1000 images |", "|---|---|---|---|---|---|"]
    for method, r in record["synthetic"].items():
        f = r["filter_on_wrong"]
        lines.append(f"| {method} | {r['noise_ratio_%']:.1f}% | {r['not_naming_the_emoji_%']:.1f}% | {f['precision']:.1f}% / {f['recall']:.1f}% "
                     f"| {r['caption_s_per_1000']:.0f} | {r['filter_s_per_1000']:.0f} |")
    (out / "filter.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

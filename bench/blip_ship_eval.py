"""The shipped BLIP on images it never saw: captions, ITC vs ITC + ITM retrieval, zero-shot beside vlkit-tiny.

Held-out images: every image of the built emoji-facebook dataset (the Facebook style: evaluation
only, never trained, tuned or shipped) and the clipart-category test split. The image tower runs
once per image; captions, ITC features, ITM re-ranking and zero-shot all read those tokens.

1. Captions with BLIP's beam settings (3 beams, max 20, min 5), scored with BLEU-4 and CIDEr
   (pycocoevalcap) against each image's describing captions (`vlkit.pretrain.data.describing_captions`:
   "an emoji of <name>.", "a clip art of <category>."), and the share of captions that name the
   right emoji / category (its letters and digits, as whole words, in the caption). Beside them a retrieval baseline:
   the describing caption of the nearest training image by ITC (training tokens from the run's
   cache, bf16 as the run stored them).
2. Retrieval on emoji-facebook with bench/retrieval_emoji.py's captions "an emoji of {label}.":
   recall@1/5/10 by ITC alone and after ITM re-ranks the ITC top k (BLIP: ITM logit + ITC).
3. Zero-shot top-1 of the ITC features on emoji-label/group/subgroup (test = Facebook) and
   clipart-category (test split), each task's templates, beside vlkit-tiny through `classify`.

    PYTHONPATH=src python bench/blip_ship_eval.py --model src/vlkit/weights/vlkit-blip-tiny \\
        --config configs/blip-minilm2.json --out bench/results/blip-ship

Writes eval.json, eval.md and captions.jsonl (every caption and its baseline) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

ZERO_SHOT_TASKS = ("emoji-label", "emoji-group", "emoji-subgroup", "clipart-category")
RETRIEVAL_TEMPLATE = "an emoji of {label}."


def words(text: str) -> str:
    """Lower-case letters and digits only: the decoder's word pieces ("five o ' clock") and BLIP's cleaning
    (which drops ":" and "#") then compare equal to the name ("five o'clock")."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def names_right(caption: str, name: str) -> bool:
    """Does the caption say `name`, as whole words?"""
    return f" {words(name)} " in f" {words(caption)} "


def read_rows(table: Path) -> dict[str, dict]:
    """metadata.jsonl rows by resolved image path."""
    rows = {}
    with open(table, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[str((table.parent / row["image"]).resolve())] = row
    return rows


@torch.no_grad()
def tower_pass(loaded, paths: list[str], batch_size: int) -> tuple[torch.Tensor, list[tuple[str, str]], float]:
    from vlkit.blip.captioning import pixel_batches

    skipped: list[tuple[str, str]] = []
    chunks, kept = [], []
    t0 = time.perf_counter()
    for batch in pixel_batches(paths, loaded.preprocess, batch_size, skipped):
        chunks.append(loaded.model.image_embeds(batch.pixels))
        kept.extend(batch.index)
    if len(kept) != len(paths):
        raise SystemExit(f"{len(paths) - len(kept)} held-out images unreadable: {skipped[:3]}")
    return torch.cat(chunks), skipped, time.perf_counter() - t0


@torch.no_grad()
def captions_of(loaded, embeds: torch.Tensor, batch_size: int) -> tuple[list[str], float]:
    from vlkit.blip.generate import BEAM, decode, generate

    out: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(embeds), batch_size):
        out.extend(decode(loaded.tokenizer, generate(loaded.model, embeds[i : i + batch_size], loaded.tokenizer, BEAM)))
    return out, time.perf_counter() - t0


@torch.no_grad()
def image_feats(blip, embeds: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([blip.image_feat(embeds[i : i + batch_size].float()) for i in range(0, len(embeds), batch_size)])


def training_baseline(loaded, config: str) -> tuple[torch.Tensor, list[str]]:
    """ITC features of every training image (the run's cached tower tokens) and the describing
    caption of each (its first)."""
    from vlkit.pretrain.blip_trainer import BlipTrainer
    from vlkit.pretrain.config import load_config
    from vlkit.pretrain.distributed import DistInfo

    with tempfile.TemporaryDirectory() as tmp:
        trainer = BlipTrainer(load_config(config), Path(tmp), DistInfo())
    if trainer.image_tokens is None:
        raise SystemExit(f"{config}: the baseline reads a locked tower's cached tokens; this config trains the tower")
    pairs = trainer.pairs
    feats = image_feats(loaded.model, trainer.image_tokens)
    return feats, [pairs.captions[ids[0]] for ids in pairs.describing_ids]


def caption_scores(preds: dict[str, str], refs: dict[str, list[str]], names: dict[str, str]) -> dict:
    from vlkit.blip.caption_metrics import score_captions

    s = score_captions(preds, refs, tokenizer="python", meteor="off")
    right = sum(names_right(preds[k], names[k]) for k in preds)
    exact = sum(any(words(preds[k]) == words(r) for r in refs[k]) for k in preds)
    return {"images": len(preds), "BLEU-4": s.scores["BLEU-4"], "CIDEr": s.scores["CIDEr"],
            "names_right_%": 100.0 * right / len(preds), "exact_%": 100.0 * exact / len(preds)}


def zero_shot_from_feats(vl, task, split: str, feat_of: dict[str, torch.Tensor]) -> dict:
    """Top-1 of precomputed ITC image features against the task's classifier (what `classify` computes)."""
    from vlkit.zeroshot import logits, task_images, zeroshot_classifier

    items = task_images(task, split)
    x = torch.stack([feat_of[str(Path(p).resolve())] for p in items.paths])
    y = torch.tensor(items.labels)
    w = zeroshot_classifier(vl, items.classnames, task.templates, progress=False)
    top1 = (logits(vl, x, w).argmax(1) == y).float().mean().item()
    return {"task": task.name, "n": len(y), "classes": task.num_classes, "top1": 100.0 * top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="the config the model was trained with (training images for the baseline)")
    ap.add_argument("--data-dir", default=os.environ.get("VLKIT_DATA", "~/.cache/vlkit/data"))
    ap.add_argument("--rerank-k", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="first N images of each set (a quick look; 0: all)")
    ap.add_argument("--out", default="bench/results/blip-ship")
    args = ap.parse_args()

    from vlkit.blip.checkpoint import load_blip
    from vlkit.blip.rerank import evaluate_retrieval_rerank
    from vlkit.data.tasks import load_task
    from vlkit.models import load_model
    from vlkit.models.blip_adapter import BlipVLModel
    from vlkit.pretrain.data import describing_captions
    from vlkit.retrieval.collection import read_source
    from vlkit.zeroshot import classify, task_images

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data = Path(args.data_dir).expanduser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_blip(args.model)
    loaded.model.eval()
    vl = BlipVLModel(loaded).eval()
    record: dict = {"model": args.model, "fingerprint": vl.fingerprint(), "threads": torch.get_num_threads()}

    # the held-out sets: all of emoji-facebook, the clipart-category test split
    fb_table = data / "built" / "emoji-facebook" / "metadata.jsonl"
    fb_rows = read_rows(fb_table)
    clip_task = load_task("clipart-category", data_dir=data)
    clip_rows = read_rows(data / "built" / "openclipart" / "metadata.jsonl")
    clip_paths = [str(Path(p).resolve()) for p in task_images(clip_task, "test").paths]
    sets = {"facebook": list(fb_rows), "clipart-test": clip_paths}
    if args.limit:
        sets = {k: v[: args.limit] for k, v in sets.items()}
    rows = {**fb_rows, **clip_rows}

    tokens, seconds = {}, {}
    for name, paths in sets.items():
        tokens[name], _, seconds[f"tower_{name}"] = tower_pass(loaded, paths, args.batch_size)
        print(f"{name}: {len(paths)} images through the tower in {seconds[f'tower_{name}']:.0f} s", flush=True)

    # 1. captions vs the nearest-training-image baseline
    train_feats, train_caps = training_baseline(loaded, args.config)
    captions_out, caption_results = [], {}
    for name, paths in sets.items():
        caps, seconds[f"decode_{name}"] = captions_of(loaded, tokens[name], args.batch_size)
        nearest = (image_feats(loaded.model, tokens[name]) @ train_feats.T).argmax(1).tolist()
        base = [train_caps[j] for j in nearest]
        refs = {p: describing_captions(rows[p]) for p in paths}
        named = {p: (rows[p].get("base_label") or rows[p].get("label")) if "category" not in rows[p]
                 else refs[p][0][len("a clip art of "):].rstrip(".") for p in paths}
        caption_results[name] = {
            "blip": caption_scores(dict(zip(paths, caps)), refs, named),
            "nearest_training_caption": caption_scores(dict(zip(paths, base)), refs, named),
        }
        captions_out += [{"set": name, "image": p, "caption": c, "baseline": b, "references": refs[p]}
                         for p, c, b in zip(paths, caps, base)]
        print(name, json.dumps(caption_results[name]), flush=True)
    record["captions"] = caption_results
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in captions_out)

    # 2. retrieval: ITC alone vs ITC + ITM on the ITC top k
    source = read_source(fb_table, caption_template=RETRIEVAL_TEMPLATE)
    index = {p: i for i, p in enumerate(sets["facebook"])}
    captioned = [it for it in source.items if it.captions]
    if args.limit:
        source.items = [it for it in captioned if str(Path(it.path).resolve()) in index]
        captioned = source.items
    embeds = tokens["facebook"][[index[str(Path(it.path).resolve())] for it in captioned]]
    t0 = time.perf_counter()
    rr = evaluate_retrieval_rerank(loaded, source, k=args.rerank_k, image_embeds=embeds)
    seconds["retrieval_rerank"] = time.perf_counter() - t0
    record["retrieval"] = {"captions": RETRIEVAL_TEMPLATE, **rr.to_dict()}
    print("retrieval", json.dumps({"itc": rr.itc, "itm": rr.itm}), flush=True)

    # 3. zero-shot: BLIP's ITC from the tokens above; vlkit-tiny through classify (same tasks, templates)
    feat_of: dict[str, torch.Tensor] = {}
    for name, paths in sets.items():
        feat_of.update(zip(paths, image_feats(loaded.model, tokens[name])))
    tiny = load_model("vlkit-tiny").eval()
    zs = []
    for task_name in ZERO_SHOT_TASKS:
        task = load_task(task_name, data_dir=data)
        split_paths = [str(Path(p).resolve()) for p in task_images(task, "test").paths]
        if any(p not in feat_of for p in split_paths):
            print(f"{task_name}: test images outside the evaluated sets (--limit); skipped", flush=True)
            continue
        blip_res = zero_shot_from_feats(vl, task, "test", feat_of)
        res = classify(tiny, task_images(task, "test"), templates=task.templates, progress=False)
        tiny_top1 = 100.0 * (res.logits.argmax(1) == torch.tensor(res.labels)).float().mean().item()
        zs.append({**blip_res, "vlkit_tiny_top1": tiny_top1, "chance": 100.0 / task.num_classes})
        print(json.dumps(zs[-1]), flush=True)
    record["zero_shot"] = zs
    record["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    (out / "eval.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    (out / "eval.md").write_text(markdown(record) + "\n")
    print(markdown(record))


def markdown(r: dict) -> str:
    lines = [f"Model {r['model']} (fingerprint {r['fingerprint']}), {r['threads']} threads.", "",
             "| images | captioner | n | BLEU-4 | CIDEr | names the right emoji / category | exact |", "|---|---|---|---|---|---|---|"]
    for name, res in r["captions"].items():
        for who, m in res.items():
            lines.append(f"| {name} | {who.replace('_', ' ')} | {m['images']} | {100 * m['BLEU-4']:.1f} | {m['CIDEr']:.2f} "
                         f"| {m['names_right_%']:.1f}% | {m['exact_%']:.1f}% |")
    rr = r["retrieval"]
    lines += ["", f"Retrieval on emoji-facebook, captions \"{rr['captions']}\", ITM re-ranks the ITC top {rr['rerank']['k']}:", "",
              "| direction | scores | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|---|"]
    for direction in ("text_to_image", "image_to_text"):
        for who, key in (("ITC", "itc"), ("ITC + ITM", "itc_itm")):
            m = rr[key][direction]
            lines.append(f"| {direction.replace('_', ' ')} | {who} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['median_rank']:.0f} |")
    lines += ["", "| zero-shot task (test) | n | classes | BLIP ITC top-1 | vlkit-tiny top-1 | chance |", "|---|---|---|---|---|---|"]
    for z in r["zero_shot"]:
        lines.append(f"| {z['task']} | {z['n']} | {z['classes']} | {z['top1']:.1f} | {z['vlkit_tiny_top1']:.1f} | {z['chance']:.1f} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

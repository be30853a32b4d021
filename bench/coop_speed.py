"""CoOp 16-shot: vlkit's cached-feature path vs the reference-style loop, side by side.

Both train the SAME prompt learner (same init seed, same M, same class names) with
the SAME recipe (SGD 0.002, batch 32, warm-up + cosine, epochs by shots), the SAME
batch order (same generator), on the SAME 16-shot draw of the SAME task, with the
SAME model, in one process, one after the other:

- reference: what the CoOp code does. Every step decodes nothing (images are
  held decoded in memory, which favours the reference) but draws a fresh random
  resized crop + flip for each of the 32 images, preprocesses them and runs the
  frozen image tower, then runs the text tower on all class prompts padded to the
  tokenizer's full context length (77 for CLIP, 32 for vlkit-tiny), backward, step. Evaluation re-encodes the
  class prompts for every test batch of 100 images, as Dassl's test loop does.
- vlkit: encodes V augmented views per training image once (`--views`, several
  values = one cached run each), then each step samples one cached view per image
  and runs only the text tower on prompts cut to the longest one; evaluation
  computes the text classifier once.

The view count is the trade-off: fewer views cost less image-tower time but give
the prompt less augmentation diversity over 200 epochs than the reference's fresh
crop at every step, so compare accuracy per view count, over several seeds.

Both encode the test images once (same cost, timed inside each path).

Memory (`--memory`): peak resident memory of CoOp training steps on the
1,906-class emoji-label task (full data in the data dir), measured in a fresh
subprocess per setting: all classes through the text tower at once vs
`--class-chunk` classes at a time.

Model: `--model SPEC` (e.g. vlkit-tiny) or, by default, a random CLIP built
here (SMALL: text 2x128, vision 2x192 at 128 px, patch 8, the cost balance
of ViT-B/16; the BPE of
bench/zeroshot_throughput.py trained on the tasks' class names, so each name is
about one token as in CLIP's vocabulary). Random weights: accuracies are low and
only their equality between the two paths matters here.

Writes bench/out/<out-name>.json and .md (default out-name: coop_speed).

    # as recorded in BENCHMARKS.md: speed on the ViT-B/16-balanced random CLIP, then
    # accuracy parity (and speed) on the trained vlkit-tiny over three seeds, plus memory
    .venv/bin/python bench/coop_speed.py --views 4 64 --no-memory
    .venv/bin/python bench/coop_speed.py --model vlkit-tiny --data-dir ~/.cache/vlkit/data \
        --memory-data-dir ~/.cache/vlkit/data --views 4 16 32 64 --pair-seeds 1 2 3 --memory-steps 2 \
        --out-name coop_speed_vlkit-tiny
    .venv/bin/python bench/coop_speed.py --epochs 5            # quick look (not the 16-shot recipe)
    .venv/bin/python bench/coop_speed.py --memory-only         # only the 1,906-class memory rows
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))


# A small CLIP with ViT-B/16's cost balance, sized for 2 shared CPU cores. In ViT-B/16
# one image (197 tokens x 768 wide) costs about 23x one prompt cut to ~20 tokens of the
# 512-wide text tower; here one image (257 tokens x 192) costs about 21x one prompt of
# 28 tokens x 128. Both towers 2 layers deep, so the grid runs in minutes.
SMALL = dict(
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77),
    vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3, image_size=128, patch_size=8),
    projection_dim=128,
)


def build_small_clip(folder: Path, corpus: list[str], seed: int) -> Path:
    """Random CLIPModel (SMALL) + BPE tokenizer trained on `corpus` + 96 px CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    from zeroshot_throughput import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, corpus)
    text = dict(SMALL["text"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=SMALL["vision"], projection_dim=SMALL["projection_dim"])
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    px = SMALL["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}).save_pretrained(folder)
    return folder


def get_model(spec: str | None, classnames: list[str], seed: int):
    from vlkit.models import load_model

    if spec:
        return load_model(spec), spec
    folder = OUT / "coop-clip-small-random"
    if not (folder / "config.json").exists():
        corpus = [t.format(c) for c in classnames for t in ("a photo of a {}.", "an emoji of {}.", "{}")]
        corpus += ["a photo of a", "x"] * 4
        build_small_clip(folder, corpus, seed)
    return load_model(str(folder)), "random CLIP 'small' (text 2x128, vision 2x192 at 128 px / patch 8, BPE on the tasks' class names)"


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    from vlkit.metrics import topk_accuracy

    return topk_accuracy(logits, labels, 1)


@torch.no_grad()
def encode_test(model, images, batch_size: int = 100) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        px = torch.stack([model.preprocess(im) for im in images[i : i + batch_size]])
        out.append(model.encode_image(px))
    return torch.cat(out)


def run_vlkit(model, classnames, train_images, train_labels, test_images, test_labels, config, views: int, seed: int) -> dict:
    """`seed` drives the augmentation draws only; the context init and batch order follow `config.seed`."""
    from vlkit.adapt.coop import classifier_weights, prompt_logits, train_coop
    from vlkit.adapt.features import AugmentOptions, augmented_features

    t0 = time.perf_counter()
    feats = augmented_features(model, train_images, AugmentOptions(views=views, seed=seed))
    t_cache = time.perf_counter() - t0
    result = train_coop(model, classnames, feats, torch.tensor(train_labels), config, shots=16)
    t_train = result.seconds
    t1 = time.perf_counter()
    test = encode_test(model, test_images)
    classifier = classifier_weights(model, result.learner)
    acc = accuracy(prompt_logits(model, test, classifier), test_labels)
    t_eval = time.perf_counter() - t1
    return {"cache_views_s": t_cache, "train_s": t_train, "eval_s": t_eval, "total_s": t_cache + t_train + t_eval,
            "accuracy": acc, "final_loss": result.history[-1]["loss"], "epochs": result.epochs}


def run_reference(model, classnames, train_images, train_labels, test_images, test_labels, config, seed: int) -> dict:
    """The reference loop: image tower every step, prompts padded to full length, text re-encoded per test batch."""
    import torch.nn.functional as F

    from vlkit.adapt.coop import _batches, epochs_for_shots, freeze, lr_at_epoch, make_optimizer
    from vlkit.adapt.features import AugmentOptions, augment
    from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions

    freeze(model)
    opts = PromptOptions(**{**config.prompt.to_dict(), "truncate": False})
    learner = PromptLearner(model, classnames, opts, generator=torch.Generator().manual_seed(config.seed))
    opt = make_optimizer([learner.ctx], config)
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    aug_gen = torch.Generator().manual_seed(seed)
    aug = AugmentOptions(seed=seed)
    size = int(model.preprocess.image_size)
    labels = torch.tensor(train_labels)
    epochs = config.epochs or epochs_for_shots(16)
    scale = model.logit_scale.detach()
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at_epoch(epoch, epochs, config.lr, config.warmup_epochs, config.warmup_lr)
        for idx in _batches(len(train_images), config.batch_size, order_gen):
            with torch.no_grad():
                px = torch.stack([model.preprocess(augment(train_images[int(i)], size, aug, aug_gen)) for i in idx])
                img = model.encode_image(px)
            text = learner.text_features(model)
            loss = F.cross_entropy(scale * img @ text.t(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    t_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    logits = []
    with torch.no_grad():
        for i in range(0, len(test_images), 100):
            img = encode_test(model, test_images[i : i + 100])
            logits.append(scale * img @ learner.text_features(model).t())  # prompts re-encoded per batch
    acc = accuracy(torch.cat(logits), test_labels)
    t_eval = time.perf_counter() - t1
    return {"cache_views_s": 0.0, "train_s": t_train, "eval_s": t_eval, "total_s": t_train + t_eval,
            "accuracy": acc, "final_loss": float(loss.detach()), "epochs": epochs}


MEMORY_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
from coop_speed import get_model
from vlkit.adapt.coop import CoOpConfig, coop_loss_backward, classifier_weights, freeze
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
names = json.loads(open({names!r}).read())
model, _ = get_model({spec!r}, names, 0)
freeze(model)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
learner = PromptLearner(model, names, PromptOptions(n_ctx=16), generator=torch.Generator().manual_seed(1))
opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
g = torch.Generator().manual_seed(0)
x = torch.nn.functional.normalize(torch.randn(32, model.embed_dim, generator=g), dim=-1)
y = torch.randint(0, len(names), (32,), generator=g)
t = time.perf_counter()
for _ in range({steps}):
    opt.zero_grad(set_to_none=True)
    coop_loss_backward(model, learner, x, y, class_chunk={chunk})
    opt.step()
step_s = (time.perf_counter() - t) / {steps}
classifier_weights(model, learner, chunk_size={chunk} or 256)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_rss_mib": peak / 1024, "model_loaded_rss_mib": base / 1024, "step_s": step_s,
                  "seq_len": int(learner.token_ids.shape[1])}}))
"""


def memory_rows(spec: str | None, names: list[str], chunk: int, threads: int, steps: int) -> list[dict]:
    names_file = OUT / "coop_memory_classnames.json"
    names_file.write_text(json.dumps(names))
    rows = []
    for c in (None, chunk):
        code = MEMORY_CHILD.format(here=str(HERE), threads=threads, names=str(names_file), spec=spec, chunk=c, steps=steps)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append({"class_chunk": c, "classes": len(names), **json.loads(res.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model spec; default: a random small CLIP built here")
    ap.add_argument("--task", default="emoji-group")
    ap.add_argument("--data-dir", default="sample")
    ap.add_argument("--seed", type=int, default=1, help="the 16-shot draw (and the pair's seed without --pair-seeds)")
    ap.add_argument("--pair-seeds", type=int, nargs="+", default=None,
                    help="run one vlkit/reference pair per seed (learner init, batch order, augmentation)")
    ap.add_argument("--out-name", default="coop_speed", help="output stem under bench/out/")
    ap.add_argument("--epochs", type=int, default=None, help="default: the paper's 200 for 16 shots")
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--views", type=int, nargs="+", default=[8], help="cached views per image; several = one cached run each")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for both paths)")
    ap.add_argument("--memory-task", default="emoji-label")
    ap.add_argument("--memory-data-dir", default=None, help="data dir holding the full emoji-label task")
    ap.add_argument("--class-chunk", type=int, default=128)
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--vlkit-only", action="store_true",
                    help="only the cached path (e.g. to measure the spread over --aug-seed); writes <out-name>_vlkit-<views>v-aug<seed>.json")
    ap.add_argument("--reference-only", action="store_true",
                    help="only the reference loop; writes <out-name>_reference-aug<seed>.json")
    ap.add_argument("--aug-seed", type=int, default=None, help="augmentation seed of either path (default: --seed)")
    args = ap.parse_args()

    from vlkit.adapt.coop import CoOpConfig
    from vlkit.adapt.prompt_learner import PromptOptions
    from vlkit.data.fewshot import load_fewshot
    from vlkit.data.images import load_image
    from vlkit.data.tasks import load_task

    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    task = load_fewshot(load_task(args.task, args.data_dir), 16, args.seed)
    big = None if args.no_memory else load_task(args.memory_task, args.memory_data_dir, write=False)
    # the random model's BPE learns every class name of both tasks as whole words
    model, model_desc = get_model(args.model, task.classnames + (big.classnames if big else []), 0)
    record: dict = {"model": model_desc, "fingerprint": model.fingerprint(), "task": task.name, "threads": args.threads,
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"}
    if not args.memory_only:
        train_images = [load_image(p) for p in task.paths("train")]
        test_images = [load_image(p) for p in task.paths("test")]
        config = CoOpConfig(prompt=PromptOptions(n_ctx=args.n_ctx), epochs=args.epochs, seed=args.seed)
        common = (model, task.classnames, train_images, task.labels("train"), test_images, task.labels("test"))
        record["config"] = {**config.to_dict(), "views": args.views, "shots": 16,
                            "train_images": len(train_images), "test_images": len(test_images), "classes": task.num_classes}
        if args.reference_only or args.vlkit_only:
            aug_seed = args.seed if args.aug_seed is None else args.aug_seed
            record["aug_seed"] = aug_seed
            name = "reference" if args.reference_only else "vlkit"
            record[name] = (run_reference(*common, config, seed=aug_seed) if args.reference_only
                            else run_vlkit(*common, config, views=args.views[0], seed=aug_seed))
            print(name, record[name], flush=True)
            stem = f"reference-aug{aug_seed}" if args.reference_only else f"vlkit-{args.views[0]}v-aug{aug_seed}"
            (OUT / f"{args.out_name}_{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
            return
        # Per seed: the cached path at each view count, then the reference. The seed fixes the
        # learner init, batch order and augmentation draws (the 16-shot draw stays --seed's).
        record["pairs"] = []
        for seed in args.pair_seeds or [args.seed]:
            cfg = replace(config, seed=seed)
            pair: dict = {"seed": seed, "vlkit": {}}
            for v in args.views:
                pair["vlkit"][str(v)] = run_vlkit(*common, cfg, views=v, seed=seed)
                print(seed, f"vlkit {v} views", pair["vlkit"][str(v)], flush=True)
            pair["reference"] = run_reference(*common, cfg, seed=seed)
            print(seed, "reference", pair["reference"], flush=True)
            record["pairs"].append(pair)
        ref = record["pairs"]
        record["by_views"] = {
            str(v): {
                "speedup_total": sum(p["reference"]["total_s"] for p in ref) / sum(p["vlkit"][str(v)]["total_s"] for p in ref),
                "mean_accuracy": sum(p["vlkit"][str(v)]["accuracy"] for p in ref) / len(ref),
                "mean_gap_points": 100 * sum(p["vlkit"][str(v)]["accuracy"] - p["reference"]["accuracy"] for p in ref) / len(ref),
            }
            for v in args.views
        }
        record["reference_mean_accuracy"] = sum(p["reference"]["accuracy"] for p in ref) / len(ref)
    if big is not None:
        record["memory"] = memory_rows(args.model, big.classnames, args.class_chunk, args.threads, args.memory_steps)
        print("memory", record["memory"], flush=True)
    (OUT / f"{args.out_name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (OUT / f"{args.out_name}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(r: dict) -> str:
    lines = [f"Model: {r['model']}; task {r['task']}; {r['machine']}.", ""]
    if "pairs" in r:
        c = r["config"]
        ref = r["pairs"][0]["reference"]
        lines += [
            f"CoOp 16 shots, M={c['prompt']['n_ctx']} end, unified, {ref['epochs']} epochs, batch {c['batch_size']}, "
            f"{c['classes']} classes, {c['train_images']} train / {c['test_images']} test images.",
            "",
            "| seed | path | cache views (s) | train (s) | eval (s) | total (s) | test top-1 |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for p in r["pairs"]:
            rows = [("reference loop", p["reference"])] + [(f"vlkit, {v} cached views", x) for v, x in p["vlkit"].items()]
            for label, x in rows:
                lines.append(f"| {p['seed']} | {label} | {x['cache_views_s']:.1f} | {x['train_s']:.1f} | {x['eval_s']:.1f} | "
                             f"{x['total_s']:.1f} | {100 * x['accuracy']:.2f}% |")
        lines += ["", f"Over {len(r['pairs'])} seed(s); reference mean top-1 {100 * r['reference_mean_accuracy']:.2f}%.", "",
                  "| cached views | speed-up (total wall time) | mean top-1 | mean gap to reference (points) |",
                  "|---:|---:|---:|---:|"]
        for v, x in r["by_views"].items():
            lines.append(f"| {v} | {x['speedup_total']:.1f}x | {100 * x['mean_accuracy']:.2f}% | {x['mean_gap_points']:+.2f} |")
        lines.append("")
    if "memory" in r:
        lines += ["| classes | class chunk | peak RSS (MiB) | RSS after model load (MiB) | s / step | prompt length |", "|---:|---:|---:|---:|---:|---:|"]
        for m in r["memory"]:
            lines.append(f"| {m['classes']} | {m['class_chunk'] or 'all'} | {m['peak_rss_mib']:.0f} | {m['model_loaded_rss_mib']:.0f} | {m['step_s']:.2f} | {m['seq_len']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

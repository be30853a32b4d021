"""CoOp 16 shots at 10, 100 and 1,000 classes: vlkit (cached views + shared prefix) vs the reference loop.

The question (issue 15): where the text tower is the cost (many classes), how much
wall time does vlkit's CoOp take next to the reference code's loop, with identical
logits? A full 16-shot run at 1,000 classes is 50 epochs x 500 steps; the reference
loop would take about a day on two cores, so each path's costs are measured per
unit, side by side in one process, and multiplied by the recipe's counts:

- reference: per training step, a fresh random resized crop + flip of 32 decoded
  images, the image tower on them, then the text tower on every class prompt padded
  to the tokenizer's full context length (77), backward, SGD step; for evaluation the
  prompts are re-encoded for every test batch of 100 (Dassl's test loop).
- vlkit: `augmented_features` encodes V views per training image once (V = the
  default min(64, epochs)); a step samples one cached view per image and runs the
  text tower only, on prompts cut to the longest one, through the shared-prefix path
  (the [SOS] + 16 context states once, then each class's name, period and EOT); the
  evaluation classifier is computed once. The same step through the full pass is
  timed too ("vlkit, full pass"), to show what the shared prefix adds.
- both encode the test images once (same cost; included in both totals).

Recipe counts (CoOp): 16 shots per class, batch 32, 200 epochs (50 from 1,000
classes on, CoOp's ImageNet rule), 50 test images per class (ImageNet's val).
Class names: the first C names of the emoji-label task (1,906 real emoji names,
1-13 tokens each) after a fixed shuffle. Images: emoji-label training images cycled
(their content does not change the cost). Model: the random CLIP with ViT-B/16's
cost balance of bench/coop_speed.py (text 2x128 with 77 positions, vision 2x192 at
128 px / patch 8), its BPE trained on these names. Identical logits: after the
timed steps, the shared-prefix and full-pass classifiers of the same context are
compared (max abs logit difference on test features), and 5 training steps from one
init through each path are compared (max abs context difference).

    .venv/bin/python bench/coop_classes_speed.py --data-dir ~/.cache/vlkit/data      # as recorded
    .venv/bin/python bench/coop_classes_speed.py --data-dir ~/.cache/vlkit/data --classes 10 --steps 2   # quick look

Writes bench/out/<out-name>.{json,md} (default coop_classes_speed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

SHOTS, BATCH, TEST_PER_CLASS, EVAL_BATCH = 16, 32, 50, 100


def timed(fn, repeats: int) -> float:
    """Mean seconds of `fn()` over `repeats` calls, after one untimed warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(model, names: list[str], images: list, args) -> dict:
    from vlkit.adapt.coop import CoOpConfig, classifier_weights, coop_loss_backward, epochs_for_shots, freeze, make_optimizer
    from vlkit.adapt.features import AugmentOptions, augment, augmented_features
    from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
    from vlkit.adapt import DEFAULT_VIEWS

    c = len(names)
    freeze(model)
    config = CoOpConfig(prompt=PromptOptions(n_ctx=16))
    epochs = epochs_for_shots(SHOTS, c)
    views = min(DEFAULT_VIEWS, epochs)
    n_train, n_test = SHOTS * c, TEST_PER_CLASS * c
    steps = epochs * (n_train // BATCH)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (BATCH,), generator=gen)
    size = int(model.preprocess.image_size)
    scale = model.logit_scale.detach()

    def learner(**opts) -> PromptLearner:
        return PromptLearner(model, names, PromptOptions(n_ctx=16, **opts), generator=torch.Generator().manual_seed(1))

    # reference: a step = 32 fresh crops through the image tower + all prompts at full length, backward, step
    ref = learner(truncate=False, shared_prefix=False)
    ref_opt = make_optimizer([ref.ctx], config)
    aug, aug_gen = AugmentOptions(seed=1), torch.Generator().manual_seed(1)

    def ref_step() -> None:
        with torch.no_grad():
            px = torch.stack([model.preprocess(augment(images[i % len(images)], size, aug, aug_gen)) for i in range(BATCH)])
            img = model.encode_image(px)
        loss = F.cross_entropy(scale * img @ ref.text_features(model).t(), labels)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()

    feats = F.normalize(torch.randn(BATCH, model.embed_dim, generator=gen), dim=-1)

    def vlkit_step(lrn: PromptLearner, opt) -> None:
        opt.zero_grad(set_to_none=True)
        coop_loss_backward(model, lrn, feats, labels)
        opt.step()

    fast, full = learner(), learner(shared_prefix=False)
    assert fast.text_path(model) == "shared-prefix" and full.text_path(model) == "full"
    fast_opt, full_opt = make_optimizer([fast.ctx], config), make_optimizer([full.ctx], config)
    reps = max(1, args.steps)
    row: dict = {"classes": c, "epochs": epochs, "views": views, "train_images": n_train, "test_images": n_test, "steps": steps}
    row["ref_step_s"] = timed(ref_step, reps)
    row["vlkit_step_s"] = timed(lambda: vlkit_step(fast, fast_opt), reps * 3)
    row["vlkit_full_step_s"] = timed(lambda: vlkit_step(full, full_opt), reps)

    # image work: vlkit's view cache (per image-view), the test images (per image, both paths)
    pool = images[: args.cache_images]
    t0 = time.perf_counter()
    augmented_features(model, pool, AugmentOptions(views=2, seed=1), batch_size=64)
    row["cache_view_s"] = (time.perf_counter() - t0) / (2 * len(pool))
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(pool), EVAL_BATCH):
            model.encode_image(torch.stack([model.preprocess(im) for im in pool[i : i + EVAL_BATCH]]))
    row["test_image_s"] = (time.perf_counter() - t0) / len(pool)

    # text work of evaluation: the reference re-encodes all prompts per test batch, vlkit once
    with torch.no_grad():
        row["ref_eval_text_s"] = timed(lambda: ref.text_features(model), 1)
        row["vlkit_classifier_s"] = timed(lambda: classifier_weights(model, fast), 1)

    eval_batches = math.ceil(n_test / EVAL_BATCH)
    test_images_s = n_test * row["test_image_s"]
    row["ref_total_s"] = steps * row["ref_step_s"] + eval_batches * row["ref_eval_text_s"] + test_images_s
    row["vlkit_total_s"] = n_train * views * row["cache_view_s"] + steps * row["vlkit_step_s"] + row["vlkit_classifier_s"] + test_images_s
    row["vlkit_full_total_s"] = row["vlkit_total_s"] + steps * (row["vlkit_full_step_s"] - row["vlkit_step_s"])
    row["speedup"] = row["ref_total_s"] / row["vlkit_total_s"]
    row["speedup_full_pass"] = row["ref_total_s"] / row["vlkit_full_total_s"]
    row["step_speedup_shared_prefix"] = row["vlkit_full_step_s"] / row["vlkit_step_s"]

    # identical logits: one context, both classifiers; 5 steps from one init through each path
    with torch.no_grad():
        full.ctx.copy_(fast.ctx)
    test = F.normalize(torch.randn(256, model.embed_dim, generator=gen), dim=-1)
    with torch.no_grad():
        a = scale * test @ classifier_weights(model, fast).t()
        b = scale * test @ classifier_weights(model, full).t()
    row["logit_max_abs_diff"] = float((a - b).abs().max())
    row["logit_argmax_agree"] = float((a.argmax(1) == b.argmax(1)).float().mean())
    one, two = learner(), learner(shared_prefix=False)
    opt1, opt2 = make_optimizer([one.ctx], config), make_optimizer([two.ctx], config)
    for _ in range(5):
        vlkit_step(one, opt1)
        vlkit_step(two, opt2)
    row["ctx_max_abs_diff_5_steps"] = float((one.ctx - two.ctx).abs().max())
    print(json.dumps(row), flush=True)
    return row


def markdown(r: dict) -> str:
    lines = [f"Model: {r['model']}; {r['machine']}.", "",
             "Per-unit costs measured side by side in one process; totals = the recipe's counts x those costs "
             "(16 shots, batch 32, 200 epochs; 50 from 1,000 classes; 50 test images per class).", "",
             "| classes | epochs | views | ref s/step | vlkit s/step (shared prefix) | vlkit s/step (full pass) | cache s/view | "
             "ref total (h) | vlkit total (h) | **speed-up** | speed-up without shared prefix | max abs logit diff | ctx diff after 5 steps |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(
            f"| {x['classes']} | {x['epochs']} | {x['views']} | {x['ref_step_s']:.3f} | {x['vlkit_step_s']:.4f} | {x['vlkit_full_step_s']:.4f} | "
            f"{x['cache_view_s'] * 1000:.2f} ms | {x['ref_total_s'] / 3600:.2f} | {x['vlkit_total_s'] / 3600:.2f} | **{x['speedup']:.1f}x** | "
            f"{x['speedup_full_pass']:.1f}x | {x['logit_max_abs_diff']:.1e} | {x['ctx_max_abs_diff_5_steps']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="data dir holding the full emoji-label task (vlkit data build emoji)")
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--steps", type=int, default=3, help="timed reference steps per class count (vlkit: 3x as many)")
    ap.add_argument("--cache-images", type=int, default=192, help="images whose view encoding is timed")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out-name", default="coop_classes_speed")
    args = ap.parse_args()

    from coop_speed import build_small_clip

    from vlkit.data.images import load_image
    from vlkit.data.tasks import load_task
    from vlkit.models import load_model

    torch.set_num_threads(args.threads)
    task = load_task("emoji-label", args.data_dir, write=False)
    names = list(task.classnames)
    random.Random(0).shuffle(names)
    folder = OUT / "coop-classes-clip-small-random"
    if not (folder / "config.json").exists():
        build_small_clip(folder, [t.format(n) for n in names for t in ("a photo of a {}.", "{}.")] + ["x"] * 4, seed=0)
    model = load_model(str(folder))
    images = [load_image(p) for p in task.paths("train")[: max(args.cache_images, BATCH)]]
    record = {"model": "random CLIP 'small' (text 2x128 / 77 positions, vision 2x192 at 128 px / patch 8, BPE on the names)",
              "machine": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}",
              "args": vars(args), "rows": []}
    for c in args.classes:
        record["rows"].append(measure(model, names[:c], images, args))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out_name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (OUT / f"{args.out_name}.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()

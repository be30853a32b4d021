"""`vlkit coop train|words` and `vlkit predict --prompt`: CoOp from the command line.

`coop train` learns a prompt on a benchmark task's K-shot split (`--task`) or on
a labelled folder/table of the user's own images (`--data`, every readable image
used; unreadable ones are skipped and listed, as zero-shot does), evaluates it
once on the test split (a task) and writes a run folder: config, metrics, the
prompt (safetensors + JSON) and its nearest words. `predict` classifies new images
with a saved prompt, for its own classes or, for a unified-context prompt, new
class names (`--classes`), and writes predictions.csv/.json (and an accuracy
summary when `--data` gives labels) to a run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlkit.adapt import DEFAULT_VIEWS

coop_app = typer.Typer(no_args_is_help=True, help="CoOp prompt learning: train a prompt, read it back.")


def register(app: typer.Typer) -> None:
    app.add_typer(coop_app, name="coop")
    app.command(name="predict")(predict)


@coop_app.command("train")
def train(
    model: str = typer.Option("vlkit-tiny", "--model", help="Model spec: CLIP folder or id, dual-encoder folder, open_clip:NAME, vlkit-tiny."),
    task: Optional[str] = typer.Option(None, "--task", help="Benchmark task name (e.g. emoji-group; `vlkit data info NAME` describes one); uses its K-shot split and test split."),
    data: Optional[Path] = typer.Option(None, "--data", help="Your own labelled images instead of a task: folder (one subfolder per class) or CSV/JSONL."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Data dir of built datasets ('sample' = the bundled sample)."),
    shots: int = typer.Option(16, "--shots", min=1, help="Images per class (with --task)."),
    seed: int = typer.Option(1, "--seed", help="Seed of the shot draw, context init, batch order and views."),
    n_ctx: int = typer.Option(16, "--n-ctx", min=1, help="Number of context vectors M (ignored with --ctx-init)."),
    ctx_init: Optional[str] = typer.Option(None, "--ctx-init", help="Initialise the context from this phrase, e.g. 'a photo of a'."),
    position: str = typer.Option("end", "--position", help="Class token position: end, middle or front."),
    csc: bool = typer.Option(False, "--csc", help="Class-specific context instead of one unified context."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Default by shots: 50 (1), 100 (2-4), 200 (8+)."),
    lr: float = typer.Option(0.002, "--lr", help="SGD learning rate after the warm-up epoch."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or amp (fp32 master context in every case)."),
    views: Optional[int] = typer.Option(
        None, "--views", min=1,
        help=f"Augmented views cached per training image (default {DEFAULT_VIEWS}, or the epoch count when smaller: "
        "a run cannot use more than one view per image per epoch).",
    ),
    no_flip: bool = typer.Option(False, "--no-flip", help="No horizontal flips (flags, text, arrows)."),
    class_chunk: Optional[int] = typer.Option(None, "--class-chunk", min=1, help="Classes per text-encoder pass (bounded memory for many classes)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder."),
    top_words: int = typer.Option(3, "--words", min=1, help="Nearest vocabulary tokens reported per context vector."),
) -> None:
    """Learn a CoOp prompt; write config.json, metrics.json, prompt/ and nearest_words.txt."""
    from vlkit.adapt.coop import PRECISIONS, CoOpConfig
    from vlkit.adapt.prompt_learner import PromptOptions
    from vlkit.commands import validate
    from vlkit.errors import VlkitError

    if (task is None) == (data is None):
        raise VlkitError("coop train: give exactly one of --task NAME or --data PATH")
    if data is not None and not data.exists():
        raise VlkitError(f"{data}: data path does not exist; give an image folder or a .csv/.jsonl table")
    validate.positive("--lr", lr)
    validate.choice("--position", position, ("end", "middle", "front"))
    validate.choice("--precision", precision, PRECISIONS)
    if ctx_init is not None and not ctx_init.strip():
        raise VlkitError("--ctx-init: empty; give a phrase such as 'a photo of a', or leave it out for a random context")
    validate.out_folder("--out", out)
    device = validate.device("--device", device)
    config = CoOpConfig(
        prompt=PromptOptions(n_ctx=n_ctx, ctx_init=ctx_init, position=position, csc=csc),  # type: ignore[arg-type]
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        precision=precision,  # type: ignore[arg-type]
        seed=seed,
        class_chunk=class_chunk,
    )
    if task is not None:
        from vlkit.data.fewshot import load_fewshot
        from vlkit.data.tasks import load_task

        t = load_fewshot(load_task(task, data_dir), shots, seed)
        classnames = t.classnames
        train_paths, train_labels = [str(p) for p in t.paths("train")], list(t.labels("train"))
        test_paths, test_labels = [str(p) for p in t.paths("test")], t.labels("test")
        where = f"task {task}"
    else:
        from vlkit import zeroshot as zs

        items = zs.as_labeled_images(data)
        if items.labels is None or not items.classnames:
            raise VlkitError(f"{data}: no labels found; use one subfolder per class or a label column")
        classnames = zs.check_classnames(items.classnames, source=f"class list of {data}")
        train_paths, train_labels = items.paths, items.labels
        test_paths, test_labels = [], []
        where = str(data)
    train_paths, train_labels, skipped = _readable_training_images(where, train_paths, train_labels, classnames)

    from vlkit import runs
    from vlkit.adapt.coop import run_epochs
    from vlkit.adapt.features import AugmentOptions
    from vlkit.models import load_model

    if views is None:
        views = min(DEFAULT_VIEWS, run_epochs(epochs, shots if task else None, len(train_labels), len(classnames)))

    runs.seed_everything(seed)
    vl = load_model(model, device=device)
    result = fit_and_evaluate(
        vl, classnames, train_paths, train_labels, test_paths, test_labels, config,
        AugmentOptions(views=views, flip=not no_flip, seed=seed), shots=shots if task else None,
    )
    result["metrics"]["train_images"] = len(train_paths)
    result["metrics"]["train_skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    run_dir = runs.new_run_dir(out, "coop")
    settings = {"model": model, "task": task, "data": data, "data_dir": data_dir, "shots": shots, "views": views,
                "flip": not no_flip, "device": device, **config.to_dict()}
    runs.write_config(run_dir, settings, command="coop train", model_fingerprint=vl.fingerprint(), classnames=classnames,
                      text_path=result["result"].learner.text_path(vl))
    save_run(run_dir, vl, result, top_words)


def _readable_training_images(where: str, paths: list[str], labels: list[int], classnames: list[str]):
    """Keep the training images that decode, list the rest, and refuse a task that no longer makes sense.

    Every class needs an image (else its prompt is never trained) and there must be two
    classes (one class has nothing to tell apart). Checked before any model loads.
    """
    from rich.console import Console

    from vlkit.data.images import readable_images
    from vlkit.errors import VlkitError

    if len(classnames) < 2:
        raise VlkitError(f"{where}: has one class ({classnames[0]!r}); prompt learning needs at least two classes to tell apart")
    ok, skipped = readable_images(paths)
    if skipped:
        console = Console(stderr=True)
        console.print(f"skipped {len(skipped)} unreadable training images (listed in metrics.json):", markup=False, highlight=False)
        for p, reason in skipped[:20]:
            console.print(f"  {p}: {reason}", markup=False, highlight=False)
        if len(skipped) > 20:
            console.print(f"  ... and {len(skipped) - 20} more", markup=False)
    keep = set(ok)
    pairs = [(p, y) for p, y in zip(paths, labels) if p in keep]
    present = {y for _, y in pairs}
    empty = [name for i, name in enumerate(classnames) if i not in present]
    if empty:
        raise VlkitError(
            f"{where}: no readable training image left for class{'es' if len(empty) > 1 else ''} "
            f"{', '.join(repr(n) for n in empty[:5])}{' ...' if len(empty) > 5 else ''}; add images or remove the class"
        )
    return [p for p, _ in pairs], [y for _, y in pairs], skipped


def fit_and_evaluate(vl, classnames, train_paths, train_labels, test_paths, test_labels, config, augment, shots=None) -> dict:
    """Cache augmented views, train, and score the test images once with the learned classifier."""
    import math

    import torch

    from vlkit.adapt.coop import classifier_weights, prompt_logits, train_coop
    from vlkit.adapt.features import augmented_features
    from vlkit.features import extract_image_features
    from vlkit.metrics import classification_metrics
    from vlkit.zeroshot import default_cache_dir

    feats = augmented_features(vl, train_paths, augment, cache_dir=default_cache_dir(), progress=True)
    result = train_coop(vl, classnames, feats, torch.tensor(train_labels), config, shots=shots, progress=True)
    metrics: dict = {"epochs": result.epochs, "train_seconds": round(result.seconds, 3), "history": result.history}
    if not all(math.isfinite(h["loss"]) for h in result.history):
        from vlkit.errors import VlkitError

        raise VlkitError(f"training diverged (loss {result.history[-1]['loss']}); lower --lr (now {config.lr})")
    if test_paths:
        test = extract_image_features(vl, test_paths, progress=True)
        kept = set(test.paths)
        labels = [y for p, y in zip(test_paths, test_labels) if p in kept]
        classifier = classifier_weights(vl, result.learner, chunk_size=config.class_chunk, precision=config.precision)
        scores = prompt_logits(vl, test.features.to(classifier.device), classifier).cpu()
        metrics["test"] = classification_metrics(scores, labels, classnames)
        metrics["test"]["num_skipped"] = len(test.skipped)
        # the hand-written prompt CoOp replaces, on the same test features, for comparison
        from vlkit.zeroshot import SINGLE_TEMPLATE, logits as zs_logits, zeroshot_classifier

        zs = zs_logits(vl, test.features, zeroshot_classifier(vl, classnames, "photo", cache=False)).cpu()
        metrics["zeroshot_test_top1"] = {"template": SINGLE_TEMPLATE, "top1": classification_metrics(zs, labels, classnames)["top1"]}
    return {"result": result, "metrics": metrics}


def save_run(run_dir: Path, vl, fitted: dict, top_words: int) -> None:
    from rich.console import Console

    from vlkit import io, runs
    from vlkit.adapt import interpret, prompt_io

    result, metrics = fitted["result"], fitted["metrics"]
    near = interpret.nearest_tokens(vl, result.learner.ctx, k=top_words)
    words = interpret.describe(near, result.learner.classnames)
    io.write_text(run_dir / "nearest_words.txt", words + "\n")
    io.write_json(run_dir / "nearest_words.json", interpret.as_json(near))
    prompt_io.save_prompt(run_dir / "prompt", result.learner, vl, extra={"training": {"epochs": result.epochs, "seed": result.config.seed}})
    runs.write_metrics(run_dir, metrics)
    console = Console()
    last = metrics["history"][-1]
    console.print(f"CoOp: {result.epochs} epochs in {metrics['train_seconds']:.1f} s; final loss {last['loss']:.4f}, train acc {100 * last['train_acc']:.1f}%")
    if "test" in metrics:
        console.print(f"test top-1 {100 * metrics['test']['top1']:.2f}% on {metrics['test']['n']} images "
                      f"(zero-shot '{metrics['zeroshot_test_top1']['template']}': {100 * metrics['zeroshot_test_top1']['top1']:.2f}%)")
    if result.learner.options.csc:  # one summary line per class; the full table is in nearest_words.txt
        summary = [f"{name}: {' '.join(interpret.clean_token(row[0].token) for row in rows)}"
                   for name, rows in zip(result.learner.classnames, near)]
        console.print("nearest words per class:\n" + "\n".join(summary[:10]) + ("\n..." if len(summary) > 10 else ""))
    else:
        console.print(words)
    console.print(f"prompt: {run_dir / 'prompt'}\nrun folder: {run_dir}")


@coop_app.command("words")
def words(
    prompt: Path = typer.Option(..., "--prompt", help="A saved prompt (folder or .safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", help="Defaults to the backbone recorded in the prompt."),
    k: int = typer.Option(3, "--k", min=1, help="Nearest tokens per context vector."),
) -> None:
    """Print the nearest vocabulary tokens of each learned context vector (Euclidean distance)."""
    from vlkit.adapt import interpret, prompt_io
    from vlkit.models import load_model

    saved = prompt_io.load_prompt(prompt)
    vl = load_model(model or saved.backbone)
    prompt_io.check_backbone(saved, vl, where=f"prompt '{prompt}'")
    print(interpret.describe(interpret.nearest_tokens(vl, saved.ctx, k=k), saved.classnames))


def predict(
    prompt: Path = typer.Option(..., "--prompt", help="A saved CoOp prompt (folder or .safetensors)."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image files or folders (searched recursively); repeat the flag for several."),
    data: Optional[Path] = typer.Option(None, "--data", help="Instead of --images: a labelled folder (one subfolder per class) or CSV/JSONL table; adds an accuracy summary."),
    classes: Optional[str] = typer.Option(None, "--classes", help="New class names: a text file (one per line) or a comma list. Unified-context prompts only."),
    model: Optional[str] = typer.Option(None, "--model", help="Defaults to the backbone recorded in the prompt."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Classes listed per image, best first."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder (predictions.csv, predictions.json, metrics.json)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option(
        "fp32", "--precision",
        help="fp32 (default), bf16 (bfloat16 autocast) or int8 (dynamic int8 Linear layers of the image tower; "
        "--device cpu only). Image features are cached per precision.",
    ),
) -> None:
    """Classify images with a learned prompt (its classes, or new ones for a unified prompt); prints a summary."""
    from vlkit import precision as precisions
    from vlkit.adapt import prompt_io
    from vlkit.commands import validate
    from vlkit.errors import VlkitError

    if (images is None) == (data is None):
        raise VlkitError("vlkit predict: give exactly one of --images PATH.. or --data PATH (labelled)")
    precisions.check(precision)
    validate.out_folder("--out", out)
    device = validate.device("--device", device)
    precisions.check_device(precision, device)
    saved = prompt_io.load_prompt(prompt)
    names = None
    if classes is not None:
        from vlkit import zeroshot as zs

        names = zs.load_classnames(classes) if Path(classes).is_file() else zs.check_classnames(
            [c.strip() for c in classes.split(",") if c.strip()], source="--classes")
    labels = None
    if images is not None:
        paths = _image_paths(images)
    else:
        from vlkit import zeroshot as zs

        validate.existing("--data", data)
        items = zs.as_labeled_images(data, names or saved.classnames)
        paths, labels = items.paths, items.labels
        if labels is None:
            raise VlkitError(f"--data {data}: has no labels; use --images for unlabelled images")

    from vlkit import runs
    from vlkit.adapt.coop import classifier_weights, prompt_logits
    from vlkit.features import extract_image_features
    from vlkit.models import load_model

    note = precisions.advice(precision, device)
    if note:
        import sys

        print(note, file=sys.stderr)
    vl = load_model(model or saved.backbone, device=device)
    prompt_io.check_backbone(saved, vl, where=f"prompt '{prompt}'")
    learner = prompt_io.learner_from_saved(vl, saved, names).to(vl.device)
    feats = extract_image_features(vl, paths, progress=False, precision=precision)
    if not feats.paths:
        first = f" (first: {feats.skipped[0][0]}: {feats.skipped[0][1]})" if feats.skipped else ""
        raise VlkitError(f"none of the {len(paths)} images could be read{first}")
    with precisions.autocast(precision, vl.device):  # the text tower: bf16 autocast, fp32 otherwise (int8 quantises images only)
        classifier = classifier_weights(precisions.prepare(vl, precision, "text"), learner).float()
    logits = prompt_logits(vl, feats.features.to(classifier.device), classifier).cpu()
    kept = _kept_labels(paths, labels, feats.paths) if labels is not None else None
    run_dir = runs.new_run_dir(out, "predict")
    settings = {"prompt": str(prompt), "images": [str(p) for p in images or []], "data": str(data) if data else None,
                "classes": classes, "model": model or saved.backbone, "top_k": top_k, "device": device, "precision": precision}
    runs.write_config(run_dir, settings, command="predict", model_fingerprint=vl.fingerprint(), classnames=list(learner.classnames))
    metrics = write_predictions(run_dir, list(learner.classnames), feats.paths, logits, kept, feats.skipped, top_k)
    _print_predict_summary(metrics, run_dir)


def _image_paths(images: List[Path]) -> list[str]:
    from vlkit.data.datasets import find_images
    from vlkit.errors import VlkitError

    paths: list[str] = []
    for p in images:
        if p.is_dir():
            paths += [str(f) for f in find_images(p)]
        elif p.exists() or p.is_symlink():
            paths.append(str(p))  # a broken file or link is skipped and listed when read
        else:
            raise VlkitError(f"{p}: image path does not exist; pass image files or folders")
    if not paths:
        raise VlkitError(f"{', '.join(map(str, images))}: no image files found; pass .png/.jpg files or folders holding them")
    from vlkit.data.paths import check_path, split_paths

    if not split_paths(paths)[0]:  # every one a loop, dangling link or folder: known before the model loads
        raise VlkitError(f"{paths[0]}: {check_path(paths[0])}; no usable image path given")
    return paths


def _kept_labels(paths: list[str], labels: list[int], kept: list[str]) -> list[int]:
    """Labels of the images that were read, walking input and kept paths in step (a path may repeat)."""
    out, j = [], 0
    for p, y in zip(paths, labels):
        if j < len(kept) and kept[j] == p:
            out.append(y)
            j += 1
    return out


def write_predictions(run_dir: Path, classnames: list[str], paths: list[str], logits, labels: list[int] | None,
                      skipped: list, top_k: int) -> dict:
    """predictions.csv (one field per value: prediction, probability, label, correct, top-i class and
    probability), predictions.json (the same as objects) and metrics.json; return the metrics."""
    import csv

    from vlkit import io, runs
    from vlkit.metrics import classification_metrics

    probs = logits.softmax(-1)
    k = min(top_k, len(classnames))
    top_p, top_i = probs.topk(k, dim=-1)
    header = ["path", "prediction", "probability"] + (["label", "correct"] if labels is not None else [])
    for j in range(1, k + 1):
        header += [f"top{j}", f"top{j}_probability"]
    records = []
    for row, path in enumerate(paths):
        top = [{"class": classnames[int(i)], "probability": round(float(v), 6)} for v, i in zip(top_p[row], top_i[row])]
        rec = {"path": path, "prediction": top[0]["class"], "probability": top[0]["probability"]}
        if labels is not None:
            rec["label"] = classnames[labels[row]]
            rec["correct"] = rec["label"] == rec["prediction"]
        rec["top"] = top
        records.append(rec)
    with io.atomic_path(run_dir / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for rec in records:
            fields = [rec["path"], rec["prediction"], f"{rec['probability']:.6f}"]
            if labels is not None:
                fields += [rec["label"], int(rec["correct"])]
            for t in rec["top"]:
                fields += [t["class"], f"{t['probability']:.6f}"]
            w.writerow(fields)
    io.write_json(run_dir / "predictions.json", records)
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["prediction"]] = counts.get(rec["prediction"], 0) + 1
    metrics: dict = {"n": len(records), "num_skipped": len(skipped), "skipped": [{"path": str(p), "reason": str(r)} for p, r in skipped],
                     "predicted_counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}
    if labels is not None:
        metrics["accuracy"] = classification_metrics(logits, labels, classnames)
    runs.write_metrics(run_dir, metrics)
    return metrics


def _print_predict_summary(metrics: dict, run_dir: Path) -> None:
    """A few lines, not one per image: the files hold every prediction."""
    print(f"classified {metrics['n']} images ({metrics['num_skipped']} skipped)")
    common = list(metrics["predicted_counts"].items())[:5]
    print("most predicted: " + ", ".join(f"{name} ({n})" for name, n in common))
    if "accuracy" in metrics:
        acc = metrics["accuracy"]
        print(f"top-1 {100 * acc['top1']:.2f}%, top-5 {100 * acc['top5']:.2f}%, mean per-class recall "
              f"{100 * acc['mean_per_class_recall']:.2f}% on {acc['n']} labelled images")
    for s in metrics["skipped"][:5]:
        print(f"skipped {s['path']}: {s['reason']}")
    if metrics["num_skipped"] > 5:
        print(f"... and {metrics['num_skipped'] - 5} more skipped (listed in metrics.json)")
    print(f"predictions: {run_dir / 'predictions.csv'} (and predictions.json)")
    print(f"run folder: {run_dir}")

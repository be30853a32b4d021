"""`vlkit coop train|words` and `vlkit predict --prompt`: CoOp from the command line.

`coop train` learns a prompt on a benchmark task's K-shot split (`--task`) or on
a labelled folder/table of the user's own images (`--data`, every image used),
evaluates it once on the test split (a task) and writes a run folder: config,
metrics, the prompt (safetensors + JSON) and its nearest words. `predict`
classifies new images with a saved prompt, for its own classes or, for a
unified-context prompt, new class names (`--classes`).
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
    task: Optional[str] = typer.Option(None, "--task", help="Benchmark task name (see `vlkit data`); uses its K-shot split and test split."),
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
    from vlkit.adapt.coop import CoOpConfig
    from vlkit.adapt.prompt_learner import PromptOptions
    from vlkit.errors import VlkitError

    if (task is None) == (data is None):
        raise VlkitError("coop train: give exactly one of --task NAME or --data PATH")
    if data is not None and not data.exists():
        raise VlkitError(f"{data}: data path does not exist; give an image folder or a .csv/.jsonl table")
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
        train_paths, train_labels = [str(p) for p in t.paths("train")], t.labels("train")
        test_paths, test_labels = [str(p) for p in t.paths("test")], t.labels("test")
    else:
        from vlkit import zeroshot as zs

        items = zs.as_labeled_images(data)
        if items.labels is None or not items.classnames:
            raise VlkitError(f"{data}: no labels found; use one subfolder per class or a label column")
        classnames = zs.check_classnames(items.classnames, source=f"class list of {data}")
        train_paths, train_labels = items.paths, items.labels
        test_paths, test_labels = [], []

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
    run_dir = runs.new_run_dir(out, "coop")
    settings = {"model": model, "task": task, "data": data, "data_dir": data_dir, "shots": shots, "views": views,
                "flip": not no_flip, "device": device, **config.to_dict()}
    runs.write_config(run_dir, settings, command="coop train", model_fingerprint=vl.fingerprint(), classnames=classnames)
    save_run(run_dir, vl, result, top_words)


def fit_and_evaluate(vl, classnames, train_paths, train_labels, test_paths, test_labels, config, augment, shots=None) -> dict:
    """Cache augmented views, train, and score the test images once with the learned classifier."""
    import torch

    from vlkit.adapt.coop import classifier_weights, prompt_logits, train_coop
    from vlkit.adapt.features import augmented_features
    from vlkit.features import extract_image_features
    from vlkit.metrics import classification_metrics
    from vlkit.zeroshot import default_cache_dir

    feats = augmented_features(vl, train_paths, augment, cache_dir=default_cache_dir(), progress=True)
    result = train_coop(vl, classnames, feats, torch.tensor(train_labels), config, shots=shots, progress=True)
    metrics: dict = {"epochs": result.epochs, "train_seconds": round(result.seconds, 3), "history": result.history}
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

        zs = zs_logits(vl, test.features, zeroshot_classifier(vl, classnames, "single", cache=False)).cpu()
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
    images: List[Path] = typer.Option(..., "--images", help="Image files or folders (searched recursively); repeat the flag or pass several."),
    classes: Optional[str] = typer.Option(None, "--classes", help="New class names: a text file (one per line) or a comma list. Unified-context prompts only."),
    model: Optional[str] = typer.Option(None, "--model", help="Defaults to the backbone recorded in the prompt."),
    top_k: int = typer.Option(3, "--top-k", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="Write predictions.csv here (a file path)."),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Classify images with a learned prompt (its classes, or new ones for a unified prompt)."""
    import csv

    from vlkit import io
    from vlkit.adapt import prompt_io
    from vlkit.adapt.coop import classifier_weights, prompt_logits
    from vlkit.data.images import is_image_file
    from vlkit.errors import VlkitError

    saved = prompt_io.load_prompt(prompt)
    paths: list[str] = []
    for p in images:
        if p.is_dir():
            paths += sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file():
            paths.append(str(p))
        else:
            raise VlkitError(f"{p}: image path does not exist; pass image files or folders")
    if not paths:
        raise VlkitError(f"{', '.join(map(str, images))}: no image files found; pass .png/.jpg files or folders holding them")
    names = None
    if classes is not None:
        from vlkit import zeroshot as zs

        names = zs.load_classnames(classes) if Path(classes).is_file() else zs.check_classnames(
            [c.strip() for c in classes.split(",") if c.strip()], source="--classes")

    from vlkit.features import extract_image_features
    from vlkit.models import load_model

    vl = load_model(model or saved.backbone, device=device)
    prompt_io.check_backbone(saved, vl, where=f"prompt '{prompt}'")
    learner = prompt_io.learner_from_saved(vl, saved, names).to(vl.device)
    feats = extract_image_features(vl, paths, progress=False)
    classifier = classifier_weights(vl, learner)
    probs = prompt_logits(vl, feats.features.to(classifier.device), classifier).softmax(-1).cpu()
    k = min(top_k, learner.n_cls)
    top_p, top_i = probs.topk(k, dim=-1)
    rows = [[p, *[f"{learner.classnames[int(i)]}:{float(v):.4f}" for v, i in zip(pv, iv)]] for p, pv, iv in zip(feats.paths, top_p, top_i)]
    for r in rows:
        print("\t".join(r))
    for p, reason in feats.skipped:
        print(f"skipped\t{p}\t{reason}")
    if out is not None:
        with io.atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", *[f"top{j + 1}" for j in range(k)]])
            w.writerows(rows)

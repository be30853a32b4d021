"""`vlkit zeroshot`: classify a folder, a table or a task split of images from class names alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command(name="zeroshot")(zeroshot)


def zeroshot(
    model: str = typer.Option(..., "--model", help="Model spec: CLIP folder or id, dual-encoder folder, open_clip:NAME, vlkit-tiny."),
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder (one subfolder per class) or a CSV/JSONL table with image and label columns."),
    task: Optional[str] = typer.Option(None, "--task", help="Instead of --data: a task by name (e.g. emoji-group), with its class names and templates."),
    split: str = typer.Option("test", "--split", help="With --task: which split to classify (train, val, test)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="With --task: the data dir ('sample' = the bundled sample; default $VLKIT_DATA or ~/.cache/vlkit/data)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Text file, one class name per line (default: the dataset's classes)."),
    image_col: Optional[str] = typer.Option(None, "--image-col", help="Table column with image paths (default: image, path, file, ...)."),
    label_col: Optional[str] = typer.Option(None, "--label-col", help="Table column with labels (default: label, class, category, ...)."),
    templates: Optional[str] = typer.Option(
        None,
        "--templates",
        help="'photo' (a photo of a {}.), 'ensemble' (OpenAI's 80), with --task 'task-first' (the task's hand-written "
        "prompt: the benchmark's zeroshot row) or 'task' (all its templates, ensembled), or a file. "
        "Default: 'task' with --task, else 'photo'.",
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the image-feature and text-classifier caches."),
    seed: int = typer.Option(0, "--seed", help="Recorded and applied; zero-shot itself draws no random numbers."),
    precision: str = typer.Option(
        "fp32", "--precision",
        help="fp32 (default), bf16 (both towers under bfloat16 autocast) or int8 (dynamic int8 Linear layers of the "
        "image tower, CPU; the text tower stays fp32). Features are cached per precision.",
    ),
) -> None:
    """Zero-shot classification: writes config.json, metrics.json and predictions.csv to a run folder."""
    from vlkit import runs, zeroshot as zs
    from vlkit.commands import validate
    from vlkit.errors import VlkitError

    # Cheap checks first, so a typo fails in a second, before any model loads or any output is made.
    from vlkit import precision as precisions

    if (data is None) == (task is None):
        raise VlkitError("zeroshot: pass exactly one of --data PATH (image folder or table) and --task NAME")
    precisions.check(precision)
    validate.at_least("--batch-size", batch_size)
    validate.out_folder("--out", out)
    classnames = zs.load_classnames(classes) if classes is not None else None
    if task is not None:
        from vlkit.data.tasks import load_task

        t = load_task(task, data_dir)
        items = zs.task_images(t, split, classnames)
        templates = templates or "task"
        template_list = zs.resolve_templates(templates, task_templates=t.templates)
        source = f"task {task}"
    else:
        assert data is not None
        if not data.exists():
            raise VlkitError(f"{data}: data path does not exist; give an image folder or a .csv/.jsonl table")
        templates = templates or "photo"
        template_list = zs.resolve_templates(templates)
        items = zs.as_labeled_images(data, classnames, image_col=image_col, label_col=label_col)
        source = str(data)
    if not items.classnames:
        raise VlkitError(f"{source}: class list is empty (the data has no labels); pass --classes FILE with one name per line")
    zs.check_classnames(items.classnames, source=f"class list of {classes or source}")

    from vlkit.models import load_model  # torch and transformers load only once the inputs are known good

    note = precisions.advice(precision)
    if note:
        import sys

        print(note, file=sys.stderr)
    runs.seed_everything(seed)
    vl = load_model(model)
    result = zs.classify(vl, items, items.classnames, template_list, batch_size=batch_size, cache=not no_cache, precision=precision)
    run_dir = runs.new_run_dir(out, "zeroshot")
    settings = {
        "model": model,
        "data": str(data) if data is not None else None,
        "task": task,
        "split": split if task is not None else None,
        "data_dir": data_dir,
        "classes": str(classes) if classes else None,
        "image_col": image_col,
        "label_col": label_col,
        "templates": templates,
        "batch_size": batch_size,
        "cache": not no_cache,
        "seed": seed,
        "precision": precision,
        "out": str(out),
    }
    extra = {"task_fingerprint": t.fingerprint} if task is not None else {}
    runs.write_config(
        run_dir,
        settings,
        command="zeroshot",
        model_fingerprint=result.model_fingerprint,
        classnames=result.classnames,
        prompt_templates=result.templates,
        text_path=zs.text_path(vl),
        **extra,
    )
    metrics = result.save(run_dir)
    _print_summary(metrics, result, run_dir)


def _print_summary(metrics: dict, result, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zero-shot classification")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("classes", str(len(result.classnames)))
    table.add_row("prompt templates", str(len(result.templates)))
    table.add_row("images scored", str(len(result.paths)))
    table.add_row("images skipped", str(metrics["num_skipped"]))
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    if "top1" in metrics:
        table.add_row("top-1", pct(metrics["top1"]))
        table.add_row("top-5", pct(metrics["top5"]))
        table.add_row("mean per-class recall", pct(metrics["mean_per_class_recall"]))
    console = Console()
    console.print(table)
    console.print(f"run folder: {run_dir}")

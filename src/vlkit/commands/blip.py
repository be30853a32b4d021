"""BLIP commands: `vlkit eval caption`.

Each is a thin call into `vlkit.blip`; arguments are checked before any model is
loaded or any output is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vlkit.errors import VlkitError


def _eval_group(app: typer.Typer) -> typer.Typer:
    """The app's `eval` group (shared with `eval retrieval`), created on first use."""
    for info in app.registered_groups:
        if info.name == "eval" and info.typer_instance is not None:
            return info.typer_instance
    sub = typer.Typer(help="Evaluate models.", no_args_is_help=True)
    app.add_typer(sub, name="eval")
    return sub


def register(app: typer.Typer) -> None:
    _eval_group(app).command("caption")(eval_caption)


def eval_caption(
    pred: Path = typer.Option(..., "--pred", help="Predicted captions: captions.jsonl from `vlkit caption`, or any CSV/JSONL with image and caption columns."),
    refs: Path = typer.Option(..., "--refs", help="Reference captions: CSV/JSONL with an image column and a caption column (a string or a list; several rows per image are merged)."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="References' image column (default: image, path, file, ...)."),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="References' caption column (default: caption, captions, text, references)."),
    pred_image_column: Optional[str] = typer.Option(None, "--pred-image-column", help="Predictions' image column (default: image, path, ...)."),
    pred_caption_column: Optional[str] = typer.Option(None, "--pred-caption-column", help="Predictions' caption column (default: caption, captions, text)."),
    tokenizer: str = typer.Option("auto", "--tokenizer", help="auto (the Java PTB tokenizer when Java is present, else vlkit's Python mirror), ptb or python."),
    meteor: str = typer.Option("auto", "--meteor", help="auto (when Java is present), on or off."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder."),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap's scorers): writes config.json, metrics.json, per_image.jsonl."""
    from vlkit import io, runs
    from vlkit.blip.caption_metrics import evaluate_caption_files

    if tokenizer not in ("auto", "ptb", "python"):
        raise VlkitError(f"--tokenizer {tokenizer}: unknown; use auto, ptb or python")
    if meteor not in ("auto", "on", "off"):
        raise VlkitError(f"--meteor {meteor}: unknown; use auto, on or off")
    ev = evaluate_caption_files(
        pred,
        refs,
        image_column=image_column,
        caption_column=caption_column,
        pred_image_column=pred_image_column,
        pred_caption_column=pred_caption_column,
        tokenizer=tokenizer,  # type: ignore[arg-type]
        meteor=meteor,  # type: ignore[arg-type]
    )
    run = runs.new_run_dir(out, "eval-caption")
    settings = {
        "pred": pred.resolve(),
        "refs": refs.resolve(),
        "image_column": image_column,
        "caption_column": caption_column,
        "pred_image_column": pred_image_column,
        "pred_caption_column": pred_caption_column,
        "tokenizer": tokenizer,
        "meteor": meteor,
        "out": out,
    }
    runs.write_config(run, settings, command="eval caption")
    runs.write_metrics(run, ev.to_dict())
    lines = (json.dumps({"path": path, **scores}, ensure_ascii=False) + "\n" for path, scores in ev.result.per_image.items())
    io.write_text(run / "per_image.jsonl", "".join(lines))
    _print_scores(ev, run)


def _print_scores(ev, run: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    res = ev.result
    table = Table(title=f"caption metrics on {res.images} images")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in res.scores.items():
        table.add_row(name, "n/a" if value is None else f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"tokenizer: {res.tokenizer_detail}", markup=False, highlight=False)
    for note in res.notes:
        console.print(note, markup=False, highlight=False)
    if ev.predictions_without_refs or ev.refs_without_prediction:
        console.print(
            f"left out: {len(ev.predictions_without_refs)} predicted images without references, "
            f"{len(ev.refs_without_prediction)} referenced images without a prediction (examples in metrics.json)"
        )
    console.print(f"run folder: {run}")

"""`vlkit demo`: the few-shot demo on the bundled sample (see vlkit.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command(name="demo")(demo)


def demo(
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder."),
    model: str = typer.Option("vlkit-tiny", "--model", help="Model spec (default: the embedded vlkit-tiny)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="CoOp epochs per run (default: the paper's 50/100/200 by shots)."),
    seed: int = typer.Option(1, "--seed"),
) -> None:
    """Zero-shot vs linear probe vs CoOp on the bundled sample: table, plot, learned prompt, nearest words."""
    from vlkit.commands import validate
    from vlkit.demo import run_demo

    validate.out_folder("--out", out)
    run_demo(out, model=model, epochs=epochs, seed=seed)

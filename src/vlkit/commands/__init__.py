"""CLI command modules, one per area; `register_all` attaches them to the app.

Each module exposes `register(app: typer.Typer) -> None`. Imports of heavy
libraries happen inside the commands so `vlkit --help` stays fast.
"""

from __future__ import annotations

import importlib

import typer

MODULES = ["data", "zeroshot", "retrieval", "pretrain", "adapt", "bench", "demo", "blip", "capfilt"]


def register_all(app: typer.Typer) -> None:
    for name in MODULES:
        importlib.import_module(f"vlkit.commands.{name}").register(app)

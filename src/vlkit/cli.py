"""`vlkit <command>`: each command is a thin call into the library.

User mistakes raise `VlkitError`; `main` prints its message as one line and exits 2.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="vlkit: CLIP/BLIP-style vision-language toolkit.",
)


@app.callback()
def _root() -> None:
    """vlkit: pretrain, zero-shot, few-shot prompt learning, retrieval."""


@app.command()
def version() -> None:
    """Print vlkit's version and the versions of the libraries that change results."""
    from vlkit.runs import library_versions

    for name, v in library_versions().items():
        print(f"{name} {v}")


def _register() -> None:
    """Attach each area's commands. Each area owns one module under vlkit.commands."""
    from vlkit.commands import register_all

    register_all(app)


def main(argv: list[str] | None = None) -> None:
    from vlkit.errors import VlkitError

    _register()
    try:
        app(args=argv, prog_name="vlkit")
    except VlkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`vlkit <command>`: each command is a thin call into the library.

User mistakes raise `VlkitError`; `main` prints its message as one line and exits 2.
Mistakes click finds while parsing (an unknown option, a value out of range, a
missing argument) get the same treatment: one `error:` line naming the command's
--help, exit 2, never a boxed panel or a traceback.
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


def _fail(message: str, code: int = 2) -> None:
    line = " ".join(str(message).split("\n")).strip()
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


def _click_exceptions():
    """Click's exception classes as typer uses them (recent typer vendors its own copy of click)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    from vlkit.errors import VlkitError

    cx = _click_exceptions()
    _register()
    try:
        rv = app(args=argv, prog_name="vlkit", standalone_mode=False)
    except VlkitError as e:
        _fail(str(e))
    except cx.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `vlkit coop` alone: its help, as click does
            print(e.format_message(), file=sys.stderr)
            sys.exit(2)
        where = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
        _fail(f"{e.format_message().rstrip('.')}{where}", e.exit_code)
    except cx.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()

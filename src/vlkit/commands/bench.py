"""`vlkit bench fewshot|base-to-new|domain|report`: the few-shot benchmark harness.

List options take several values after one flag (`--shots 1 2 4 8 16`), as the
CoOp scripts do. Typer options take one value per flag, so these commands use
`ManyValues`, which rewrites `--shots 1 2 4` into `--shots 1 --shots 2 --shots 4`
before click parses; help, errors and formatting are then those of every other
command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperCommand

from vlkit.adapt import DEFAULT_VIEWS
from vlkit.commands import validate
from vlkit.errors import VlkitError

_NUMBER = re.compile(r"^-\d+$")


class ManyValues(TyperCommand):
    """A command whose list options (`many`) take every value up to the next option."""

    many: frozenset[str] = frozenset({"--tasks", "--methods", "--shots", "--seeds", "--from"})

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        out: list[str] = []
        current: str | None = None
        for arg in args:
            if arg.startswith("-") and not _NUMBER.match(arg):
                current = arg if arg in self.many else None
                out.append(arg)
            elif current is not None and out and out[-1] != current:
                out += [current, arg]  # a further value of the same list option
            else:
                out.append(arg)
        return super().parse_args(ctx, out)


def _task_names() -> str:
    from vlkit.data.tasks import DEFINITIONS_DIR

    return ", ".join(sorted(p.stem for p in DEFINITIONS_DIR.glob("*.json")))


def _method_names() -> str:
    from vlkit.bench.methods import METHODS

    return ", ".join(METHODS)


TASKS_HELP = f"One or more task names: {_task_names()} (`vlkit data info NAME` describes one)."
METHODS_HELP = f"One or more of: {_method_names()}."
OPTIONS_HELP = 'Per-method settings as JSON, e.g. \'{"tip-adapter": {"beta_steps": 50}}\' (they override the protocol\'s).'
PROTOCOL_HELP = "vlkit: vlkit's defaults; paper: each method's official recipe where it differs (vlkit.bench.protocols)."
PROTOCOLS = ("vlkit", "paper")  # vlkit.bench.protocols.PROTOCOLS, kept torch-free for the CLI


def _common(
    tasks: list[str], methods: list[str], shots: list[int], seeds: list[int], out: Optional[Path], name: str,
    epochs: Optional[int], views: int, options: Optional[str], data_dir: Optional[str], protocol: str,
) -> tuple[Path, dict[str, Any]]:
    """Check every argument (before a model loads or a folder is made); the results folder and the options."""
    from vlkit.bench.methods import check_methods
    from vlkit.data.recipes import resolve_data_dir
    from vlkit.data.tasks import definition_path

    for flag, values in (("--tasks", tasks), ("--methods", methods), ("--shots", shots), ("--seeds", seeds)):
        validate.nonempty(flag, values)
    if data_dir is not None and data_dir != "sample":
        validate.no_broken_link("--data-dir", Path(data_dir).expanduser())
    for name in tasks:
        definition_path(name, resolve_data_dir(data_dir))
    for k in shots:
        validate.at_least("--shots", k)
    check_methods(methods)
    validate.at_least("--epochs", epochs)
    validate.at_least("--views", views)
    if protocol not in PROTOCOLS:
        raise VlkitError(f"--protocol {protocol!r}: unknown; choose from {', '.join(PROTOCOLS)}")
    try:
        opts = json.loads(options) if options else {}
    except json.JSONDecodeError as e:
        raise VlkitError(f"--options: not valid JSON ({e.msg}); pass e.g. '{{\"coop\": {{\"n_ctx\": 4}}}}'") from None
    if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
        raise VlkitError("--options: must map method names to objects of settings")
    folder = out or Path(f"runs/bench-{name}")
    validate.out_folder("--out", folder)
    return folder, opts


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Few-shot benchmark: methods x tasks x shots x seeds, resumable.", no_args_is_help=True)

    tasks_opt = typer.Option(..., "--tasks", help=TASKS_HELP)
    methods_opt = typer.Option(["zeroshot", "linear-probe", "coop"], "--methods", help=METHODS_HELP)
    seeds_opt = typer.Option([1, 2, 3], "--seeds", help="One or more seeds.")
    model_opt = typer.Option("vlkit-tiny", "--model", help="Model spec (default: the embedded vlkit-tiny).")
    data_dir_opt = typer.Option(None, "--data-dir", help="Data directory ('sample' = the bundled sample).")
    out_opt = typer.Option(None, "--out", help="Results folder (default runs/bench-<command>); rerun to resume.")
    epochs_opt = typer.Option(None, "--epochs", help="One epoch budget for every trained method (default: each paper's).")
    views_opt = typer.Option(DEFAULT_VIEWS, "--views", help="Cached augmented views per training image.")
    options_opt = typer.Option(None, "--options", help=OPTIONS_HELP)
    protocol_opt = typer.Option("vlkit", "--protocol", help=PROTOCOL_HELP)

    @bench.command("fewshot", cls=ManyValues)
    def fewshot(
        tasks: List[str] = tasks_opt,
        methods: List[str] = methods_opt,
        shots: List[int] = typer.Option([1, 2, 4, 8, 16], "--shots", help="One or more shot counts (images per class)."),
        seeds: List[int] = seeds_opt,
        model: str = model_opt,
        data_dir: Optional[str] = data_dir_opt,
        out: Optional[Path] = out_opt,
        epochs: Optional[int] = epochs_opt,
        views: int = views_opt,
        options: Optional[str] = options_opt,
        protocol: str = protocol_opt,
    ) -> None:
        """Accuracy against shots for each method and task: results.jsonl, table.md, fewshot.png."""
        from vlkit.bench.fewshot import run_fewshot

        folder, opts = _common(tasks, methods, shots, seeds, out, "fewshot", epochs, views, options, data_dir, protocol)
        run_fewshot(
            tasks, methods, shots, seeds, folder, model=model, data_dir=data_dir, epochs=epochs, views=views, options=opts, protocol=protocol
        )
        print((folder / "table.md").read_text(encoding="utf-8"))
        print(f"results: {folder / 'results.jsonl'}  table: {folder / 'table.md'}  plot: {folder / 'fewshot.png'}")

    @bench.command("base-to-new", cls=ManyValues)
    def base_to_new(
        tasks: List[str] = tasks_opt,
        methods: List[str] = methods_opt,
        shots: int = typer.Option(16, "--shots", help="Shots per base class."),
        seeds: List[int] = seeds_opt,
        model: str = model_opt,
        data_dir: Optional[str] = data_dir_opt,
        out: Optional[Path] = out_opt,
        epochs: Optional[int] = epochs_opt,
        views: int = views_opt,
        options: Optional[str] = options_opt,
        protocol: str = protocol_opt,
    ) -> None:
        """CoCoOp's protocol: train on base classes, report base/new accuracy and harmonic mean."""
        from vlkit.bench.fewshot import run_base_to_new

        folder, opts = _common(tasks, methods, [shots], seeds, out, "base-to-new", epochs, views, options, data_dir, protocol)
        run_base_to_new(
            tasks, methods, shots, seeds, folder, model=model, data_dir=data_dir, epochs=epochs, views=views, options=opts, protocol=protocol
        )
        print((folder / "base_to_new.md").read_text(encoding="utf-8"))

    @bench.command("domain", cls=ManyValues)
    def domain(
        tasks: List[str] = tasks_opt,
        methods: List[str] = methods_opt,
        shots: int = typer.Option(16, "--shots", help="Shots per class."),
        seeds: List[int] = seeds_opt,
        model: str = model_opt,
        data_dir: Optional[str] = data_dir_opt,
        out: Optional[Path] = out_opt,
        epochs: Optional[int] = epochs_opt,
        views: int = views_opt,
        options: Optional[str] = options_opt,
        protocol: str = protocol_opt,
    ) -> None:
        """Train on the task's train styles, test on each held-out style: domain.md."""
        from vlkit.bench.fewshot import run_domain_generalization

        folder, opts = _common(tasks, methods, [shots], seeds, out, "domain", epochs, views, options, data_dir, protocol)
        run_domain_generalization(
            tasks, methods, shots, seeds, folder, model=model, data_dir=data_dir, epochs=epochs, views=views, options=opts, protocol=protocol
        )
        print((folder / "domain.md").read_text(encoding="utf-8"))

    @bench.command("report", cls=ManyValues)
    def report(
        sources: List[Path] = typer.Option(..., "--from", help="One or more result folders of `vlkit bench ...` runs."),
        out: Path = typer.Option(..., "--out", help="Folder for the merged results.jsonl, table.md, fewshot.png."),
        average: Optional[List[str]] = typer.Option(
            None, "--average", metavar="NAME=TASK,TASK", help="An average over these tasks (repeatable; default: one over all tasks)."
        ),
        tasks: Optional[List[str]] = typer.Option(None, "--tasks", help="Task order in the table."),
        methods: Optional[List[str]] = typer.Option(None, "--methods", help="Method order in the table."),
    ) -> None:
        """One table and plot over several result folders (e.g. tasks run at different budgets)."""
        from vlkit.bench.fewshot import merge_results

        averages = None
        if average:
            averages = {}
            for spec in average:
                name, sep, names = spec.partition("=")
                if not sep or not name.strip() or not names.strip():
                    raise VlkitError(f"--average {spec!r}: write NAME=TASK,TASK (e.g. 'Average=emoji-group,emoji-skintone')")
                averages[name.strip()] = [t.strip() for t in names.split(",") if t.strip()]
        validate.out_folder("--out", out)
        merge_results(sources, out, averages=averages, tasks=tasks, methods=methods)
        written = [out / n for n in ("table.md", "base_to_new.md") if (out / n).exists()]
        for path in written:
            print(path.read_text(encoding="utf-8"))
        print(f"merged results: {out / 'results.jsonl'}; " + ", ".join(map(str, written)))

    app.add_typer(bench, name="bench")

"""`vlkit bench fewshot|base-to-new|domain|report`: the few-shot benchmark harness.

List options take several values after one flag (`--shots 1 2 4 8 16`), as the
CoOp scripts do; typer options take one value per flag, so these commands read
their arguments with argparse from the raw command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import typer

from vlkit.adapt import DEFAULT_VIEWS
from vlkit.errors import VlkitError

_CTX = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line through the CLI's error contract
        raise VlkitError(f"vlkit bench {self.prog.split()[-1]}: {message}; see --help")


def _parser(name: str, shots_many: bool) -> _Parser:
    from vlkit.bench.methods import METHODS

    p = _Parser(prog=f"vlkit bench {name}", add_help=True)
    p.add_argument("--tasks", nargs="+", required=True, help="benchmark task names (see `vlkit data tasks`)")
    p.add_argument("--methods", nargs="+", default=["zeroshot", "linear-probe", "coop"], help=f"any of: {', '.join(METHODS)}")
    if shots_many:
        p.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    else:
        p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--model", default="vlkit-tiny", help="model spec (default: the embedded vlkit-tiny)")
    p.add_argument("--data-dir", default=None, help="data directory ('sample' = the bundled sample)")
    p.add_argument("--out", default=None, help="results folder (default runs/bench-<name>); rerun to resume")
    p.add_argument("--epochs", type=int, default=None, help="one epoch budget for every trained method (default: each paper's)")
    p.add_argument("--views", type=int, default=DEFAULT_VIEWS, help="cached augmented views per training image")
    p.add_argument("--options", default=None, help='per-method settings as JSON, e.g. \'{"tip-adapter": {"beta_steps": 50}}\'')
    return p


def _parse(name: str, args: list[str], shots_many: bool) -> argparse.Namespace:
    ns = _parser(name, shots_many).parse_args(args)
    try:
        ns.options = json.loads(ns.options) if ns.options else {}
    except json.JSONDecodeError as e:
        raise VlkitError(f"--options: not valid JSON ({e.msg}); pass e.g. '{{\"coop\": {{\"n_ctx\": 4}}}}'") from None
    if not isinstance(ns.options, dict) or not all(isinstance(v, dict) for v in ns.options.values()):
        raise VlkitError("--options: must map method names to objects of settings")
    ns.out = Path(ns.out or f"runs/bench-{name}")
    return ns


def _common(ns: argparse.Namespace) -> dict:
    return dict(model=ns.model, data_dir=ns.data_dir, epochs=ns.epochs, views=ns.views, options=ns.options)


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Few-shot benchmark: methods x tasks x shots x seeds, resumable.", no_args_is_help=True)

    @bench.command("fewshot", context_settings=_CTX)
    def fewshot(ctx: typer.Context) -> None:
        """--tasks T.. --methods M.. --shots 1 2 4 8 16 --seeds 1 2 3 [--model --data-dir --out --epochs --views --options]."""
        from vlkit.bench.fewshot import run_fewshot

        ns = _parse("fewshot", ctx.args, True)
        run_fewshot(ns.tasks, ns.methods, ns.shots, ns.seeds, ns.out, **_common(ns))
        print((ns.out / "table.md").read_text(encoding="utf-8"))
        print(f"results: {ns.out / 'results.jsonl'}  table: {ns.out / 'table.md'}  plot: {ns.out / 'fewshot.png'}")

    @bench.command("base-to-new", context_settings=_CTX)
    def base_to_new(ctx: typer.Context) -> None:
        """--tasks T.. --methods M.. --shots 16 --seeds 1 2 3: base/new accuracy and harmonic mean."""
        from vlkit.bench.fewshot import run_base_to_new

        ns = _parse("base-to-new", ctx.args, False)
        run_base_to_new(ns.tasks, ns.methods, ns.shots, ns.seeds, ns.out, **_common(ns))
        print((ns.out / "base_to_new.md").read_text(encoding="utf-8"))

    @bench.command("domain", context_settings=_CTX)
    def domain(ctx: typer.Context) -> None:
        """--tasks T.. --methods M.. --shots 16 --seeds 1 2 3: train on the task's train styles, test per held-out style."""
        from vlkit.bench.fewshot import run_domain_generalization

        ns = _parse("domain", ctx.args, False)
        run_domain_generalization(ns.tasks, ns.methods, ns.shots, ns.seeds, ns.out, **_common(ns))
        print((ns.out / "domain.md").read_text(encoding="utf-8"))

    @bench.command("report", context_settings=_CTX)
    def report(ctx: typer.Context) -> None:
        """--from DIR.. --out DIR [--average NAME=TASK,TASK ..]: one table and plot over several result folders."""
        from vlkit.bench.fewshot import merge_results

        p = _Parser(prog="vlkit bench report", add_help=True)
        p.add_argument("--from", dest="sources", nargs="+", required=True, help="result folders of `vlkit bench ...` runs")
        p.add_argument("--out", required=True, help="folder for the merged results.jsonl, table.md, fewshot.png")
        p.add_argument("--average", action="append", default=None, metavar="NAME=TASK,TASK",
                       help="an average over these tasks (repeatable; default: one over all tasks)")
        p.add_argument("--tasks", nargs="+", default=None, help="task order in the table")
        p.add_argument("--methods", nargs="+", default=None, help="method order in the table")
        ns = p.parse_args(ctx.args)
        averages = None
        if ns.average:
            averages = {}
            for spec in ns.average:
                name, sep, tasks = spec.partition("=")
                if not sep or not name.strip() or not tasks.strip():
                    raise VlkitError(f"--average {spec!r}: write NAME=TASK,TASK (e.g. 'Average=emoji-group,emoji-skintone')")
                averages[name.strip()] = [t.strip() for t in tasks.split(",") if t.strip()]
        out = Path(ns.out)
        merge_results(ns.sources, out, averages=averages, tasks=ns.tasks, methods=ns.methods)
        written = [out / n for n in ("table.md", "base_to_new.md") if (out / n).exists()]
        for path in written:
            print(path.read_text(encoding="utf-8"))
        print(f"merged results: {out / 'results.jsonl'}; " + ", ".join(map(str, written)))

    app.add_typer(bench, name="bench")

"""Tables and plots of few-shot benchmark records (one dict per run).

Markdown tables give mean +/- std over seeds (population std, as numpy's
default) per task, then the average over tasks: for each seed the mean over
the tasks that have that run, then mean +/- std of those means. A method that
did not run on every task of an average gets no average there (a mean over fewer
tasks would not compare); `averages` names averages over chosen task subsets for
grids whose methods ran on different tasks. Zero-shot runs (shots = 0) are shown
in every shot column, as the flat baseline they are. Runs of the paper protocol
are rows of their own, `<method> (paper)`, next to vlkit's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vlkit.errors import VlkitError

AVERAGE = "Average"


def _order(values: Iterable[Any], preferred: Sequence[Any] | None) -> list[Any]:
    seen = list(dict.fromkeys(values))
    if preferred:
        return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]
    return seen


def label(record: dict[str, Any]) -> str:
    """The row name of a run: its method, marked with its protocol unless that is vlkit's."""
    protocol = record.get("protocol", "vlkit")
    return record["method"] if protocol == "vlkit" else f"{record['method']} ({protocol})"


def _with_protocols(methods: Sequence[str] | None) -> list[str] | None:
    """A method order that puts each method's paper-protocol row right after its own."""
    return [name for m in methods for name in (m, f"{m} (paper)")] if methods else None


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


Averages = dict[str, Sequence[str]]


def collect(
    records: list[dict[str, Any]], metric: str = "acc", averages: Averages | None = None
) -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """task -> method -> shots -> seed -> value, plus one synthetic task per average
    (default: 'Average' over all tasks, when there are several) holding the mean over
    its tasks of each (method, shots, seed) run that all of them have."""
    table: dict[str, dict[str, dict[int, dict[int, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in records:
        table[r["task"]][label(r)][r["shots"]][r["seed"]] = float(r[metric] if metric in r else r["evals"][metric])
    if averages is None:
        averages = {AVERAGE: list(table)} if len(table) > 1 else {}
    for name, tasks in averages.items():
        missing = [t for t in tasks if t not in table]
        if missing or not tasks:
            raise VlkitError(f"average {name!r}: no results for task(s) {', '.join(missing or tasks) or '(none given)'}")
        for m in {m for t in tasks for m in table[t]}:
            keys = set.intersection(*[{(k, s) for k, seeds in table[t][m].items() for s in seeds} for t in tasks])
            for k, s in sorted(keys):
                table[name][m][k][s] = float(np.mean([table[t][m][k][s] for t in tasks]))
    return table


def fewshot_table(
    records: list[dict[str, Any]],
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    averages: Averages | None = None,
    shots: Sequence[int] | None = None,
) -> str:
    """Markdown: one table per task (rows: methods, columns: shots) and the average(s).

    Columns are `shots` (default: every shot count in the records); a grid of
    zero-shot methods only has one column, "zero-shot".
    """
    table = collect(records, averages=averages)
    methods = _with_protocols(methods)
    columns = sorted(set(shots or ()) | {r["shots"] for r in records if r["shots"] > 0})
    headers = [f"{k} shot{'s' if k > 1 else ''}" for k in columns] or ["zero-shot"]
    lines = []
    for task in _order(table, list(tasks or []) + list(averages or [AVERAGE])):
        lines += [f"### {task}", "", "| method | " + " | ".join(headers) + " |"]
        lines.append("|---|" + "---|" * len(headers))
        for m in _order(table[task], methods):
            by_shot = table[task][m]
            if 0 in by_shot:  # zero-shot: the same value in every column
                row = [_cell(list(by_shot[0].values()))] * len(headers)
            else:
                row = [_cell(list(by_shot[k].values())) if k in by_shot else "-" for k in columns]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_fewshot(
    records: list[dict[str, Any]],
    path: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    averages: Averages | None = None,
) -> None:
    """Accuracy against shots (log2 axis) per task plus the average, mean with a
    +/- std band over seeds; zero-shot as a star at the left edge (CoOp, Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlkit import io

    table = collect(records, averages=averages)
    methods = _with_protocols(methods)
    panels = _order(table, list(tasks or []) + list(averages or [AVERAGE]))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    all_methods = _order([m for t in panels for m in table[t]], methods)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(all_methods)}
    shots = sorted({r["shots"] for r in records if r["shots"] > 0})
    zero_only = not shots
    for ax, task in zip(axes.flat, panels):
        for m in _order(table[task], methods):
            by_shot = table[task][m]
            if 0 in by_shot:
                zs = float(np.mean(list(by_shot[0].values())))
                ax.scatter([shots[0] / 2 if shots else 0.5], [zs], marker="*", s=140, color=colours[m], label=m, zorder=3)
                ax.axhline(zs, color=colours[m], ls=":", lw=1, alpha=0.6)
                continue
            ks = [k for k in shots if k in by_shot]
            mean = np.array([np.mean(list(by_shot[k].values())) for k in ks])
            std = np.array([np.std(list(by_shot[k].values())) for k in ks])
            ax.plot(ks, mean, marker="o", ms=4, color=colours[m], label=m)
            ax.fill_between(ks, mean - std, mean + std, color=colours[m], alpha=0.15)
        if zero_only:  # nothing to draw against shots: just the zero-shot stars
            ax.set_xticks([0.5])
            ax.set_xticklabels(["zero-shot"])
        else:
            ax.set_xscale("log", base=2)
            ax.set_xticks(shots)
            ax.set_xticklabels([str(k) for k in shots])
        ax.set_title(task)
        ax.set_xlabel("" if zero_only else "shots per class")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if len(labels) > 5 else 0.05, 1, 1))
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def base_to_new_table(records: list[dict[str, Any]], *, tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None) -> str:
    """Markdown: base, new and harmonic mean (mean +/- std over seeds) per task and the average."""
    per: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    by_seed: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    task_names = _order((r["task"] for r in records), tasks)
    methods = _with_protocols(methods)
    for r in records:
        for k in ("base", "new", "hm"):
            per[r["task"]][label(r)][k].append(r[k])
            by_seed[(label(r), r["seed"])][k].append(r[k])
    if len(task_names) > 1:
        for (m, _seed), vals in by_seed.items():
            if len(vals["base"]) == len(task_names):
                for k in ("base", "new", "hm"):
                    per[AVERAGE][m][k].append(float(np.mean(vals[k])))
    lines = []
    for task in _order(per, list(task_names) + [AVERAGE]):
        lines += [f"### {task}", "", "| method | base | new | H |", "|---|---|---|---|"]
        for m in _order(per[task], methods):
            lines.append(f"| {m} | " + " | ".join(_cell(per[task][m][k]) for k in ("base", "new", "hm")) + " |")
        lines.append("")
    return "\n".join(lines)


def domain_table(records: list[dict[str, Any]], *, tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None) -> str:
    """Markdown: per task, accuracy on the source styles and on each held-out style."""
    lines = []
    for task in _order((r["task"] for r in records), tasks):
        rows = [r for r in records if r["task"] == task]
        sets = _order((k for r in rows for k in r["evals"] if k != "test"), ["source"])
        lines += [f"### {task}", "", "| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        for m in _order((label(r) for r in rows), _with_protocols(methods)):
            mine = [r for r in rows if label(r) == m]
            lines.append(f"| {m} | " + " | ".join(_cell([r["evals"][s] for r in mine if s in r["evals"]]) for s in sets) + " |")
        lines.append("")
    return "\n".join(lines)

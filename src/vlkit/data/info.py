"""Dataset cards: what a built dataset or task holds, where it came from, under which licence.

`vlkit data info NAME` prints one as Markdown: counts per style, per class and
per split, and the licence of every style, read from the built metadata and
split files (nothing is guessed or hard-coded here).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from vlkit.data.recipes import built_dir, read_jsonl
from vlkit.data.tasks import SPLIT_NAMES, Task, available_tasks, load_task
from vlkit.errors import VlkitError

# Which metadata field is the "class" of a row in a dataset card.
CLASS_FIELD = {"openclipart": "category"}
DEFAULT_CLASS_FIELD = "group_name"


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _top(counter: Counter, top: int) -> list[tuple[str, int]]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))[:top]


def dataset_card(name: str, data_dir: Path, top: int = 15) -> str:
    """Card for a built dataset (emoji, emoji-facebook, openclipart) or for a task."""
    meta = built_dir(data_dir, name) / "metadata.jsonl"
    if meta.exists():
        return _dataset_card(name, data_dir, top)
    if name in available_tasks(data_dir):
        return task_card(load_task(name, data_dir), top)
    built = sorted(p.name for p in (data_dir / "built").glob("*") if (p / "metadata.jsonl").exists())
    raise VlkitError(
        f"{name}: no built dataset or task of that name in {data_dir}; built datasets: "
        f"{', '.join(built) or 'none (run `vlkit data build emoji`)'}; tasks: {', '.join(available_tasks(data_dir))}"
    )


def _dataset_card(name: str, data_dir: Path, top: int) -> str:
    folder = built_dir(data_dir, name)
    rows = read_jsonl(folder / "metadata.jsonl")
    build = json.loads((folder / "build.json").read_text(encoding="utf-8")) if (folder / "build.json").exists() else {}
    styles = Counter(r["style"] for r in rows)
    licences = {r["style"]: r.get("licence", "unknown") for r in rows}
    field = CLASS_FIELD.get(name, DEFAULT_CLASS_FIELD)
    out = [f"# {name}", "", f"Folder: {folder}", f"Rows: {len(rows)}"]
    if build:
        sources = ", ".join(f"{k} {v}" for k, v in build.get("sources", {}).items())
        out += [f"Sources: {sources}", f"Thumbnails: {build.get('size')} px PNG on white"]
        skipped = {s: r.get("skipped", 0) for s, r in build.get("report", {}).items()}
        if any(skipped.values()):
            out.append("Skipped while building: " + ", ".join(f"{s} {n}" for s, n in skipped.items()))
    out += ["", "## Styles", "", table(["style", "images", "licence"], [[s, n, licences[s]] for s, n in sorted(styles.items())])]
    per_class = Counter(r.get(field) for r in rows)
    out += ["", f"## Classes by `{field}` ({len(per_class)}; largest {min(top, len(per_class))})", ""]
    by_style = {s: Counter(r.get(field) for r in rows if r["style"] == s) for s in sorted(styles)}
    out.append(table([field, "total", *sorted(styles)], [[c, n, *(by_style[s][c] for s in sorted(styles))] for c, n in _top(per_class, top)]))
    task_rows = []
    for task_name in available_tasks(data_dir, built_only=True):
        task = load_task(task_name, data_dir)
        if name not in task.definition["datasets"]:
            continue
        counts = [sum(1 for p, _ in task.splits[s] if p.startswith(f"{name}/")) for s in SPLIT_NAMES]
        task_rows.append([task_name, task.num_classes, *counts])
    if task_rows:
        out += ["", "## Splits (rows of this dataset in each task)", "", table(["task", "classes", *SPLIT_NAMES], task_rows)]
    return "\n".join(out) + "\n"


def task_card(task: Task, top: int = 15) -> str:
    """Card for a task: classes, templates, split sizes by style, per-class counts, licences."""
    licences: dict[str, str] = {}
    style_of: dict[str, str] = {}
    for dataset in task.definition["datasets"]:
        for r in read_jsonl(built_dir(task.data_dir, dataset) / "metadata.jsonl"):
            licences.setdefault(r["style"], r.get("licence", "unknown"))
            style_of[f"{dataset}/{r['image']}"] = r["style"]
    out = [f"# task {task.name}", "", task.description, "", f"Classes: {task.num_classes}",
           "Templates: " + " | ".join(task.templates), f"Split files: {task.split_dir}"]
    styles = sorted({style_of[p] for rows in task.splits.values() for p, _ in rows})
    by_split = {s: Counter(style_of[p] for p, _ in task.splits[s]) for s in SPLIT_NAMES}
    out += ["", "## Splits by style", "",
            table(["split", "total", *styles], [[s, len(task.splits[s]), *(by_split[s][st] for st in styles)] for s in SPLIT_NAMES])]
    out += ["", "## Licences", "", table(["style", "licence"], [[s, licences.get(s, "unknown")] for s in styles])]
    per_class = {s: Counter(y for _, y in task.splits[s]) for s in SPLIT_NAMES}
    totals = Counter({i: sum(per_class[s][i] for s in SPLIT_NAMES) for i in range(task.num_classes)})
    shown = _top(totals, top)
    out += ["", f"## Classes (largest {len(shown)} of {task.num_classes})", "",
            table(["class", *SPLIT_NAMES], [[task.classnames[i], *(per_class[s][i] for s in SPLIT_NAMES)] for i, _ in shown])]
    smallest = min(per_class["train"][i] for i in range(task.num_classes))
    out += ["", f"Smallest train class: {smallest} images."]
    return "\n".join(out) + "\n"

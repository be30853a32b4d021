"""The few-shot benchmark: every method, on the same shots, over tasks x shots x seeds.

`run_fewshot` appends one JSON line per finished run to `<out>/results.jsonl`
and skips runs already there, so an interrupted benchmark resumes where it
stopped; then it writes `table.md` (mean +/- std over seeds per task and the
average over tasks) and `fewshot.png` (accuracy against shots, like CoOp's
Figure 3). `run_base_to_new` (CoCoOp's base/new/harmonic mean) and
`run_domain_generalization` (train on some artwork styles, test per held-out
style) write their own JSONL and tables beside it.

Zero-shot methods do not depend on shots or seeds; they run once per task and
are recorded with shots = 0, seed = 0. Test data is only ever used here, after
a method has returned its predictor.

`protocol` ("vlkit" or "paper", `vlkit.bench.protocols`) picks vlkit's defaults
or each method's official recipe; it is part of a folder's settings and of every
record (records from before it existed are "vlkit" runs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vlkit import io, runs
from vlkit.adapt import DEFAULT_VIEWS
from vlkit.bench.data import FewShotSplit, TaskFeatures
from vlkit.bench.methods import METHODS, NO_TRANSFER, TRAINING_FREE, Fitted, MethodInput, check_methods
from vlkit.bench.protocols import check_protocol, method_options, own_views
from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

Log = Callable[[str], None]
DEFAULTS = {"protocol": "vlkit"}  # what a record or settings file without the key means


def protocol_of(record: dict[str, Any]) -> str:
    return record.get("protocol", DEFAULTS["protocol"])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (the metric CoOp reports)."""
    from vlkit.metrics import topk_accuracy

    return 100.0 * topk_accuracy(logits, labels, 1)


class Results:
    """A JSONL file of runs; a torn last line (a crash mid-write) is dropped on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            good = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            self.records = good
            io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good))

    def has(self, key: dict[str, Any]) -> bool:
        return any(all(r.get(k, DEFAULTS.get(k)) == v for k, v in key.items()) for r in self.records)

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix results of another model, budget or protocol in one folder."""
    path = out / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise VlkitError(f"{path}: damaged; delete it (its results.jsonl stays) or use another --out folder") from None
        for key in ("model_fingerprint", "epochs", "views", "options", "protocol"):
            if old.get(key, DEFAULTS.get(key)) != settings.get(key):
                raise VlkitError(
                    f"{out}: holds results for {key}={old.get(key, DEFAULTS.get(key))!r}, this run has {settings.get(key)!r}; "
                    "use another --out folder or the same settings"
                )
    else:
        io.write_json(path, settings)


def _resolve_model(model: str | VLModel) -> VLModel:
    if isinstance(model, VLModel):
        return model
    from vlkit.models import load_model

    return load_model(model)


def _input(model: VLModel, split: FewShotSplit, shots: int, seed: int, epochs: int | None, options: dict) -> MethodInput:
    return MethodInput(
        model=model,
        classnames=split.classnames,
        templates=split.templates,
        train_views=split.train_views,
        train_features=split.train_features,
        train_labels=split.train_labels,
        val_features=split.val_features,
        val_labels=split.val_labels,
        shots=shots,
        seed=seed,
        epochs=int(options["epochs"]) if "epochs" in options else epochs,  # a method's own budget wins
        options={k: v for k, v in options.items() if k != "epochs"},
    )


def _fit(method: str, inp: MethodInput) -> tuple[Fitted, float]:
    runs.seed_everything(inp.seed)
    t0 = time.perf_counter()
    fitted = METHODS[method](inp)
    return fitted, time.perf_counter() - t0


def run_fewshot(
    tasks: Sequence[str],
    methods: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    out: str | os.PathLike,
    *,
    model: str | VLModel = "vlkit-tiny",
    data_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    views: int = DEFAULT_VIEWS,
    options: dict[str, dict[str, Any]] | None = None,
    provider: TaskFeatures | None = None,
    protocol: str = "vlkit",
    domain_styles: bool = False,
    on_fit: Callable[[dict[str, Any], Fitted], None] | None = None,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Run (task, method, shots, seed) not yet in `<out>/results.jsonl`; write table and plot.

    epochs: one epoch budget for every trained method (None = each paper's recipe).
    options: per-method settings, e.g. {"tip-adapter": {"beta_steps": 50}, "cocoop": {"epochs": 5}}
        (a method's own "epochs" overrides `epochs`), on top of the protocol's.
    protocol: "vlkit" (vlkit's defaults) or "paper" (each method's official recipe).
    domain_styles: also evaluate per held-out test style and on unused train-style images.
    on_fit: called with each run's key and fitted method (e.g. to keep a learned prompt).
    """
    methods = check_methods(methods)
    check_protocol(protocol)
    if not tasks or not shots or not seeds:
        raise VlkitError("tasks, shots and seeds: give at least one of each")
    if any(k < 1 for k in shots):
        raise VlkitError(f"shots {list(shots)}: each must be at least 1")
    out = Path(out)
    vl = provider.model if provider is not None else _resolve_model(model)
    provider = provider or TaskFeatures(vl, data_dir, views=views)
    options = options or {}
    settings = {
        "model": getattr(vl, "spec", str(model)),
        "model_fingerprint": vl.fingerprint(),
        "epochs": epochs,
        "views": provider.views,
        "options": options,
        "protocol": protocol,
        "versions": runs.library_versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    results = Results(out / "results.jsonl")
    for task in tasks:
        for method in methods:
            plan = [(0, 0)] if method in TRAINING_FREE else [(k, s) for k in shots for s in seeds]
            for k, seed in plan:
                key = {"kind": "fewshot", "protocol": protocol, "task": task, "method": method, "shots": k, "seed": seed}
                if results.has(key):
                    continue
                own = own_views(protocol, method)
                split = provider.split(task, max(k, 1), seed if seed else seeds[0], styles=domain_styles, own=own)
                opts = method_options(protocol, "fewshot", method, options.get(method, {}), epochs)
                inp = _input(vl, split, k, seed, epochs, opts)
                fitted, seconds = _fit(method, inp)
                if on_fit is not None:
                    on_fit(key, fitted)
                scored: dict[int, float] = {}  # an eval set listed under two names is scored once
                evals = {}
                for name, (x, y) in split.evals.items():
                    if id(x) not in scored:
                        scored[id(x)] = accuracy(fitted.logits(x), y)
                    evals[name] = scored[id(x)]
                record = {
                    **key,
                    "acc": evals["test"],
                    "evals": evals,
                    "n_train": int(len(split.train_labels)),
                    "n_test": int(len(split.evals["test"][1])),
                    "seconds": round(seconds, 3),
                    "epochs": inp.epochs,  # None: the method's own recipe
                    "views": int(split.train_views.shape[1]),
                    "info": fitted.info,
                }
                results.add(record)
                log(f"{task} {method} shots={k} seed={seed}: {record['acc']:.2f}% ({seconds:.1f}s)")
    write_reports(out, results.records, tasks=list(tasks), methods=methods, shots=list(shots))
    return results.records


def write_reports(
    out: Path,
    records: list[dict[str, Any]],
    *,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    averages: dict[str, list[str]] | None = None,
    shots: list[int] | None = None,
) -> None:
    """table.md and fewshot.png from the records (every run in the folder by default)."""
    from vlkit.bench.report import fewshot_table, plot_fewshot

    few = [r for r in records if r.get("kind") == "fewshot"]
    if not few:
        return
    io.write_text(out / "table.md", fewshot_table(few, tasks=tasks, methods=methods, averages=averages, shots=shots))
    plot_fewshot(few, out / "fewshot.png", tasks=tasks, methods=methods, averages=averages)


def merge_results(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    averages: dict[str, list[str]] | None = None,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One report over several result folders, e.g. tasks run at different budgets.

    Refuses folders of different models and a run found in two folders (runs of
    the two protocols are different runs, shown as `<method> (paper)`); writes
    results.jsonl, sources.json (each folder's settings, so every budget stays on
    record), table.md + fewshot.png and, when there are such runs, base_to_new.md.
    """
    from vlkit.bench.report import base_to_new_table

    out = Path(out)
    records: list[dict[str, Any]] = []
    seen: dict[tuple, Path] = {}
    settings: dict[str, Any] = {}
    for src in map(Path, sources):
        if not (src / "results.jsonl").is_file() or not (src / "settings.json").is_file():
            raise VlkitError(f"{src}: not a benchmark results folder (needs results.jsonl and settings.json)")
        try:
            settings[str(src)] = json.loads((src / "settings.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise VlkitError(f"{src / 'settings.json'}: damaged; it must be the JSON a `vlkit bench` run wrote") from None
        prints = {s.get("model_fingerprint") for s in settings.values()}
        if len(prints) > 1:
            raise VlkitError(f"{src}: results of another model ({sorted(map(str, prints))}); merge one model's folders at a time")
        for r in Results(src / "results.jsonl").records:
            key = (r.get("kind"), protocol_of(r), r["task"], r["method"], r["shots"], r["seed"])
            if key in seen:
                raise VlkitError(f"{src}: run {key[1:]} is also in {seen[key]}; merge folders that hold different runs")
            seen[key] = src
            records.append(r)
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(out / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    io.write_json(out / "sources.json", settings)
    write_reports(out, records, tasks=tasks, methods=methods, averages=averages)
    b2n = [r for r in records if r.get("kind") == "base2new"]
    if b2n:
        io.write_text(out / "base_to_new.md", base_to_new_table(b2n, tasks=tasks, methods=methods))
    return records


def run_base_to_new(
    tasks: Sequence[str],
    methods: Sequence[str],
    shots: int,
    seeds: Sequence[int],
    out: str | os.PathLike,
    *,
    model: str | VLModel = "vlkit-tiny",
    data_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    views: int = DEFAULT_VIEWS,
    options: dict[str, dict[str, Any]] | None = None,
    provider: TaskFeatures | None = None,
    protocol: str = "vlkit",
    log: Log = print,
) -> list[dict[str, Any]]:
    """CoCoOp's base-to-new generalisation: train on the base half of the classes,
    report accuracy on base test images (among base classes), on new test images
    (among new classes, with the learned prompt applied to the new names) and
    their harmonic mean. Methods without a transfer (linear probe, Tip-Adapter,
    class-specific CoOp) are skipped with a note. `protocol` as in `run_fewshot`."""
    methods = check_methods(methods)
    check_protocol(protocol)
    out = Path(out)
    vl = provider.model if provider is not None else _resolve_model(model)
    provider = provider or TaskFeatures(vl, data_dir, views=views)
    options = options or {}
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": getattr(vl, "spec", ""),
        "model_fingerprint": vl.fingerprint(),
        "epochs": epochs,
        "views": provider.views,
        "options": options,
        "protocol": protocol,
    }
    _check_settings(out, settings)
    results = Results(out / "results.jsonl")
    for task in tasks:
        for method in methods:
            if method in NO_TRANSFER:
                log(f"{task} {method}: bound to its training classes; not part of base-to-new")
                continue
            for seed in [0] if method in TRAINING_FREE else seeds:
                key = {"kind": "base2new", "protocol": protocol, "task": task, "method": method, "shots": shots, "seed": seed}
                if results.has(key):
                    continue
                split, new_names, (x_new, y_new) = provider.base_new(task, shots, seed or seeds[0])
                opts = method_options(protocol, "base2new", method, options.get(method, {}), epochs)
                fitted, seconds = _fit(method, _input(vl, split, shots, seed, epochs, opts))
                assert fitted.transfer is not None, f"{method} lacks a transfer but is not in NO_TRANSFER"
                x_base, y_base = split.evals["base"]
                base = accuracy(fitted.logits(x_base), y_base)
                new = accuracy(fitted.transfer(new_names)(x_new), y_new)
                hm = 2 * base * new / (base + new) if base + new > 0 else 0.0
                results.add({**key, "base": base, "new": new, "hm": hm, "seconds": round(seconds, 3), "info": fitted.info})
                log(f"{task} {method} seed={seed}: base {base:.2f} new {new:.2f} H {hm:.2f}")
    from vlkit.bench.report import base_to_new_table

    b2n = [r for r in results.records if r.get("kind") == "base2new"]
    if b2n:
        io.write_text(out / "base_to_new.md", base_to_new_table(b2n, tasks=list(tasks), methods=methods))
    return results.records


def run_domain_generalization(
    tasks: Sequence[str],
    methods: Sequence[str],
    shots: int,
    seeds: Sequence[int],
    out: str | os.PathLike,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Train on the task's training styles, test on each held-out style (and on unused
    images of the training styles as the source domain); writes domain.md."""
    records = run_fewshot(tasks, methods, [shots], seeds, out, domain_styles=True, **kwargs)
    from vlkit.bench.report import domain_table

    few = [r for r in records if r.get("kind") == "fewshot" and r["shots"] in (0, shots) and r["task"] in tasks]
    io.write_text(Path(out) / "domain.md", domain_table(few, tasks=list(tasks), methods=check_methods(methods)))
    return records

"""From benchmark tasks to the feature tensors the few-shot methods consume.

One `TaskFeatures` per model: it loads each task once, reads the few-shot draw
shared by every method (`vlkit.data.fewshot.load_fewshot`: same shots for CoOp,
the adapters and the linear probe), and encodes images through the feature
caches (`extract_image_features` for plain features, `augmented_features` for
the training shots' augmented views), so repeated runs and other seeds reuse
every feature already computed. Test features are computed once per task.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from vlkit.adapt import DEFAULT_VIEWS
from vlkit.bench.protocols import OwnViews
from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

Labelled = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FewShotSplit:
    """Everything one (task, shots, seed) run needs; `evals` are never shown to a method."""

    task: str
    classnames: list[str]
    templates: list[str]
    train_views: torch.Tensor  # [N, V, D]
    train_features: torch.Tensor  # [N, D]
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    evals: dict[str, Labelled] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class TaskFeatures:
    """Task loading + feature extraction for one model, with in-process memoisation."""

    def __init__(
        self,
        model: VLModel,
        data_dir: str | os.PathLike | None = None,
        *,
        views: int = DEFAULT_VIEWS,
        cache: bool = True,
        progress: bool = False,
        source_limit: int = 2000,
    ) -> None:
        self.model = model
        self.source_limit = source_limit
        self.data_dir = data_dir
        self.views = views
        self.cache = cache
        self.progress = progress
        self._tasks: dict[str, Any] = {}
        self._feats: dict[str, torch.Tensor] = {}
        self._styles: dict[str, dict[str, str]] = {}

    # -- loading ------------------------------------------------------------------
    def task(self, name: str):
        if name not in self._tasks:
            from vlkit.data.tasks import load_task

            self._tasks[name] = load_task(name, self.data_dir)
        return self._tasks[name]

    def features(self, task, rows: list[tuple[str, int]]) -> Labelled:
        """Plain features of `rows` (relative path, label); unreadable images are dropped."""
        missing = [rel for rel, _ in rows if rel not in self._feats]
        if missing:
            from vlkit.features import extract_image_features

            paths = [str(task.root / rel) for rel in missing]
            res = extract_image_features(self.model, paths, cache=self.cache, progress=self.progress)
            by_path = dict(zip(res.paths, res.features.float().cpu()))
            for rel, path in zip(missing, paths):
                if path in by_path:
                    self._feats[rel] = by_path[path]
        kept = [(rel, y) for rel, y in rows if rel in self._feats]
        if not kept:
            return torch.empty(0, self.model.embed_dim), torch.empty(0, dtype=torch.long)
        return torch.stack([self._feats[r] for r, _ in kept]), torch.tensor([y for _, y in kept], dtype=torch.long)

    def train_views(self, task, rows: list[tuple[str, int]], own: OwnViews | None = None) -> torch.Tensor:
        """[N, V, D] augmented views of the shots (cached on disk by the CoOp feature cache):
        `self.views` normalised views, or a method's `own` views (the paper protocol's Tip-Adapter)."""
        from vlkit.adapt.features import AugmentOptions, augmented_features
        from vlkit.zeroshot import default_cache_dir

        paths = [str(task.root / rel) for rel, _ in rows]
        cache_dir = default_cache_dir() if self.cache else None
        augment, raw = (own.augment, own.raw) if own is not None else (AugmentOptions(views=self.views), False)
        return augmented_features(self.model, paths, augment, cache_dir=cache_dir, progress=self.progress, raw=raw)

    def styles(self, task) -> dict[str, str]:
        """Relative path -> artwork style, from the built metadata of the task's datasets."""
        if task.name not in self._styles:
            from vlkit.data.recipes import read_jsonl

            out = {}
            for dataset in task.definition["datasets"]:
                for row in read_jsonl(task.root / dataset / "metadata.jsonl"):
                    out[f"{dataset}/{row['image']}"] = str(row.get("style", dataset))
            self._styles[task.name] = out
        return self._styles[task.name]

    # -- splits -------------------------------------------------------------------
    def _split_of(self, task, fewshot, name: str, evals: dict[str, Labelled], own: OwnViews | None = None) -> FewShotSplit:
        train_rows = fewshot.splits["train"]
        x_tr, y_tr = self.features(task, train_rows)
        ok = {rel for rel in self._feats}
        train_rows = [(r, y) for r, y in train_rows if r in ok]
        if not train_rows:
            raise VlkitError(f"{name}: no readable training images in the few-shot draw; check the built data")
        views = self.train_views(task, train_rows, own)
        x_va, y_va = self.features(task, fewshot.splits["val"])
        if len(x_va) == 0:
            raise VlkitError(f"{name}: the validation split is empty; methods choose hyper-parameters on it")
        return FewShotSplit(name, list(fewshot.classnames), list(task.templates), views, x_tr, y_tr, x_va, y_va, evals)

    def split(self, task_name: str, shots: int, seed: int, *, styles: bool = False, own: OwnViews | None = None) -> FewShotSplit:
        """The K-shot draw for `seed`, with test features under evals['test'] (and one
        eval set per test style, plus 'source' = unused train-style images, at most
        `source_limit` of them, if `styles`); `own`: the method's own training views."""
        from vlkit.data.fewshot import load_fewshot

        task = self.task(task_name)
        fewshot = load_fewshot(task, shots, seed)
        evals = {"test": self.features(task, task.splits["test"])}
        if styles:
            style_of = self.styles(task)
            by_style: dict[str, list[tuple[str, int]]] = {}
            for rel, y in task.splits["test"]:
                by_style.setdefault(style_of.get(rel, "?"), []).append((rel, y))
            for style, rows in sorted(by_style.items()):
                # one test style: the same set as 'test' (the same tensors, scored once)
                evals[f"target:{style}"] = evals["test"] if len(by_style) == 1 else self.features(task, rows)
            used = {rel for rel, _ in fewshot.splits["train"]}
            source = [(rel, y) for rel, y in task.splits["train"] if rel not in used]
            if len(source) > self.source_limit:  # a fixed subsample keeps encoding bounded
                source = sorted(random.Random(0).sample(source, self.source_limit))
            if source:
                evals["source"] = self.features(task, source)
        return self._split_of(task, fewshot, task_name, evals, own)

    def base_new(self, task_name: str, shots: int, seed: int) -> tuple[FewShotSplit, list[str], Labelled]:
        """CoCoOp's protocol: draw shots on the full task, then keep base classes for
        training; returns (base split with evals['base'], new class names, new test)."""
        from vlkit.data.fewshot import load_fewshot

        task = self.task(task_name)
        base, new = load_fewshot(task, shots, seed).base_to_new()
        if not new.classnames:
            raise VlkitError(f"{task_name}: only {task.num_classes} class; base-to-new needs at least 2")
        split = self._split_of(task, base, task_name, {"base": self.features(task, base.splits["test"])})
        return split, list(new.classnames), self.features(task, new.splits["test"])

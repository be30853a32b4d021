"""Zero-shot classification: class names + prompt templates -> a text classifier.

CLIP classifies an image by comparing its feature with one text feature per class.
Each class's text feature comes from prompt templates ("a photo of a {}."); with
several templates (OpenAI's 80 ImageNet prompts) each prompt's feature is
L2-normalised, the features of a class are averaged and the mean is normalised
again. The classifier is computed once per (model, class names, templates), in
batches that mix classes, kept in memory and optionally on disk, so evaluation
never re-encodes text per image batch (a flaw of the CoOp reference code).

Logits are `logit_scale * cosine(image, class)`, exactly as CLIP's forward.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    import torch

    from vlkit.models.base import VLModel

# torch is imported inside functions: the CLI checks paths, class lists and
# templates first, and a typo should fail in a moment, not after loading torch.

# Named template sets. Each name means one thing across the CLI, the Python API and
# the benchmark (whose "zeroshot" row is a task's first template, "task-first" here):
#   photo       CLIP's generic prompt "a photo of a {}."
#   ensemble    OpenAI's 80 ImageNet prompts (also "openai_imagenet")
#   task-first  a task's first, hand-written template (needs a task)
#   task        all of a task's templates, ensembled (needs a task)
# "single" is refused: it used to mean "photo" here and "task-first" in the benchmark.
PHOTO_TEMPLATE = "a photo of a {}."
SINGLE_TEMPLATE = PHOTO_TEMPLATE  # the prompt CoOp's context replaces ("a photo of a"), by its old name
PLACEHOLDER = "{}"
TEMPLATE_SETS = ("photo", "ensemble", "task-first", "task")
_AMBIGUOUS = {
    "single": "use 'photo' for \"a photo of a {}.\" or, with --task, 'task-first' for the task's own hand-written "
    "prompt (the benchmark's zeroshot row)"
}

# (fingerprint, classnames, templates) -> [C, D] classifier on CPU; small LRU so a
# long-lived process (a notebook, a server) does not grow without bound.
_MEMORY_CACHE: "OrderedDict[str, torch.Tensor]" = OrderedDict()
_MEMORY_CACHE_SIZE = 16


# --------------------------------------------------------------------- templates


def openai_imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates, shipped as data in vlkit/templates/."""
    text = resources.files("vlkit").joinpath("templates", "openai_imagenet.txt").read_text(encoding="utf-8")
    return _parse_template_lines(text.splitlines())


def _parse_template_lines(lines: Sequence[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def resolve_templates(templates: str | os.PathLike | Sequence[str], task_templates: Sequence[str] | None = None) -> list[str]:
    """Turn "photo", "ensemble" (= "openai_imagenet"), "task-first"/"task" (with `task_templates`),
    a file (one per line) or a list into templates.

    Every template must contain "{}" where the class name goes.
    """
    if isinstance(templates, os.PathLike) or isinstance(templates, str):
        name = str(templates)
        if name in _AMBIGUOUS and not isinstance(templates, os.PathLike):
            raise VlkitError(f"templates '{name}': ambiguous; {_AMBIGUOUS[name]}")
        if name == "photo":
            out = [PHOTO_TEMPLATE]
        elif name in ("ensemble", "openai_imagenet"):
            out = openai_imagenet_templates()
        elif name in ("task-first", "task"):
            if not task_templates:
                raise VlkitError(f"templates '{name}': only with a task (--task NAME); use photo, ensemble or a file")
            out = [str(t) for t in (task_templates[:1] if name == "task-first" else task_templates)]
        else:
            path = Path(name)
            if not path.is_file():
                raise VlkitError(
                    f"templates '{name}': not one of {', '.join(TEMPLATE_SETS)} or an existing file; "
                    "pass one of those (a file holds one template per line with {} for the class)"
                )
            from vlkit.data.datasets import read_text

            out = _parse_template_lines(read_text(path, "templates file").splitlines())
            if not out:
                raise VlkitError(f"templates file '{name}' has no templates; write one per line, e.g. 'a photo of a {{}}.'")
    else:
        out = [str(t) for t in templates]
        if not out:
            raise VlkitError("templates: the list is empty; pass at least one template such as 'a photo of a {}.'")
    bad = [t for t in out if PLACEHOLDER not in t]
    if bad:
        raise VlkitError(f"template '{bad[0]}' has no '{{}}' placeholder for the class name; add one, e.g. 'a photo of a {{}}.'")
    return out


def load_classnames(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines and '#' comments ignored)."""
    p = Path(path)
    if not p.is_file():
        raise VlkitError(f"classes file '{p}' does not exist; pass a text file with one class name per line")
    from vlkit.data.datasets import read_text

    names = _parse_template_lines(read_text(p, "classes file").splitlines())
    return check_classnames(names, source=f"classes file '{p}'")


def check_classnames(classnames: Sequence[str], source: str = "class list") -> list[str]:
    """Reject an empty list or duplicates: either makes the classifier meaningless."""
    names = [str(c) for c in classnames]
    if not names:
        raise VlkitError(f"{source} is empty; give the class names, one per line")
    seen: set[str] = set()
    dupes = [c for c in names if c in seen or seen.add(c)]
    if dupes:
        raise VlkitError(f"{source} lists '{dupes[0]}' more than once; class names must be unique")
    return names


def format_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major prompts: all templates of class 0, then class 1, ...

    Underscores in class names become spaces (folder names like "golden_retriever"),
    as CLIP's and CoOp's evaluation code do.
    """
    return [t.replace(PLACEHOLDER, c.replace("_", " ")) for c in classnames for t in templates]


# -------------------------------------------------------------------- classifier


def _cache_key(fingerprint: str, classnames: Sequence[str], templates: Sequence[str], precision: dict | None = None) -> str:
    """Key of one classifier; `precision` (`vlkit.precision.describe(..., "text")`) is
    left out when None (an fp32 text forward), so fp32 keys are the ones they always were."""
    fields: dict[str, Any] = {"model": fingerprint, "classes": list(classnames), "templates": list(templates)}
    if precision is not None:
        fields["precision"] = precision
    blob = json.dumps(fields)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def default_cache_dir() -> Path:
    """Root of vlkit's on-disk caches: $VLKIT_CACHE or ~/.cache/vlkit."""
    base = os.environ.get("VLKIT_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "vlkit"


def ensemble(features: torch.Tensor) -> torch.Tensor:
    """[C, T, D] prompt features -> [C, D]: normalise each, average over T, renormalise."""
    import torch

    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return torch.nn.functional.normalize(features.mean(dim=1), dim=-1)


def text_path(model: "VLModel") -> str:
    """Which text path the classifier takes on `model`; runs record it in their config."""
    return "shared-prefix" if model.shared_prefix_encoder() is not None else "full"


def _encode_classifier(
    model: "VLModel", classnames: list[str], templates: list[str], batch_size: int, progress: bool = False
) -> torch.Tensor:
    """Encode in chunks of whole classes and reduce each chunk at once, so memory
    holds [chunk, T, D], never [C, T, D].

    A causal tower encodes each template's text before the class name once per
    chunk and only the rest of every prompt (`_template_features`); a chunk is then
    `batch_size` classes under one template at a time. Otherwise prompts mixing
    classes and templates go through the tower `batch_size` at a time.
    """
    import torch

    n_t = len(templates)
    encoder = model.shared_prefix_encoder()
    classes_per_chunk = batch_size if encoder is not None else max(1, batch_size // n_t)
    starts = range(0, len(classnames), classes_per_chunk)
    out = []
    with torch.inference_mode(), _progress(progress and len(starts) > 1, len(classnames), len(templates)) as advance:
        for start in starts:
            chunk = classnames[start : start + classes_per_chunk]
            if encoder is not None:
                out.append(ensemble(torch.stack([_template_features(model, encoder, chunk, t) for t in templates], dim=1)))
            else:
                prompts = format_prompts(chunk, templates)
                feats = []
                for i in range(0, len(prompts), batch_size):
                    batch = model.tokenize(prompts[i : i + batch_size]).to(model.device)
                    feats.append(model.encode_text(batch.input_ids, batch.attention_mask, normalize=True))
                out.append(ensemble(torch.cat(feats).view(len(chunk), n_t, -1)))
            advance(len(chunk))
    return torch.cat(out)


def _template_features(model: "VLModel", encoder: Any, classnames: list[str], template: str) -> torch.Tensor:
    """[C, D] features of one template's prompts, the text before "{}" encoded once.

    Exact row by row: a prompt takes the shared path only if its first tokens are
    the specials plus the tokens of that text alone (so the tower sees the same
    prefix); any other (a BPE merge across the boundary, truncation) runs in full.
    """
    import torch

    from vlkit.adapt.prompt_learner import special_tokens

    batch = model.tokenize(format_prompts(classnames, [template])).to(model.device)
    ids, mask = batch.input_ids, batch.attention_mask
    head = template.split(PLACEHOLDER)[0]
    shared = torch.zeros(len(classnames), dtype=torch.bool, device=ids.device)
    if not head or head[-1].isspace():
        prefix = torch.tensor(special_tokens(model).start + model.tokenizer.tokens(head.strip()), device=ids.device)
        p = len(prefix)
        if p < ids.shape[1]:
            shared = (ids[:, :p] == prefix).all(dim=1) & mask[:, :p].bool().all(dim=1) & mask[:, p:].bool().any(dim=1)
    rows, parts = [], []
    if shared.any():
        suffix_mask = mask[shared, p:]
        length = int(suffix_mask.sum(dim=1).max())
        suffix = model.token_embedding(ids[shared, p : p + length])
        parts.append(encoder.encode(model.token_embedding(prefix[None]), suffix, suffix_mask[:, :length])[0])
        rows.append(shared.nonzero().squeeze(1))
    if not shared.all():
        parts.append(model.encode_text(ids[~shared], mask[~shared], normalize=True))
        rows.append((~shared).nonzero().squeeze(1))
    feats = torch.cat(parts)
    return torch.empty_like(feats).index_copy_(0, torch.cat(rows), feats)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, n_templates: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over classes on stderr, or a no-op."""
    if not enabled:
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]text classifier ({n_templates} template{'s' if n_templates != 1 else ''})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("classes", total=total)
        yield lambda k: bar.update(task, advance=k)


def zeroshot_classifier(
    model: "VLModel",
    classnames: Sequence[str],
    templates: str | os.PathLike | Sequence[str] = "photo",
    *,
    batch_size: int = 256,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> torch.Tensor:
    """[C, D] unit-norm float32 class weights on the model's device.

    cache=True reuses an in-memory copy for the same (model fingerprint, class
    names, templates, text precision); with `cache_dir` also a safetensors file
    there, written atomically. cache=False always recomputes and stores nothing.
    precision: "fp32", "bf16" (the text forward under bfloat16 autocast) or "int8"
    (whose text tower stays fp32, so it shares fp32's classifier); see `vlkit.precision`.
    """
    from vlkit import precision as precisions

    precisions.check(precision, "precision")
    names = check_classnames(classnames)
    temps = resolve_templates(templates)

    def encode() -> torch.Tensor:
        runner = precisions.prepare(model, precision, "text")
        with precisions.autocast(precision, model.device):
            return _encode_classifier(runner, names, temps, batch_size, progress).float()

    if not cache:
        return encode().clone()  # clone: a normal, autograd-usable tensor
    key = _cache_key(model.fingerprint(), names, temps, precisions.describe(precision, "text"))
    if key in _MEMORY_CACHE:
        _MEMORY_CACHE.move_to_end(key)
        return _MEMORY_CACHE[key].to(model.device, copy=True)  # a copy: callers may edit theirs in place
    disk = Path(cache_dir) / "zeroshot-text" / f"{key}.safetensors" if cache_dir is not None else None
    weights = None
    if disk is not None and disk.is_file():
        from safetensors.torch import load_file

        try:
            weights = load_file(str(disk))["classifier"]
        except Exception:  # a damaged cache entry is recomputed and overwritten
            weights = None
        if weights is not None and weights.shape[0] != len(names):
            weights = None
    if weights is None:
        weights = encode().cpu().clone()
        if disk is not None:
            from vlkit import io

            io.save_safetensors(disk, {"classifier": weights}, metadata={"key": key, "num_templates": str(len(temps))})
    _MEMORY_CACHE[key] = weights.cpu().clone()
    while len(_MEMORY_CACHE) > _MEMORY_CACHE_SIZE:
        _MEMORY_CACHE.popitem(last=False)
    return weights.to(model.device)


def clear_memory_cache() -> None:
    """Forget in-memory classifiers (benchmarks use this to time a cold start)."""
    _MEMORY_CACHE.clear()


def logits(model: "VLModel", image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """CLIP logits: logit_scale * cosine similarity, [N, C]."""
    import torch

    img = torch.nn.functional.normalize(image_features.float(), dim=-1)
    scale = model.logit_scale.detach().float().to(img.device)
    return scale * img @ classifier.float().to(img.device).T


# ------------------------------------------------------------------ classification


@dataclass
class LabeledImages:
    """What classification needs from a dataset: image paths, optional labels, class names."""

    paths: list[str]
    labels: list[int] | None
    classnames: list[str] | None


@dataclass
class ZeroShotResult:
    """Per-image scores for the images that loaded, plus what was skipped and why."""

    classnames: list[str]
    templates: list[str]
    paths: list[str]
    logits: torch.Tensor
    labels: list[int] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model_fingerprint: str = ""

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=-1)

    @property
    def predictions(self) -> list[int]:
        return self.logits.argmax(dim=-1).tolist()

    def metrics(self) -> dict[str, Any]:
        """Top-1/5, mean per-class recall, per-class accuracy, confusion matrix, skipped images."""
        from vlkit.metrics import classification_metrics

        out: dict[str, Any] = {}
        if self.labels is not None:
            out.update(classification_metrics(self.logits, self.labels, self.classnames))
        else:
            out["n"] = len(self.paths)
        out["num_skipped"] = len(self.skipped)
        out["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        # JSON has no NaN: a metric with no images to average over is null
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    def write_predictions(self, path: str | os.PathLike, top_k: int = 5) -> None:
        """predictions.csv: one row per scored image, input order, atomically written."""
        from vlkit import io

        probs = self.probabilities
        k = min(top_k, len(self.classnames))
        top_i = probs.topk(k, dim=-1).indices
        preds = self.predictions  # argmax, as the metrics count it
        with io.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "prediction", "probability", "correct", f"top{k}"])
            for row, p in enumerate(self.paths):
                pred = preds[row]
                label = self.classnames[self.labels[row]] if self.labels is not None else ""
                correct = "" if self.labels is None else int(self.labels[row] == pred)
                top = "|".join(self.classnames[int(i)] for i in top_i[row])
                w.writerow([p, label, self.classnames[pred], f"{float(probs[row, pred]):.6f}", correct, top])

    def save(self, run_dir: str | os.PathLike) -> dict[str, Any]:
        """Write metrics.json and predictions.csv into a run folder; return the metrics."""
        from vlkit import runs

        m = self.metrics()
        self.write_predictions(Path(run_dir) / "predictions.csv")
        runs.write_metrics(run_dir, m)
        return m


def _map_dataset_classes(ds_names: list[str], names: list[str], source: str) -> list[int]:
    """Index into the user's class list for each dataset class.

    By name when every dataset class appears in the user's list (a subset or a
    reordering); otherwise, when the counts match, by position (the user's file
    gives display names for the dataset's sorted classes, like CoOp's classnames.txt).
    """
    where = {n: i for i, n in enumerate(names)}
    if all(n in where for n in ds_names):
        return [where[n] for n in ds_names]
    if len(ds_names) == len(names):
        return list(range(len(names)))
    missing = [n for n in ds_names if n not in where]
    raise VlkitError(
        f"{source} has {len(ds_names)} classes but the class list has {len(names)} and lacks '{missing[0]}'; "
        "list the dataset's class names, or one name per dataset class in its sorted order"
    )


def as_labeled_images(
    data: Any,
    classnames: Sequence[str] | None = None,
    *,
    image_col: str | None = None,
    label_col: str | None = None,
) -> LabeledImages:
    """Accept a dataset (anything with `paths`, `labels`, `classnames`), a path (image
    folder, CSV or JSONL; table columns found by their usual names unless given), a
    list of image paths, or a list of (path, label) pairs with labels as indices or
    names. `classnames` overrides the dataset's."""
    names = check_classnames(classnames, source="class list") if classnames is not None else None
    if isinstance(data, (str, os.PathLike)):
        from vlkit.data.datasets import open_dataset

        p = Path(data)
        # a table's string labels index straight into the user's list
        data = open_dataset(p) if p.is_dir() else open_dataset(p, image_col=image_col, label_col=label_col, classnames=names)
    if hasattr(data, "paths") and hasattr(data, "labels"):
        paths = [str(x) for x in data.paths]
        raw = data.labels
        ds_names = list(getattr(data, "classnames", None) or []) or None
        source = f"dataset '{getattr(data, 'root', None) or getattr(data, 'path', '')}'"
        if raw is None:
            return LabeledImages(paths, None, names or ds_names)
        if names is None:
            return LabeledImages(paths, [int(y) for y in raw], ds_names)
        if ds_names is None or ds_names == names:
            return LabeledImages(paths, [int(y) for y in raw], names)
        mapping = _map_dataset_classes(ds_names, names, source)
        return LabeledImages(paths, [mapping[int(y)] for y in raw], names)
    items = list(data)
    if items and isinstance(items[0], (tuple, list)):
        labels = []
        for path, y in items:
            if isinstance(y, str):
                if names is None or y not in names:
                    raise VlkitError(f"{path}: label '{y}' is not in the class list; add it or fix the label")
                labels.append(names.index(y))
            else:
                labels.append(int(y))
        return LabeledImages([str(p) for p, _ in items], labels, names)
    return LabeledImages([str(p) for p in items], None, names)


def task_images(task: Any, split: str = "test", classnames: Sequence[str] | None = None) -> LabeledImages:
    """One split of a `vlkit.data.tasks.Task` (paths, label indices, the task's class
    names, or `classnames` given one per task class in the task's order)."""
    if split not in task.splits:
        raise VlkitError(f"split '{split}': task {task.name} has splits {', '.join(task.splits)}; pass one of them")
    names = list(task.classnames)
    if classnames is not None:
        given = check_classnames(classnames, source="class list")
        if len(given) != len(names):
            raise VlkitError(f"class list has {len(given)} names but task {task.name} has {len(names)} classes; give one per task class")
        names = given
    paths = [str(p) for p in task.paths(split)]
    if not paths:
        raise VlkitError(f"split '{split}' of task {task.name} is empty; pick another split")
    return LabeledImages(paths, list(task.labels(split)), names)


def classify(
    model: "VLModel",
    data: Any,
    classnames: Sequence[str] | None = None,
    templates: str | os.PathLike | Sequence[str] = "photo",
    *,
    batch_size: int = 64,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    precision: str = "fp32",
) -> ZeroShotResult:
    """Zero-shot classify `data` with `model`.

    `data`: an image folder / CSV / JSONL path, a dataset, a list of image paths or
    (path, label) pairs. `classnames` defaults to the dataset's. `templates`:
    "photo", "ensemble" (OpenAI's 80), a file or a list. `cache` turns on the image
    feature cache (`<cache_dir>/features`) and the text classifier cache (memory,
    plus `<cache_dir>/zeroshot-text`); `cache_dir` defaults to `default_cache_dir()`.
    Unreadable images are skipped and listed in `result.skipped`; when none is
    left, a VlkitError says so (metrics over no image would be n/a, not a result).
    `precision` ("fp32", "bf16", "int8"; `vlkit.precision`) applies to the text
    classifier and the image features alike, and both caches key on it.
    """
    import torch

    from vlkit.data.cache import FeatureCache
    from vlkit.features import extract_image_features

    items = as_labeled_images(data, classnames)
    if items.classnames is None:
        raise VlkitError("class list is empty: the data has no labels; pass class names (--classes FILE)")
    names = check_classnames(items.classnames)
    temps = resolve_templates(templates)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    classifier = zeroshot_classifier(
        model, names, temps, batch_size=max(batch_size, 256), cache=cache, cache_dir=root if cache else None, progress=progress,
        precision=precision,
    )
    image_cache = FeatureCache(root / "features") if cache else False
    feats = extract_image_features(model, items.paths, batch_size=batch_size, cache=image_cache, progress=progress, precision=precision)
    skipped = [(str(p), str(r)) for p, r in feats.skipped]
    if not feats.paths:
        total = len(items.paths)
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise VlkitError(f"none of the {total} images could be read{first}; check the files")
    kept_labels = None
    if items.labels is not None:
        # feats.paths is the input order minus skipped files: walk both in step so
        # a path listed twice with different labels keeps each label.
        kept_labels, j = [], 0
        ok = [str(p) for p in feats.paths]
        for p, y in zip(items.paths, items.labels):
            if j < len(ok) and ok[j] == p:
                kept_labels.append(y)
                j += 1
    with torch.no_grad():
        scores = logits(model, feats.features.to(classifier.device), classifier).cpu()
    return ZeroShotResult(
        classnames=names,
        templates=temps,
        paths=[str(p) for p in feats.paths],
        logits=scores,
        labels=kept_labels,
        skipped=skipped,
        model_fingerprint=model.fingerprint(),
    )

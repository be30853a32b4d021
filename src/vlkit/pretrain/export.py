"""Write a trained `DualEncoder` in vlkit's model format (`vlkit.models.vlkit_format`).

The image tower, both projections and the temperature are saved; a locked
pretrained text tower is referenced by its source (package or folder), never
copied, so `load_model(folder)` rebuilds exactly the trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlkit.errors import VlkitError
from vlkit.pretrain.build import PACKAGE_PREFIX
from vlkit.pretrain.config import ModelConfig
from vlkit.pretrain.model import DualEncoder


def vision_config_dict(cfg: ModelConfig) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(cfg.image_tower.model_type, **cfg.image_tower.config).to_dict()


def text_tower_ref(cfg: ModelConfig) -> str:
    ref = cfg.text_tower.pretrained
    if not ref:
        raise VlkitError("export: a text tower trained from scratch cannot be referenced; lock a pretrained one")
    if ref.startswith(PACKAGE_PREFIX):
        return ref[len(PACKAGE_PREFIX):].replace("_", "-")
    return str(Path(ref).expanduser().resolve())


@torch.no_grad()
def export_vlkit(model: DualEncoder, cfg: ModelConfig, folder: str | Path) -> Path:
    """Save `model` as a `vlkit-dual-encoder` folder loadable with `vlkit.models.load_model`."""
    from vlkit.models.preprocess import PreprocessConfig
    from vlkit.models.vlkit_format import build_vlkit_dual_encoder, save_vlkit_dual_encoder

    if cfg.image_tower.pooling != "pooler":
        raise VlkitError("export: vlkit's format pools the image tower with its pooler; set model.image_tower.pooling to 'pooler'")
    s = cfg.image_size
    pre = PreprocessConfig(
        resize="shortest_edge", size=s, resample="bicubic", crop_size=(s, s), rescale_factor=1 / 255,
        mean=tuple(cfg.image_mean), std=tuple(cfg.image_std),
    )
    out = build_vlkit_dual_encoder(
        vision_config_dict(cfg),
        text_tower=text_tower_ref(cfg),
        projection_dim=cfg.embed_dim,
        preprocess=pre,
        context_length=cfg.text_tower.context_length,
        text_pooling=cfg.text_tower.pooling,
        spec="vlkit-dual-encoder",
    )
    out.vision_model.load_state_dict(model.vision_model.state_dict())
    out.visual_projection.load_state_dict(model.visual_projection.state_dict())
    out.text_projection.load_state_dict(model.text_projection.state_dict())
    out.log_logit_scale.copy_(model.log_logit_scale.detach().cpu())
    if not cfg.lock_text:
        out.text_model.load_state_dict(model.text_model.state_dict())
    return save_vlkit_dual_encoder(out, folder)

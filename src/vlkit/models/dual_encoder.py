"""`DualEncoderModel`: one adapter for every two-tower transformers checkpoint.

A Hugging Face `CLIPModel`, a `VisionTextDualEncoderModel` and vlkit's own format
share one shape: `vision_model`, `text_model`, bias-free `visual_projection` and
`text_projection`, and a learned log temperature. This class holds those parts
(under the same names, so state dicts line up) and implements `VLModel`:

- image features = visual_projection(vision tower's pooled output), exactly what
  `get_image_features` computes;
- text features = text_projection(pooled text), pooled as the checkpoint defines
  (`text_pooling`): CLIP text towers pool their EOT token; a
  `VisionTextDualEncoderModel` uses the text tower's pooler; vlkit's format may
  use the sentence-transformers pooling of its text tower (mean for all-MiniLM-L6-v2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.models.base import ImagePreprocess, TextPooling, Tokenizer, VLModel
from vlkit.models.fingerprint import fingerprint
from vlkit.models.towers import clip_text_pooled_from_embeddings, pool_text, vision_pooled


def _is_causal_clip_text(text_model: nn.Module) -> bool:
    from transformers import CLIPTextModel

    return isinstance(text_model, CLIPTextModel)


class DualEncoderModel(VLModel):
    """Vision tower + text tower + linear projections into a shared, normalised space."""

    def __init__(
        self,
        *,
        spec: str,
        kind: str,
        vision_model: nn.Module,
        text_model: nn.Module,
        visual_projection: nn.Linear,
        text_projection: nn.Linear,
        log_logit_scale: torch.Tensor,
        tokenizer: Tokenizer,
        preprocess: ImagePreprocess,
        text_pooling: TextPooling,
        description: dict[str, Any],
    ) -> None:
        super().__init__()
        causal = _is_causal_clip_text(text_model)
        if causal != (text_pooling == "eot"):
            raise ValueError(f"text pooling {text_pooling!r} does not fit a {type(text_model).__name__} tower")
        self.spec = spec
        self.kind = kind
        self.vision_model = vision_model
        self.text_model = text_model
        self.visual_projection = visual_projection
        self.text_projection = text_projection
        self.log_logit_scale = log_logit_scale if isinstance(log_logit_scale, nn.Parameter) else nn.Parameter(log_logit_scale)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.text_pooling = text_pooling
        self.embed_dim = int(visual_projection.out_features)
        self.description = description
        # Filled in by vlkit's own format (vlkit.models.vlkit_format) so the model can be saved back.
        self.vlkit_meta: dict[str, Any] | None = None

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.visual_projection(vision_pooled(self.vision_model, pixel_values))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        # A causal CLIP tower's own pooler output is its EOT state, exactly as get_text_features uses it.
        pooled = out.pooler_output if self.text_pooling == "eot" else pool_text(out, attention_mask, self.text_pooling)
        features = self.text_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.get_input_embeddings()(input_ids)

    def encode_text_embeddings(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        if self.text_pooling == "eot":
            pooled = clip_text_pooled_from_embeddings(self.text_model, inputs_embeds, attention_mask)
        else:
            out = self.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
            pooled = pool_text(out, attention_mask, self.text_pooling)
        features = self.text_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def shared_prefix_encoder(self):
        if self.text_pooling != "eot":
            return None
        from vlkit.models.shared_prefix import hf_clip_text_encoder

        return hf_clip_text_encoder(self.text_model, self.text_projection)

    def fingerprint(self) -> str:
        return fingerprint(
            self,
            {
                "kind": self.kind,
                "model": self.description,
                "text_pooling": self.text_pooling,
                "preprocess": self.preprocess.describe(),
                "tokenizer": self.tokenizer.describe() if hasattr(self.tokenizer, "describe") else repr(self.tokenizer),
            },
        )

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, kind={self.kind}, text_pooling={self.text_pooling}, embed_dim={self.embed_dim}"

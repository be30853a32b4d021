"""The dual encoder vlkit pretrains: any transformers image tower, any text tower.

Towers come from transformers configs (`AutoModel.from_config`) or a pretrained
folder (the packaged all-MiniLM-L6-v2). Each tower is followed by a linear
projection into the shared space; a learnable log-temperature scales the cosine
similarities. A locked tower (LiT) runs in eval mode with no gradients, so its
outputs can be computed once up front: `forward` accepts pooled text tower
outputs (float [B, width]) in place of token ids for exactly that purpose.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ImagePooling = Literal["pooler", "cls", "mean"]
TextPooling = Literal["mean", "cls"]


def pool_image(outputs, pooling: ImagePooling) -> torch.Tensor:
    """One vector per image from a transformers vision model's outputs."""
    if pooling == "pooler":
        return outputs.pooler_output.flatten(1)
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if hidden.dim() == 4:  # conv feature map [B, C, H, W]
        return hidden.mean(dim=(2, 3))
    return hidden.mean(dim=1)


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: TextPooling) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers style) or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class DualEncoder(nn.Module):
    """Image tower + projection, text tower + projection, learnable logit scale."""

    def __init__(
        self,
        image_tower: nn.Module,
        image_width: int,
        text_tower: nn.Module,
        text_width: int,
        embed_dim: int,
        image_pooling: ImagePooling = "pooler",
        text_pooling: TextPooling = "mean",
        init_logit_scale: float = 2.6592,
    ):
        super().__init__()
        self.vision_model = image_tower
        self.text_model = text_tower
        self.image_pooling = image_pooling
        self.text_pooling = text_pooling
        self.image_width, self.text_width = image_width, text_width
        self.visual_projection = nn.Linear(image_width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    def image_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pool_image(self.vision_model(pixel_values=pixel_values), self.image_pooling)

    def text_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return pool_text(out.last_hidden_state, attention_mask, self.text_pooling)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.visual_projection(self.image_pooled(pixel_values))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, text, normalize: bool = True) -> torch.Tensor:
        """`text` is either pooled tower outputs [B, text_width] or (input_ids, attention_mask)."""
        pooled = text if torch.is_tensor(text) else self.text_pooled(*text)
        z = self.text_projection(pooled.to(self.text_projection.weight.dtype))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, pixel_values: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the logit scale, in one call so DDP
        sees every trainable parameter used."""
        return self.encode_image(pixel_values), self.encode_text(text), self.logit_scale


def lock_(module: nn.Module) -> None:
    """LiT locking: no gradients and eval mode (no dropout) for a tower."""
    module.requires_grad_(False)
    module.eval()


def tower_width(tower: nn.Module, pooling: ImagePooling, image_size: int) -> int:
    """Output width of an image tower, found by running it once on a dummy batch."""
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        out = pool_image(tower(pixel_values=torch.zeros(1, 3, image_size, image_size)), pooling)
    tower.train(was_training)
    return int(out.shape[-1])

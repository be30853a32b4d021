"""The CLIP objective: symmetric cross-entropy over the image-text similarity matrix.

Row i of the matrix compares image i with every caption in the (global) batch; the
matching caption sits on the diagonal. Averaging the image->text and text->image
cross-entropies gives CLIP's loss. With several ranks, features are gathered with
gradients so the negatives are the global batch; `local_loss` keeps only this
rank's rows (memory B_local x B_global instead of B_global^2) with the same
gradient after DDP averaging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.pretrain.distributed import gather_with_grad

MAX_LOGIT_SCALE = 100.0


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """[B_img, B_txt] scaled cosine similarities (features already normalised)."""
    return logit_scale * image_features @ text_features.t()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss of one batch whose pairs are aligned by index."""
    logits = clip_logits(image_features.float(), text_features.float(), logit_scale.float())
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class ClipLoss(nn.Module):
    """CLIP loss over the global batch of all ranks.

    `local_loss=False`: every rank computes the full global loss (identical values);
    `local_loss=True`: each rank scores its own rows and columns against the global
    batch, and the mean over ranks equals the global loss. Either way the gradient
    after DDP averaging is the gradient of the global-batch loss.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_loss: bool = False):
        super().__init__()
        self.rank, self.world_size, self.local_loss = rank, world_size, local_loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return clip_loss(image_features, text_features, logit_scale)
        all_img = gather_with_grad(image_features)
        all_txt = gather_with_grad(text_features)
        if not self.local_loss:
            return clip_loss(all_img, all_txt, logit_scale)
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + self.rank * n
        scale = logit_scale.float()
        logits_i = scale * image_features.float() @ all_txt.float().t()
        logits_t = scale * text_features.float() @ all_img.float().t()
        # Mean over ranks of these equals the global loss: each rank holds n of the W*n rows.
        return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))


def init_logit_scale(temperature: float = 0.07) -> float:
    """log(1/T), the value CLIP initialises its learnable log-scale to."""
    return math.log(1.0 / temperature)


@torch.no_grad()
def clamp_logit_scale_(log_scale: torch.Tensor, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep exp(log_scale) <= max_scale (CLIP clips at 100 to keep training stable)."""
    log_scale.clamp_(0.0, math.log(max_scale))

"""Zero-shot evaluation of a model being trained, on benchmark tasks' splits.

The text classifier is CLIP's: each class name in every template, normalised,
averaged over templates, renormalised. Reported beside two baselines any
classifier must beat: chance (1 / classes) and the majority class of the split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from vlkit.pretrain import augment
from vlkit.pretrain.build import encode_pooled_text
from vlkit.pretrain.data import load_image_tensor
from vlkit.pretrain.model import DualEncoder


@torch.no_grad()
def class_weights(model: DualEncoder, tokenizer, classnames: list[str], templates: list[str], context_length: int) -> torch.Tensor:
    """[C, D] normalised, template-ensembled text classifier."""
    prompts = [t.format(c) for c in classnames for t in templates]
    pooled = encode_pooled_text(model, tokenizer, prompts, context_length)
    feats = model.encode_text(pooled.to(model.text_projection.weight.device))
    feats = feats.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def encode_images(model: DualEncoder, images_uint8: torch.Tensor, mean, std, batch_size: int = 512) -> torch.Tensor:
    device = model.visual_projection.weight.device
    out = []
    for i in range(0, len(images_uint8), batch_size):
        px = augment.normalize(images_uint8[i : i + batch_size], mean, std).to(device)
        out.append(model.encode_image(px).float().cpu())
    return torch.cat(out)


def baselines(labels: list[int], num_classes: int) -> dict[str, float]:
    counts = Counter(labels)
    return {"chance": 1.0 / num_classes, "majority": max(counts.values()) / len(labels)}


@torch.no_grad()
def zeroshot_task(model: DualEncoder, tokenizer, task, split: str, image_size: int, mean, std, context_length: int) -> dict[str, Any]:
    """top-1 / top-5 / mean per-class recall of `task` on `split`, with baselines."""
    was = model.training
    model.eval()
    paths, labels = task.paths(split), task.labels(split)
    weights = class_weights(model, tokenizer, task.classnames, task.templates, context_length)
    feats = encode_images(model, load_image_tensor(paths, image_size), mean, std)
    logits = feats @ weights.t().cpu()
    y = torch.tensor(labels)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct1 = top5[:, 0] == y
    recalls = [correct1[y == c].float().mean().item() for c in y.unique().tolist()]
    model.train(was)
    return {
        "task": task.name,
        "split": split,
        "n": len(labels),
        "classes": task.num_classes,
        "top1": correct1.float().mean().item(),
        "top5": (top5 == y[:, None]).any(1).float().mean().item(),
        "mean_per_class_recall": sum(recalls) / len(recalls),
        **baselines(labels, task.num_classes),
    }

"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided
Context Optimization").

CoOp plus one term: the learned prompts' class text features w_c are pulled
toward the hand-written prompt's text features w_c^clip, so the learned context
keeps the general knowledge of the hand-written prompt and forgets less on
unseen classes:

    loss = cross_entropy + lambda * (1 - mean_c cos(w_c, w_c^clip))

(the form of the reference code, default lambda 8.0; for unit vectors it is
lambda/2 times the paper's mean squared Euclidean distance). Training is CoOp's
(`vlkit.adapt.coop.train_coop`) with this term added on the class features of
each step. A larger lambda keeps the prompts nearer the hand-written ones, as
long as lr * lambda stays small enough for SGD not to overshoot the pull (on the
stiff tiny test towers, lr 0.002 overshoots from lambda ~10 on).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from vlkit.adapt.coop import CoOpConfig, CoOpResult, train_coop
from vlkit.adapt.prompt_learner import PromptOptions
from vlkit.errors import VlkitError
from vlkit.models.base import VLModel


def context_from_template(template: str) -> tuple[str, str]:
    """("a photo of a", ".") from "a photo of a {}.": the hand-written prompt as
    CoOp context initialisation plus suffix, so training starts at that prompt."""
    if template.count("{}") != 1:
        raise VlkitError(f"template {template!r}: needs exactly one '{{}}' where the class name goes")
    prefix, suffix = template.split("{}")
    if not prefix.strip():
        raise VlkitError(f"template {template!r}: the class name must follow some words to initialise the context from")
    return prefix.strip(), suffix.strip()


@dataclass(frozen=True)
class KgCoOpConfig:
    """CoOp's settings plus the regulariser weight; the context starts at `template`."""

    coop: CoOpConfig = field(default_factory=CoOpConfig)
    weight: float = 8.0
    template: str = "a photo of a {}."

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise VlkitError(f"KgCoOp weight {self.weight}: must be >= 0")


def knowledge_loss(text_features: torch.Tensor, hand_features: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * (1 - mean cosine) between learned [C, D] and hand-written [C, D] class features."""
    cos = F.cosine_similarity(text_features.float(), hand_features.float().to(text_features.device), dim=-1, eps=1e-7)
    return weight * (1.0 - cos.mean())


def train_kgcoop(
    model: VLModel,
    classnames: Sequence[str],
    features: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    config: KgCoOpConfig = KgCoOpConfig(),
    *,
    hand_features: torch.Tensor | None = None,
    shots: int | None = None,
) -> CoOpResult:
    """Train KgCoOp. `hand_features` [C, D] default to the zero-shot classifier of
    `config.template`; the context is initialised from that template's words."""
    if hand_features is None:
        from vlkit.zeroshot import zeroshot_classifier

        hand_features = zeroshot_classifier(model, classnames, [config.template], cache=False)
    if hand_features.shape[0] != len(classnames):
        raise VlkitError(f"hand-written features: {hand_features.shape[0]} rows for {len(classnames)} class names")
    ctx_init, suffix = context_from_template(config.template)
    prompt: PromptOptions = replace(config.coop.prompt, ctx_init=ctx_init, suffix=suffix)
    coop = replace(config.coop, prompt=prompt)
    hand = F.normalize(hand_features.detach().float(), dim=-1)
    return train_coop(
        model,
        classnames,
        features,
        labels,
        coop,
        shots=shots,
        text_loss=lambda text: knowledge_loss(text, hand, config.weight),
    )

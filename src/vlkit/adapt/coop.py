"""CoOp training: learn the context vectors on cached image features.

Recipe of the paper (and its code) as the default: SGD (lr 0.002, momentum 0.9,
weight decay 5e-4), batch 32, one warm-up epoch at a constant 1e-5, then a
cosine schedule stepped per epoch; 50 epochs for 1 shot, 100 for 2-4, 200 for
8-16, and 50 at every shot count on a task of ImageNet's size (1,000 classes or
more: CoOp's scripts use its `*_ep50` configs for ImageNet in every setting).
Everything is overridable through `CoOpConfig`.

What differs from the reference code, on purpose:
- A step runs only the text tower: image features of several augmented views
  per training image are cached (`vlkit.adapt.features`) and a step samples one
  view per image. The text features of all class prompts are computed once per
  step (CoOp's context does not depend on the image), not once per image.
- Precision: "fp32", "bf16" (autocast) or "amp" (fp16 autocast with a gradient
  scaler). The context is always an fp32 master parameter; fp16 weights are never
  updated directly (the reference does so, and its updates underflow).
- Many classes: with `class_chunk` the text tower sees that many classes at a
  time. The loss is formed on the concatenated features, its gradient with
  respect to them is taken, and each chunk is re-encoded and back-propagated on
  its own, so memory holds one chunk's activations, not all classes'.
- Deterministic: the seed fixes the context initialisation, batch order and view
  choice (separate generators, so changing one option does not reshuffle the rest).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

Precision = Literal["fp32", "bf16", "amp"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "amp")


MANY_CLASSES = 1000  # ImageNet's class count: CoOp trains such a task 50 epochs


def epochs_for_shots(shots: int, n_classes: int | None = None) -> int:
    """The paper's epoch count: 50 for 1 shot, 100 for 2-4 shots, 200 for more;
    50 at every shot count from `MANY_CLASSES` classes on (CoOp's ImageNet rule)."""
    if shots <= 1 or (n_classes is not None and n_classes >= MANY_CLASSES):
        return 50
    if shots <= 4:
        return 100
    return 200


def run_epochs(epochs: int | None, shots: int | None, n_images: int, n_classes: int) -> int:
    """The epochs a run trains: `epochs` if given, else the paper's count for `shots`
    (taken as images per class when not given) and the class count."""
    if epochs is not None:
        return epochs
    return epochs_for_shots(shots if shots is not None else max(1, n_images // n_classes), n_classes)


@dataclass(frozen=True)
class CoOpConfig:
    """Every training setting; defaults are the paper's recipe."""

    prompt: PromptOptions = field(default_factory=PromptOptions)
    epochs: int | None = None  # None: by shot count (epochs_for_shots)
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: Precision = "fp32"
    seed: int = 1
    class_chunk: int | None = None  # classes per text-tower pass; None = all at once

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise VlkitError(f"precision {self.precision!r}: unknown; use one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise VlkitError(f"batch size {self.batch_size}: must be at least 1")
        if self.epochs is not None and self.epochs < 1:
            raise VlkitError(f"epochs {self.epochs}: must be at least 1")
        if self.class_chunk is not None and self.class_chunk < 1:
            raise VlkitError(f"class chunk {self.class_chunk}: must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CoOpConfig":
        d = dict(d)
        prompt = PromptOptions.from_dict(d.pop("prompt", {}))
        return cls(prompt=prompt, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def lr_at_epoch(epoch: int, total_epochs: int, lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Learning rate of a 0-based epoch: constant warm-up, then cosine over `total_epochs`.

    As the reference (Dassl's ConstantWarmupScheduler around CosineAnnealingLR with
    T_max = max_epoch): after warm-up the cosine restarts from its first step.
    """
    if epoch < warmup_epochs:
        return warmup_lr
    t = epoch - warmup_epochs
    return 0.5 * lr * (1.0 + math.cos(math.pi * t / total_epochs))


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the frozen towers; the trainable context stays fp32 either way."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params, config: CoOpConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def freeze(model: VLModel) -> None:
    """Frozen backbone: no gradients, eval mode (dropout off, as CoOp)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


TextLoss = Callable[[torch.Tensor], torch.Tensor]


def coop_loss_backward(
    model: VLModel,
    learner: PromptLearner,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    precision: Precision = "fp32",
    class_chunk: int | None = None,
    text_loss: TextLoss | None = None,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> tuple[float, float]:
    """One step's forward and backward; returns (loss, batch accuracy). The caller steps.

    `text_loss(text_features)` adds a term on the [C, D] class features (KgCoOp's
    pull toward the hand-written prompt uses this). `scale_loss` is where a
    GradScaler hooks in.
    """
    device = image_features.device
    scale = model.logit_scale.detach().float()
    n_cls = learner.n_cls

    def head(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = scale * image_features.float() @ text.float().t()
        loss = F.cross_entropy(logits, labels)
        if text_loss is not None:
            loss = loss + text_loss(text.float())
        return loss, logits

    if class_chunk is None or class_chunk >= n_cls:
        with autocast(precision, device):
            text = learner.text_features(model)
        loss, logits = head(text)
        scale_loss(loss).backward()
    else:
        # Two passes: features without a graph, the loss's gradient on them, then
        # each chunk re-encoded with a graph and back-propagated alone.
        with torch.no_grad(), autocast(precision, device):
            text = learner.text_features(model, chunk_size=class_chunk)
        text = text.float().requires_grad_(True)
        loss, logits = head(text)
        scale_loss(loss).backward()
        grad = text.grad
        for start in range(0, n_cls, class_chunk):
            idx = torch.arange(start, min(start + class_chunk, n_cls), device=learner.token_ids.device)
            with autocast(precision, device):
                part = learner.text_features(model, classes=idx)
            part.float().backward(grad[start : start + len(idx)])
    acc = float((logits.argmax(dim=1) == labels).float().mean())
    return float(loss.detach()), acc


@torch.no_grad()
def classifier_weights(
    model: VLModel, learner: PromptLearner, *, chunk_size: int | None = None, precision: Precision = "fp32"
) -> torch.Tensor:
    """[C, D] text classifier of the learned prompts, computed once for evaluation."""
    with autocast(precision, model.device):
        return learner.text_features(model, chunk_size=chunk_size).float()


@torch.no_grad()
def prompt_logits(model: VLModel, image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """CLIP logits of normalised image features [N, D] against a [C, D] classifier."""
    img = F.normalize(image_features.float(), dim=-1)
    return model.logit_scale.detach().float() * img @ classifier.float().to(img.device).t()


@dataclass
class CoOpResult:
    """The trained learner, per-epoch history and wall time of training."""

    learner: PromptLearner
    config: CoOpConfig
    epochs: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """A shuffled epoch; the last partial batch is dropped when there is a full one (Dassl)."""
    order = torch.randperm(n, generator=gen)
    drop_last = n >= batch_size
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield idx


def train_coop(
    model: VLModel,
    classnames: Sequence[str],
    features: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    config: CoOpConfig = CoOpConfig(),
    *,
    shots: int | None = None,
    text_loss: TextLoss | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> CoOpResult:
    """Train CoOp's context on cached image features.

    features: [N, V, D] (V augmented views per image, one sampled per step) or
        [N, D] (no augmentation); labels: [N] class indices.
    shots: images per class, only used to pick the epoch count when
        `config.epochs` is None (default: N // number of classes).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise VlkitError(f"training data: {features.shape[0]} feature rows but {labels.shape[0]} labels; need one label per image")
    n_cls = len(classnames)
    if int(labels.min()) < 0 or int(labels.max()) >= n_cls:
        raise VlkitError(f"training labels: must lie in [0, {n_cls}) for {n_cls} class names")
    epochs = run_epochs(config.epochs, shots, features.shape[0], n_cls)

    freeze(model)
    device = model.device
    init_gen = torch.Generator().manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    view_gen = torch.Generator().manual_seed(config.seed + 2)
    learner = PromptLearner(model, classnames, config.prompt, generator=init_gen).to(device)
    opt = make_optimizer([learner.ctx], config)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "amp" else None
    feats = F.normalize(features.float(), dim=-1)
    n, views = feats.shape[0], feats.shape[1]

    history: list[dict] = []
    t0 = time.perf_counter()
    epoch_iter = range(epochs)
    if progress:
        from rich.progress import track

        epoch_iter = track(epoch_iter, description=f"CoOp {epochs} epochs")
    for epoch in epoch_iter:
        lr = lr_at_epoch(epoch, epochs, config.lr, config.warmup_epochs, config.warmup_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        losses, accs = [], []
        for idx in _batches(n, config.batch_size, order_gen):
            view = torch.randint(0, views, (len(idx),), generator=view_gen)
            x = feats[idx, view].to(device)
            y = labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss, acc = coop_loss_backward(
                model,
                learner,
                x,
                y,
                precision=config.precision,
                class_chunk=config.class_chunk,
                text_loss=text_loss,
                scale_loss=scaler.scale if scaler is not None else (lambda v: v),
            )
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            losses.append(loss)
            accs.append(acc)
        record = {"epoch": epoch + 1, "lr": lr, "loss": sum(losses) / len(losses), "train_acc": sum(accs) / len(accs)}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return CoOpResult(learner=learner, config=config, epochs=epochs, history=history, seconds=time.perf_counter() - t0)

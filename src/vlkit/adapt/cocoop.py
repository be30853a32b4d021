"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models").

CoOp's context is one set of vectors for every image; CoCoOp adds a small
meta-network (Linear D -> D/16, ReLU, Linear D/16 -> W) that maps each image's
normalised feature to a token-width bias pi(x), added to every context vector:
v_m(x) = v_m + pi(x). Each image therefore gets its own prompts for every class,
which is what helps on classes not seen in training.

Batched efficiently: the reference code runs the text tower once per image in a
Python loop (batch size 1). Here a batch of B images becomes B x C prompt rows
that `PromptLearner.text_features` encodes in chunks of `text_chunk` rows, with
cached augmented image features, so a step runs the text tower only. In a causal
tower with unified context each image's [SOS] + context prefix is encoded once
and shared by its C class prompts (`PromptLearner.grouped_text_features`). A zero
meta-network gives exactly CoOp's logits for the same context.

Defaults are the paper's: 4 context tokens initialised from "a photo of a",
SGD lr 0.002, batch 1, 10 epochs, one warm-up epoch at 1e-5, cosine schedule.

Precision of the trainable parameters: by default the context and the meta-net
are fp32 and SGD updates them in fp32. The official code (`PREC: "fp16"`) holds
both as fp16 tensors and lets SGD update them there (fp16 gradient, momentum
buffer and weight decay), so many small updates round away and the meta-net
stays near its random initialisation. `param_dtype="fp16"` reproduces exactly
that update (`HalfSGD`: torch's SGD arithmetic on CUDA fp16 tensors, one
rounding to fp16 per op), while the forward runs in fp32 from the fp16 values;
it exists to compare against the paper, not as the default, because losing
updates to rounding is an accident of the recipe, not part of the method.
`train_meta_net=False` freezes the meta-net at its initialisation, the limit of
that behaviour. Each epoch's history records the fraction of context and
meta-net output-layer entries still at their initial values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.adapt.coop import Precision, autocast, freeze, lr_at_epoch
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

ParamDtype = Literal["fp32", "fp16"]


@dataclass(frozen=True)
class CoCoOpConfig:
    """Training settings; defaults follow the CoCoOp paper's recipe."""

    prompt: PromptOptions = field(default_factory=lambda: PromptOptions(n_ctx=4, ctx_init="a photo of a"))
    epochs: int = 10
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 1
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: Precision = "fp32"
    seed: int = 1
    text_chunk: int = 4096  # prompt rows (images x classes) per text-tower pass
    param_dtype: ParamDtype = "fp32"  # "fp16": the official PREC fp16 storage and SGD updates
    train_meta_net: bool = True  # False: the meta-net stays at its initialisation

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.text_chunk < 1:
            raise VlkitError(
                f"CoCoOp settings: epochs={self.epochs}, batch_size={self.batch_size}, "
                f"text_chunk={self.text_chunk}; each must be at least 1"
            )
        if self.param_dtype not in ("fp32", "fp16"):
            raise VlkitError(f"CoCoOp settings: param_dtype={self.param_dtype!r}; use 'fp32' or 'fp16'")
        if self.param_dtype == "fp16" and self.precision == "amp":
            raise VlkitError(
                "CoCoOp settings: param_dtype='fp16' cannot use precision='amp' (its gradient scaler "
                "refuses fp16 parameters); use precision 'fp32' or 'bf16'"
            )


class MetaNet(nn.Module):
    """Image feature [B, D] -> context bias [B, W]: Linear, ReLU, Linear (hidden D // 16)."""

    def __init__(self, feature_dim: int, token_width: int) -> None:
        super().__init__()
        hidden = max(1, feature_dim // 16)
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, token_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """fp32 compute whatever the stored dtype (fp16 parameters are cast up here)."""
        first, last = self.net[0], self.net[-1]
        hidden = F.relu(F.linear(features, first.weight.float(), first.bias.float()))
        return F.linear(hidden, last.weight.float(), last.bias.float())


class CoCoOp(nn.Module):
    """A prompt learner plus a meta-net; the backbone stays outside (frozen, shared)."""

    def __init__(self, learner: PromptLearner, feature_dim: int) -> None:
        super().__init__()
        self.learner = learner
        self.meta_net = MetaNet(feature_dim, learner.width)

    def image_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image context [B, M, W] (unified) or [B, C, M, W] (class-specific)."""
        bias = self.meta_net(F.normalize(image_features.float(), dim=-1))
        ctx = self.learner.ctx.float()
        if ctx.dim() == 2:
            return ctx.unsqueeze(0) + bias[:, None, :]
        return ctx.unsqueeze(0) + bias[:, None, None, :]

    def text_features(self, model: VLModel, image_features: torch.Tensor, text_chunk: int = 4096) -> torch.Tensor:
        """[B, C, D] normalised text features of every class prompt for every image."""
        b, c = image_features.shape[0], self.learner.n_cls
        ctx = self.image_context(image_features)
        if ctx.dim() == 3 and self.learner.prefix_encoder(model) is not None:
            # Each image's context is one prefix shared by all its class prompts: encoded once per image.
            return self.learner.grouped_text_features(model, ctx, chunk_size=text_chunk)
        if ctx.dim() == 3:
            rows = ctx[:, None].expand(b, c, *ctx.shape[1:])
        else:
            rows = ctx
        rows = rows.reshape(b * c, *rows.shape[2:])
        classes = torch.arange(c, device=rows.device).repeat(b)
        feats = self.learner.text_features(model, ctx=rows, classes=classes, chunk_size=text_chunk)
        return feats.view(b, c, -1)

    def forward(self, model: VLModel, image_features: torch.Tensor, text_chunk: int = 4096) -> torch.Tensor:
        """[B, C] CLIP logits of each image against its own conditioned prompts."""
        img = F.normalize(image_features.float(), dim=-1)
        text = self.text_features(model, img, text_chunk).float()
        return model.logit_scale.detach().float() * torch.einsum("bd,bcd->bc", img, text)

    def for_classnames(self, model: VLModel, classnames: Sequence[str]) -> "CoCoOp":
        """The same context and meta-net on other class names (base-to-new transfer);
        stored in fp32, which holds fp16-trained values exactly."""
        new = CoCoOp(self.learner.for_classnames(model, classnames), self.meta_net.net[0].in_features)
        new.meta_net.load_state_dict(self.meta_net.state_dict())
        return new.to(self.learner.ctx.device)


class HalfSGD(torch.optim.Optimizer):
    """torch's SGD (momentum, weight decay, no dampening) on fp16 parameters, as its
    CUDA kernels compute it in the official fp16 runs: each tensor op of the update
    (d = g + wd p; buf = mu buf, then buf + d, or d on the first step; p - lr buf)
    takes its fp16 operands and fp32 scalars, is evaluated in fp32 (one rounding,
    multiply-add fused) and rounded to fp16.

    Spelled out because torch's own SGD on fp16 CPU tensors rounds differently by
    position (its vectorised blocks round the scalar to fp16, the tail rounds every
    product too), so the result would depend on the tensor's length and the CPU.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            lr, mu, wd = (_fp32(group[k]) for k in ("lr", "momentum", "weight_decay"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = _to_fp16(_wide(p.grad) + wd * _wide(p))
                state = self.state[p]
                if "momentum_buffer" in state:
                    buf = _to_fp16(mu * _wide(state["momentum_buffer"]))
                    buf = _to_fp16(_wide(buf) + _wide(d))
                else:
                    buf = d.clone()
                state["momentum_buffer"] = buf.to(p.device)
                p.copy_(_to_fp16(_wide(p) - lr * _wide(buf)))


def _fp32(x: float) -> float:
    """A Python scalar as the fp32 value a CUDA kernel computes with."""
    return float(torch.tensor(x, dtype=torch.float32))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 copy, exact for these ops (on the CPU where the device has no float64)."""
    return t.to("cpu" if t.device.type == "mps" else t.device, torch.float64)


def _to_fp16(exact: torch.Tensor) -> torch.Tensor:
    """Round as a fused fp32 op then its conversion to fp16 do: to fp32, then to fp16."""
    return exact.float().half()


@torch.no_grad()
def cocoop_logits(
    model: VLModel,
    cocoop: CoCoOp,
    image_features: torch.Tensor,
    *,
    image_chunk: int = 64,
    precision: Precision = "fp32",
) -> torch.Tensor:
    """[N, C] logits for many images, `image_chunk` images (x all classes) at a time."""
    cocoop.eval()
    out = []
    device = cocoop.learner.ctx.device
    for start in range(0, len(image_features), image_chunk):
        x = image_features[start : start + image_chunk].to(device)
        with autocast(precision, device):
            out.append(cocoop(model, x).float().cpu())
    if not out:
        return torch.empty(0, cocoop.learner.n_cls)
    return torch.cat(out)


@dataclass
class CoCoOpResult:
    model: CoCoOp
    config: CoCoOpConfig
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_cocoop(
    model: VLModel,
    classnames: Sequence[str],
    features: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    config: CoCoOpConfig = CoCoOpConfig(),
) -> CoCoOpResult:
    """Train context + meta-net on cached features [N, V, D] (one view sampled per
    image per epoch) or [N, D]. Seeded: initialisation, order and views."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    feats = features.float().unsqueeze(1) if features.dim() == 2 else features.float()
    if feats.shape[0] != labels.shape[0] or feats.shape[0] == 0:
        raise VlkitError(f"training data: {feats.shape[0]} feature rows but {labels.shape[0]} labels; need one label per image")
    if int(labels.min()) < 0 or int(labels.max()) >= len(classnames):
        raise VlkitError(f"training labels: must lie in [0, {len(classnames)}) for {len(classnames)} class names")
    freeze(model)
    device = model.device
    init_gen = torch.Generator().manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    view_gen = torch.Generator().manual_seed(config.seed + 2)
    learner = PromptLearner(model, classnames, config.prompt, generator=init_gen)
    torch.manual_seed(config.seed)  # meta-net initialisation
    cocoop = CoCoOp(learner, feats.shape[-1]).to(device)
    if config.param_dtype == "fp16":
        _store_fp16(cocoop)
    cocoop.meta_net.requires_grad_(config.train_meta_net)
    trainable = [p for p in cocoop.parameters() if p.requires_grad]
    sgd = HalfSGD if config.param_dtype == "fp16" else torch.optim.SGD
    opt = sgd(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    init_ctx = learner.ctx.detach().clone()
    init_out = _output_layer(cocoop).clone()
    scaler = torch.amp.GradScaler(device.type) if config.precision == "amp" else None
    feats = F.normalize(feats, dim=-1)
    n, views = feats.shape[0], feats.shape[1]
    history: list[dict] = []
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        lr = lr_at_epoch(epoch, config.epochs, config.lr, config.warmup_epochs, config.warmup_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=order_gen)
        total, correct, count = 0.0, 0, 0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            view = torch.randint(0, views, (len(idx),), generator=view_gen)
            x, y = feats[idx, view].to(device), labels[idx].to(device)
            with autocast(config.precision, device):
                logits = cocoop(model, x, config.text_chunk)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            count += len(idx)
        history.append(
            {
                "epoch": epoch + 1,
                "lr": lr,
                "loss": total / count,
                "train_acc": correct / count,
                "ctx_unmoved": _unmoved(learner.ctx, init_ctx),
                "meta_out_unmoved": _unmoved(_output_layer(cocoop), init_out),
            }
        )
    return CoCoOpResult(cocoop.eval(), config, history, time.perf_counter() - t0)


def _store_fp16(cocoop: CoCoOp) -> None:
    """Round the context and meta-net to fp16 storage, as the official PREC fp16 does."""
    cocoop.learner.ctx = nn.Parameter(cocoop.learner.ctx.detach().half())
    cocoop.meta_net.half()


def _output_layer(cocoop: CoCoOp) -> torch.Tensor:
    """The meta-net's last layer (weight and bias) as one flat tensor."""
    last = cocoop.meta_net.net[-1]
    return torch.cat([last.weight.detach().flatten(), last.bias.detach()])


def _unmoved(now: torch.Tensor, init: torch.Tensor) -> float:
    """Fraction of entries still bitwise equal to their initial value."""
    return float((now.detach() == init).float().mean())

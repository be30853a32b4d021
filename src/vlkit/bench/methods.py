"""The few-shot methods the benchmark compares, behind one small interface.

Every method gets the same `MethodInput` (the shots' cached features, the
few-shot validation features, the hand-written prompt's zero-shot classifier)
and returns a `Fitted` predictor. Nothing here ever sees test data: the harness
evaluates the predictor afterwards. `Fitted.transfer` applies what was learned
to other class names (base-to-new); it is None for methods bound to their
training classes (linear probe, Tip-Adapter's cache, class-specific CoOp).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MethodInput:
    """What a method may use: shots (train views [N, V, D] and un-augmented [N, D]),
    few-shot validation features, class names and the hand-written prompt."""

    model: VLModel
    classnames: list[str]
    templates: list[str]  # templates[0] is the hand-written prompt
    train_views: torch.Tensor  # normalised views, or a method's own (`vlkit.bench.protocols.own_views`; may be raw)
    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    shots: int
    seed: int
    epochs: int | None = None  # budget override for every trained method; None = the paper's recipe
    options: dict[str, Any] = field(default_factory=dict)

    def zeroshot_weights(self, classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> torch.Tensor:
        from vlkit.zeroshot import zeroshot_classifier

        return zeroshot_classifier(self.model, list(classnames or self.classnames), list(templates or self.templates[:1])).float().cpu()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach())


@dataclass
class Fitted:
    """A trained predictor: logits on the training classes, chosen settings, optional transfer."""

    logits: Logits
    info: dict[str, Any] = field(default_factory=dict)
    transfer: Callable[[list[str]], Logits] | None = None
    artefacts: dict[str, Any] = field(default_factory=dict)  # in-memory only (e.g. a learned prompt), never in results


def _zs_logits(inp: MethodInput, weights: torch.Tensor) -> Logits:
    from vlkit.zeroshot import logits

    return lambda x: logits(inp.model, x, weights).cpu()


def zeroshot(inp: MethodInput) -> Fitted:
    """CLIP zero-shot with the task's hand-written prompt (its first template)."""
    w = inp.zeroshot_weights()
    return Fitted(_zs_logits(inp, w), {"template": inp.templates[0]}, lambda names: _zs_logits(inp, inp.zeroshot_weights(names)))


def zeroshot_ensemble(inp: MethodInput) -> Fitted:
    """CLIP zero-shot averaging the task's templates (OpenAI's 80 when the task has one)."""
    templates = inp.templates if len(inp.templates) > 1 else None
    from vlkit.zeroshot import openai_imagenet_templates

    templates = templates or openai_imagenet_templates()
    w = inp.zeroshot_weights(templates=templates)
    return Fitted(
        _zs_logits(inp, w),
        {"templates": len(templates)},
        lambda names: _zs_logits(inp, inp.zeroshot_weights(names, templates)),
    )


def linear_probe(inp: MethodInput) -> Fitted:
    from vlkit.adapt.linear_probe import fit_linear_probe

    probe = fit_linear_probe(
        inp.train_features,
        inp.train_labels,
        inp.val_features,
        inp.val_labels,
        num_classes=len(inp.classnames),
        seed=inp.seed,
        **{k: v for k, v in inp.options.items() if k in ("refine_steps", "max_iter")},
    )
    return Fitted(probe.logits, {"C": probe.C, "val_acc": probe.val_accuracy})


def _coop(inp: MethodInput, csc: bool) -> Fitted:
    from vlkit.adapt.coop import CoOpConfig, classifier_weights, prompt_logits, train_coop
    from vlkit.adapt.prompt_learner import PromptOptions

    cfg = CoOpConfig(
        prompt=PromptOptions(n_ctx=int(inp.options.get("n_ctx", 16)), ctx_init=inp.options.get("ctx_init"), position="end", csc=csc),
        epochs=inp.epochs,
        seed=inp.seed,
        class_chunk=inp.options.get("class_chunk"),
    )
    res = train_coop(inp.model, inp.classnames, inp.train_views, inp.train_labels, cfg, shots=inp.shots)
    w = classifier_weights(inp.model, res.learner, chunk_size=cfg.class_chunk)
    info = {"epochs": res.epochs, "train_seconds": round(res.seconds, 2), "n_ctx": res.learner.n_ctx, "csc": csc}
    if cfg.prompt.ctx_init is not None:
        info["ctx_init"] = cfg.prompt.ctx_init

    def transfer(names: list[str]) -> Logits:
        moved = res.learner.for_classnames(inp.model, names)
        w_new = classifier_weights(inp.model, moved, chunk_size=cfg.class_chunk)
        return lambda x: prompt_logits(inp.model, x, w_new).cpu()

    return Fitted(lambda x: prompt_logits(inp.model, x, w).cpu(), info, None if csc else transfer, {"learner": res.learner})


def coop(inp: MethodInput) -> Fitted:
    """CoOp, M=16 unified context, class token at the end, random init (paper's Fig. 3)."""
    return _coop(inp, csc=False)


def coop_csc(inp: MethodInput) -> Fitted:
    """CoOp with class-specific context (M=16, end)."""
    return _coop(inp, csc=True)


def _cocoop(inp: MethodInput, **variant: Any) -> Fitted:
    from vlkit.adapt.cocoop import CoCoOpConfig, cocoop_logits, train_cocoop
    from vlkit.adapt.kgcoop import context_from_template
    from vlkit.adapt.prompt_learner import PromptOptions

    if "ctx_init" in inp.options:  # e.g. the paper's "a photo of a"
        ctx_init, suffix = str(inp.options["ctx_init"]), "."
    else:
        ctx_init, suffix = context_from_template(inp.templates[0])
    cfg = CoCoOpConfig(
        prompt=PromptOptions(ctx_init=ctx_init, suffix=suffix),
        seed=inp.seed,
        batch_size=int(inp.options.get("batch_size", 1)),
        **variant,
    )
    if inp.epochs is not None:
        cfg = replace(cfg, epochs=inp.epochs)
    res = train_cocoop(inp.model, inp.classnames, inp.train_views, inp.train_labels, cfg)
    info = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "train_seconds": round(res.seconds, 2), "ctx_init": ctx_init, **variant}
    info.update({k: res.history[-1][k] for k in ("ctx_unmoved", "meta_out_unmoved")})  # what fp16 storage left at init

    def transfer(names: list[str]) -> Logits:
        moved = res.model.for_classnames(inp.model, names)
        return lambda x: cocoop_logits(inp.model, moved, x)

    return Fitted(lambda x: cocoop_logits(inp.model, res.model, x), info, transfer)


def cocoop(inp: MethodInput) -> Fitted:
    """CoCoOp, context initialised from the task's hand-written prompt; fp32 parameters."""
    return _cocoop(inp)


def cocoop_fp16(inp: MethodInput) -> Fitted:
    """CoCoOp as the official code trains it: context and meta-net held and updated in fp16."""
    return _cocoop(inp, param_dtype="fp16")


def cocoop_frozen(inp: MethodInput) -> Fitted:
    """CoCoOp with the meta-net left at its random initialisation (an ablation: what the meta-net adds)."""
    return _cocoop(inp, train_meta_net=False)


def kgcoop(inp: MethodInput) -> Fitted:
    from vlkit.adapt.coop import CoOpConfig, classifier_weights, prompt_logits
    from vlkit.adapt.kgcoop import KgCoOpConfig, train_kgcoop

    weight = float(inp.options.get("weight", 8.0))
    batch_size = int(inp.options.get("batch_size", CoOpConfig.batch_size))
    # the learned prompt: the task's template, or (official) "<ctx_init> {}."; the hand features are always the task's
    template = f"{inp.options['ctx_init']} {{}}." if "ctx_init" in inp.options else inp.templates[0]
    cfg = KgCoOpConfig(coop=CoOpConfig(epochs=inp.epochs, seed=inp.seed, batch_size=batch_size), weight=weight, template=template)
    res = train_kgcoop(inp.model, inp.classnames, inp.train_views, inp.train_labels, cfg, hand_features=inp.zeroshot_weights(), shots=inp.shots)
    w = classifier_weights(inp.model, res.learner)
    info = {
        "epochs": res.epochs,
        "weight": weight,
        "batch_size": batch_size,
        "template": template,
        "n_ctx": res.learner.n_ctx,
        "train_seconds": round(res.seconds, 2),
    }

    def transfer(names: list[str]) -> Logits:
        w_new = classifier_weights(inp.model, res.learner.for_classnames(inp.model, names))
        return lambda x: prompt_logits(inp.model, x, w_new).cpu()

    return Fitted(lambda x: prompt_logits(inp.model, x, w).cpu(), info, transfer)


def clip_adapter(inp: MethodInput) -> Fitted:
    """CLIP-Adapter; options "ratios" (searched on validation) and "schedule" ("dassl": CoOp's
    warm-up + per-epoch cosine over CoOp's epochs by shots)."""
    from vlkit.adapt.clip_adapter import CLIPAdapter, fit_clip_adapter
    from vlkit.adapt.coop import epochs_for_shots

    kw: dict[str, Any] = {"schedule": inp.options.get("schedule", "step-cosine")}
    if "ratios" in inp.options:
        kw["ratios"] = tuple(float(r) for r in inp.options["ratios"])
    if inp.epochs is not None:
        kw["epochs"] = inp.epochs
    elif kw["schedule"] == "dassl":
        kw["epochs"] = epochs_for_shots(inp.shots, len(inp.classnames))
    model, res = fit_clip_adapter(
        inp.train_views, inp.train_labels, inp.val_features, inp.val_labels, inp.zeroshot_weights(), inp.logit_scale, seed=inp.seed, **kw
    )

    def transfer(names: list[str]) -> Logits:
        moved = CLIPAdapter(inp.zeroshot_weights(names), inp.logit_scale, model.ratio)
        moved.adapter.load_state_dict(model.adapter.state_dict())
        return lambda x: moved(x).detach()

    info = {"ratio": res.ratio, "val_acc": res.val_accuracy, "schedule": kw["schedule"], "epochs": res.epochs}
    return Fitted(lambda x: model(x).detach(), info, transfer)


def _tip_grid(inp: MethodInput) -> dict[str, Any]:
    """Search settings from the options: grid sizes, and "grid_endpoint" (False: the official grid)."""
    grid: dict[str, Any] = {}
    if "beta_steps" in inp.options:
        grid["beta_range"] = (0.1, 7.0, int(inp.options["beta_steps"]))
    if "alpha_steps" in inp.options:
        grid["alpha_range"] = (0.1, 3.0, int(inp.options["alpha_steps"]))
    if "grid_endpoint" in inp.options:
        grid["endpoint"] = bool(inp.options["grid_endpoint"])
    return grid


def tip_adapter(inp: MethodInput) -> Fitted:
    """Training-free Tip-Adapter: keys = normalised mean of `train_views` (raw views give the official keys)."""
    from vlkit.adapt.tip_adapter import fit_tip_adapter

    model, found = fit_tip_adapter(
        inp.train_views, inp.train_labels, inp.val_features, inp.val_labels, inp.zeroshot_weights(), inp.logit_scale, **_tip_grid(inp)
    )
    return Fitted(lambda x: model(x).detach(), {"alpha": found.alpha, "beta": found.beta, "val_acc": found.val_accuracy})


def tip_adapter_f(inp: MethodInput) -> Fitted:
    """Tip-Adapter-F; options "init_alpha"/"init_beta" (the fine-tuning's fixed alpha/beta)."""
    from vlkit.adapt.tip_adapter import fit_tip_adapter_f

    kw: dict[str, Any] = {"epochs": inp.epochs} if inp.epochs is not None else {}
    kw.update({k: float(inp.options[k]) for k in ("init_alpha", "init_beta") if k in inp.options})
    model, found = fit_tip_adapter_f(
        inp.train_views,
        inp.train_labels,
        inp.val_features,
        inp.val_labels,
        inp.zeroshot_weights(),
        inp.logit_scale,
        seed=inp.seed,
        **kw,
        **_tip_grid(inp),
    )
    return Fitted(lambda x: model(x).detach(), {"alpha": found.alpha, "beta": found.beta, "val_acc": found.val_accuracy})


METHODS: dict[str, Callable[[MethodInput], Fitted]] = {
    "zeroshot": zeroshot,
    "zeroshot-ensemble": zeroshot_ensemble,
    "linear-probe": linear_probe,
    "coop": coop,
    "coop-csc": coop_csc,
    "cocoop": cocoop,
    "cocoop-fp16": cocoop_fp16,
    "cocoop-frozen": cocoop_frozen,
    "kgcoop": kgcoop,
    "clip-adapter": clip_adapter,
    "tip-adapter": tip_adapter,
    "tip-adapter-f": tip_adapter_f,
}
TRAINING_FREE = ("zeroshot", "zeroshot-ensemble")
# bound to their training classes: no base-to-new transfer
NO_TRANSFER = ("linear-probe", "coop-csc", "tip-adapter", "tip-adapter-f")


def check_methods(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise VlkitError(f"methods {', '.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    if not names:
        raise VlkitError("methods: none given; choose from " + ", ".join(METHODS))
    return list(dict.fromkeys(names))

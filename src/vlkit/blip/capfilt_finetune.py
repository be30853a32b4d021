"""CapFilt's first step: fine-tune a filter (ITC + ITM) and a captioner (LM) apart from one pretrained BLIP.

BLIP fine-tunes the two on the human-annotated pairs separately, from the same pretrained model,
because a shared model would let the filter pass the captioner's own mistakes (section 3.3). Each is
an ordinary run of vlkit's BLIP trainer (`blip.init_from` the pretrained model, `blip.objectives`
itc+itm or lm), in its own run folder under the CapFilt folder: `filter/` and `captioner/`, each with
the trainer's config.json, log.jsonl, checkpoints/ and, once finished, metrics.json and model/. A
finished stage (metrics.json and model/ present) is not redone; an interrupted one resumes from its
last checkpoint exactly as `vlkit pretrain --resume` does.

The human pairs (any CSV/JSONL table `read_pairs` reads) are written once as `finetune-human.jsonl`,
one row per readable image listing its texts, in the collection format the trainer reads; unreadable
images are skipped and listed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from vlkit import io
from vlkit.blip.capfilt import COLLECTION_STYLE
from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.blip.checkpoint import LoadedBlip
    from vlkit.blip.match import Pair
    from vlkit.pretrain.config import PretrainConfig

HUMAN_TABLE = "finetune-human.jsonl"
# Tokens a fine-tuning text is cut to: BLIP's captions are at most 20 tokens, human texts a little longer.
CONTEXT_LENGTH = 32
# ITC queue length in global batches, at most (BLIP: 57,600 features); never more than one epoch's worth.
QUEUE_BATCHES = 32


@dataclass(frozen=True)
class Stage:
    """One fine-tune: its run folder's name under the CapFilt folder and the objectives it trains."""

    name: str
    objectives: tuple[str, ...]


FILTER = Stage("filter", ("itc", "itm"))
CAPTIONER = Stage("captioner", ("lm",))
STAGES = {s.name: s for s in (FILTER, CAPTIONER)}


@dataclass(frozen=True)
class Budget:
    """How long and how hard each stage trains (the defaults fit a few minutes of 2 CPU cores on ~10k pairs)."""

    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    precision: str = "auto"
    lock_image: bool = True
    checkpoint_every: int = 100
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def human_table(pairs: Sequence["Pair"], out_dir: str | Path) -> tuple[Path, int, list[tuple[str, str]]]:
    """`finetune-human.jsonl` in `out_dir` (written once): one row per readable image with all its texts.
    Returns its path, its image count and the unreadable images with their reasons."""
    from vlkit.data.images import BadImage, load_image

    path = Path(out_dir).resolve() / HUMAN_TABLE
    texts: dict[str, list[str]] = {}
    for pair in pairs:
        texts.setdefault(pair.path, []).append(pair.text)
    skipped: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    for image, captions in texts.items():
        try:
            load_image(image)
        except BadImage as e:
            skipped.append((image, e.reason))
            continue
        rows.append({"image": image, "style": COLLECTION_STYLE, "captions": captions})
    if not rows:
        raise VlkitError(f"--human: none of its {len(texts)} images can be read (first: {skipped[0][0]}: {skipped[0][1]})")
    if not path.exists():
        io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, len(rows), skipped


def stage_config(stage: Stage, base: "LoadedBlip", spec: str, table: Path, images: int, budget: Budget) -> "PretrainConfig":
    """The trainer config of one stage: BLIP's fine-tuning recipe (AdamW, weight decay 0.05, cosine to 0
    without warmup, distillation ramped over the first epoch) from `spec`, with its image settings."""
    from vlkit.pretrain.config import config_from_dict

    pre = base.preprocess.config
    queue = budget.batch_size * max(1, min(QUEUE_BATCHES, images // budget.batch_size))
    return config_from_dict({
        "name": f"capfilt-{stage.name}", "seed": budget.seed,
        "model": {"kind": "blip", "image_size": base.model.vision_config.image_size, "embed_dim": base.model.embed_dim,
                  "lock_image": budget.lock_image, "image_mean": list(pre.mean or ()), "image_std": list(pre.std or ())},
        "blip": {"init_from": spec, "objectives": list(stage.objectives), "queue_size": queue, "alpha_ramp_epochs": 1,
                 "lm_captions": "same", "text": {"context_length": CONTEXT_LENGTH}},
        "data": {"sources": [str(table)], "styles": [COLLECTION_STYLE], "train_split_tasks": {}, "languages": ["en"]},
        "train": {"epochs": budget.epochs, "max_steps": budget.max_steps, "batch_size": budget.batch_size, "lr": budget.lr,
                  "warmup_steps": 0, "min_lr_ratio": 0.0, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8,
                  "grad_clip": None, "precision": budget.precision},
        "log": {"every_steps": 10, "checkpoint_every_steps": budget.checkpoint_every},
    }, f"capfilt {stage.name} fine-tune")


def model_dir(out_dir: str | Path, stage: Stage) -> Path:
    """Where a finished stage's model is (a vlkit-blip folder)."""
    return Path(out_dir) / stage.name / "model"


def finished(out_dir: str | Path, stage: Stage) -> bool:
    run = Path(out_dir) / stage.name
    return (run / "metrics.json").is_file() and (run / "model" / "config.json").is_file()


def started(out_dir: str | Path, stage: Stage) -> bool:
    """A checkpoint to resume from (the stage was interrupted after its first checkpoint)."""
    from vlkit.pretrain.trainer import CHECKPOINT_NAME

    return (Path(out_dir) / stage.name / "checkpoints" / CHECKPOINT_NAME).is_file()


def finetune(stage: Stage, spec: str, table: Path, images: int, out_dir: str | Path, budget: Budget, *,
             device: str = "auto", progress: bool = True) -> bool:
    """Train `stage` from `spec` unless it finished before (then False); resumes from its checkpoint."""
    from vlkit.pretrain.blip_trainer import trained_blip
    from vlkit.pretrain.run import pretrain

    if finished(out_dir, stage):
        return False
    run = Path(out_dir) / stage.name
    resume = started(out_dir, stage)
    if not resume and (run / "log.jsonl").exists():
        (run / "log.jsonl").unlink()  # a start over (killed before its first checkpoint) keeps no stale log
    cfg = stage_config(stage, trained_blip(spec), spec, table, images, budget)
    pretrain(cfg, run_dir=run, resume=resume, progress=progress, device=device)
    return True

"""A 16-pair emoji-like dataset and tiny pretraining configs, shared by the trainer tests.

Two model configs: a ResNet image tower (batch norm) with a BERT text tower with
dropout, for resume and GradCache-buffer tests; and a ViT tower with a BERT text
tower and no dropout anywhere, for the equality tests (2 ranks = 1 rank, GradCache
= full batch), where batch statistics or dropout masks would legitimately differ.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
RGB = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 40), (140, 40, 160), (250, 140, 20), (10, 10, 10), (245, 245, 245)]


def make_dataset(root: Path) -> Path:
    """16 emoji-like rows: a coloured disc or square per colour, with labels and tags."""
    rng = np.random.default_rng(0)
    rows = []
    (root / "images").mkdir(parents=True)
    for i, (name, rgb) in enumerate(zip(COLOURS * 2, RGB * 2)):
        shape = "circle" if i < 8 else "square"
        a = np.full((16, 16, 3), 255, np.uint8)
        yy, xx = np.mgrid[:16, :16]
        mask = ((yy - 8) ** 2 + (xx - 8) ** 2 < 30) if shape == "circle" else ((abs(yy - 8) < 5) & (abs(xx - 8) < 5))
        a[mask] = np.array(rgb) + rng.integers(-5, 5, 3)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"id": str(i), "image": f"images/{i}.png", "style": "twitter", "label": f"{name} {shape}",
                     "tags": [name, shape], "group_name": "symbols" if shape == "square" else "objects",
                     "subgroup_name": "geometric", "label_zh": "", "tags_zh": []})
    meta = root / "metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return meta


def tiny_config(meta: Path, out: Path) -> dict:
    """ResNet (batch norm) + BERT with dropout, trained from scratch: 2 epochs of 4 steps."""
    return {
        "name": "tiny", "seed": 3, "output_dir": str(out),
        "model": {
            "image_tower": {"model_type": "resnet", "config": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}},
            "text_tower": {"pretrained": None, "model_type": "bert", "context_length": 16,
                           "config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                                      "hidden_dropout_prob": 0.2, "max_position_embeddings": 32}},
            "image_size": 16, "embed_dim": 8, "lock_text": False,
        },
        "data": {"sources": [str(meta)], "styles": ["twitter"], "train_split_tasks": {}, "precompute_text": False},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "threads": 1},
        "log": {"every_steps": 1, "checkpoint_every_steps": 2, "progress": False},
    }


def exact_config(meta: Path, out: Path, **train) -> dict:
    """ViT + BERT without dropout or batch statistics: the loss is a function of the
    global batch alone, so any split of the work must give the same weights.
    Global batch 8 over 16 pairs: 2 steps an epoch; 3 steps cross an epoch boundary."""
    d = tiny_config(meta, out)
    d["seed"] = 5
    d["model"]["image_tower"] = {
        "model_type": "vit",
        "config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                   "image_size": 16, "patch_size": 8, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    }
    d["model"]["text_tower"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    d["train"].update({"batch_size": 8, "max_steps": 3, "warmup_steps": 1, **train})
    d["log"]["checkpoint_every_steps"] = 1000
    return copy.deepcopy(d)


def gloo_threads() -> list[str]:
    """Names of this process's live gloo threads (from /proc, Linux). None may be left once
    `vlkit.pretrain.distributed.cleanup` has run: one alive at interpreter exit can abort
    the process (see that module's docstring)."""
    import os

    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)

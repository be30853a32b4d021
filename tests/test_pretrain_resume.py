"""Exact resume: a run killed with SIGKILL and resumed ends with exactly the weights,
optimizer moments and history of the same run left alone.

The tiny config trains a ResNet (batch norm) image tower and an unlocked BERT text
tower with dropout from scratch, so model weights, AdamW state, the LR schedule,
the torch RNG (dropout masks) and the data position must all come back exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlkit.errors import VlkitError
from vlkit.pretrain.config import config_from_dict, load_config
from vlkit.pretrain.trainer import CRASH_ENV

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


def run_cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vlkit.cli", "pretrain", *args], capture_output=True, text=True, env=env, timeout=300)


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("rng.")}, f.metadata()


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    from vlkit.pretrain.run import pretrain

    meta = make_dataset(tmp_path / "data")
    cfg_dict = tiny_config(meta, tmp_path / "runs")
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(cfg_dict))

    ref = pretrain(load_config(cfg_path), run_dir=tmp_path / "ref", progress=False, export=False)
    assert ref["train"]["global_step"] == 8  # 2 epochs x 4 steps

    crashed = run_cli(["--config", str(cfg_path), "--run-dir", str(tmp_path / "b"), "--no-progress"], {CRASH_ENV: "5"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    _, meta_b = read(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert json.loads(meta_b["progress"])["global_step"] == 4  # step 5 is lost and must be redone

    resumed = pretrain(load_config(cfg_path), run_dir=tmp_path / "b", resume=True, progress=False, export=False)
    assert resumed["train"]["global_step"] == 8

    t_ref, m_ref = read(tmp_path / "ref" / "checkpoints" / "last.safetensors")
    t_b, m_b = read(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert t_ref.keys() == t_b.keys()
    assert any(k.startswith("model.text_model.") for k in t_ref) and any(k.startswith("opt.") for k in t_ref)
    for k in t_ref:
        assert torch.equal(t_ref[k], t_b[k]), k
    timing = {"pairs_per_s"}  # the only logged value that may differ
    hist_ref, hist_b = (
        [{k: v for k, v in r.items() if k not in timing} for r in json.loads(m["progress"])["history"]] for m in (m_ref, m_b)
    )
    assert hist_ref == hist_b and len(hist_ref) == 8  # same loss, temperature, lr, grad norm at every step
    assert m_ref["scheduler"] == m_b["scheduler"]


def test_resume_refuses_a_changed_config(tmp_path):
    from vlkit.pretrain.run import pretrain

    meta = make_dataset(tmp_path / "data")
    d = tiny_config(meta, tmp_path / "runs")
    d["train"]["max_steps"] = 2
    pretrain(config_from_dict(d), run_dir=tmp_path / "r", progress=False, export=False)
    d["train"]["lr"] = 0.5
    with pytest.raises(VlkitError, match="different config"):
        pretrain(config_from_dict(d), run_dir=tmp_path / "r", resume=True, progress=False, export=False)


def test_config_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"batchsize": 8}}))
    with pytest.raises(VlkitError, match=r"unknown key\(s\) batchsize"):
        load_config(bad)
    with pytest.raises(VlkitError, match="facebook"):
        config_from_dict({"data": {"styles": ["twitter", "facebook"]}})
    proc = run_cli(["--config", str(tmp_path / "missing.json")])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.json'}: config file not found; pass a JSON file such as configs/vlkit-tiny.json"]

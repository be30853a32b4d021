"""`pretrain(config)`: a whole pretraining run in a run folder (the API behind `vlkit pretrain`).

Works alone or under torchrun (one call per process): rank 0 owns the run
folder, the logs, the checkpoints, the evaluations and the exported model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from vlkit import io, runs
from vlkit.errors import VlkitError
from vlkit.pretrain.config import PretrainConfig
from vlkit.pretrain.distributed import DistInfo, barrier, cleanup, init_distributed


def _shared_run_dir(cfg: PretrainConfig, run_dir: str | Path | None, info: DistInfo) -> Path:
    """Rank 0 picks (or creates) the folder; every rank gets the same path."""
    if run_dir is not None:
        path = Path(run_dir)
        if info.is_main:
            path.mkdir(parents=True, exist_ok=True)
    else:
        path = runs.new_run_dir(cfg.output_dir, "pretrain") if info.is_main else Path()
    if info.distributed:
        import torch.distributed as dist

        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return path


def _evaluate(trainer, tasks: list[str], split: str) -> list[dict[str, Any]]:
    from vlkit.data.tasks import load_task
    from vlkit.pretrain.evaluate import zeroshot_task

    cfg = trainer.cfg
    if cfg.model.kind == "blip":
        return [trainer.evaluate(name, split) for name in tasks]
    out = []
    for name in tasks:
        task = load_task(name, data_dir=trainer.data_dir)
        out.append(
            zeroshot_task(
                trainer.model, trainer.tokenizer, task, split, cfg.model.image_size,
                cfg.model.image_mean, cfg.model.image_std, cfg.model.text_tower.context_length,
            )
        )
    return out


def pretrain(
    cfg: PretrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    export: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Train per `cfg` on `device` ("auto": CUDA when there is one); returns the metrics written to
    `<run_dir>/metrics.json` (rank 0)."""
    if cfg.model.kind == "blip":
        from vlkit.pretrain.blip_trainer import BlipTrainer as Trainer
    else:
        from vlkit.pretrain.trainer import Trainer

    info = init_distributed(device)
    wall0 = time.perf_counter()
    trainer = None
    try:
        path = _shared_run_dir(cfg, run_dir, info)
        if resume and not (path / "checkpoints").exists():
            raise VlkitError(f"{path}: no checkpoints to resume from; run without --resume to start")
        runs.seed_everything(cfg.seed)
        trainer = Trainer(cfg, path, info, resume=resume)
        if info.is_main:
            runs.write_config(
                path, cfg.to_dict(), command="pretrain", seed=cfg.seed, world_size=info.world_size,
                device=info.device, threads=torch.get_num_threads(), resumed_from_step=trainer.global_step,
                train_pairs=len(trainer.pairs), unique_captions=len(trainer.pairs.captions),
            )
        log_path = path / "log.jsonl"
        evals: list[dict[str, Any]] = []
        bar = _Progress(trainer.total_steps, trainer.global_step, enabled=progress and info.is_main)

        def on_log(rec: dict[str, Any]) -> None:
            bar.update(rec)
            if info.is_main:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

        def on_epoch_end(epoch: int) -> None:
            every = cfg.log.eval_every_epochs
            if info.is_main and every and epoch % every == 0 and cfg.log.eval_tasks:
                res = _evaluate(trainer, cfg.log.eval_tasks, cfg.log.eval_split)
                for r in res:
                    r["epoch"] = epoch
                evals.extend(res)
                bar.note(" ".join(f"{r['task']}={r['top1']:.3f}" for r in res))
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"eval": res}) + "\n")
            barrier()

        with bar:
            summary = trainer.fit(on_log=on_log, on_epoch_end=on_epoch_end)
        metrics: dict[str, Any] = {"train": summary, "evals": evals}
        if info.is_main:
            if export and cfg.model.kind == "blip":
                trainer.export(path / "model")
            elif export and cfg.model.text_tower.pretrained:
                from vlkit.pretrain.export import export_vlkit

                export_vlkit(trainer.model, cfg.model, path / "model")
            if cfg.log.final_eval_tasks:
                metrics["final"] = _evaluate(trainer, cfg.log.final_eval_tasks, cfg.log.final_eval_split)
            metrics["wall_s_total"] = round(time.perf_counter() - wall0, 1)
            runs.write_metrics(path, metrics)
        metrics["run_dir"] = str(path)
        barrier()
        return metrics
    finally:
        trainer = None  # also on an error (whose traceback keeps this frame): its DDP wrapper holds the group
        cleanup()


class _Progress:
    """A rich progress bar with loss, temperature and throughput (silent on other ranks)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.p = Progress(
                TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
            )
            self.task = self.p.add_task("train", total=total, completed=done, stats="")

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)

    def update(self, rec: dict[str, Any]) -> None:
        if self.enabled:
            temp = rec["temp"] if "temp" in rec else 1 / rec["logit_scale"]
            stats = f"loss {rec['loss']:.3f} T {temp:.4f} {rec['pairs_per_s']:.0f} pairs/s"
            self.p.update(self.task, completed=rec["step"], stats=stats)

    def note(self, text: str) -> None:
        if self.enabled:
            self.p.console.print(text)

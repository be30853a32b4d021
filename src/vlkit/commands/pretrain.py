"""`vlkit pretrain --config FILE`: CLIP or BLIP (ITC + ITM + LM) pretraining, alone or under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def pretrain(
        config: Path = typer.Option(..., "--config", help="JSON config (see configs/vlkit-tiny.json)."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default: a new one under output_dir)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Data folder (default $VLKIT_DATA or ~/.cache/vlkit/data)."),
        export_to: Optional[Path] = typer.Option(None, "--export-to", help="Also copy the trained model folder here."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Pretrain a dual encoder with the CLIP loss, or BLIP with ITC + ITM + LM (model.kind "blip", configs/blip-*.json); multi-process with `torchrun --nproc_per_node N -m vlkit.cli pretrain ...`."""
        import shutil

        from vlkit.errors import VlkitError
        from vlkit.pretrain.config import load_config
        from vlkit.pretrain.run import pretrain as run

        if resume and run_dir is None:
            raise VlkitError("--resume: needs --run-dir naming the run to continue")
        cfg = load_config(config)
        if data_dir is not None:
            cfg.data.data_dir = data_dir
        metrics = run(cfg, run_dir=run_dir, resume=resume, progress=progress)
        if export_to is not None and (Path(metrics["run_dir"]) / "model").is_dir():
            shutil.copytree(Path(metrics["run_dir"]) / "model", export_to, dirs_exist_ok=True)
        if "final" in metrics:
            for r in metrics["final"]:
                print(f"{r['task']} ({r['split']}): top1 {r['top1']:.3f} top5 {r['top5']:.3f} "
                      f"(chance {r['chance']:.3f}, majority {r['majority']:.3f})")
        if "wall_s_total" in metrics:
            print(f"run folder: {metrics['run_dir']}  wall time {metrics['wall_s_total']:.0f} s")

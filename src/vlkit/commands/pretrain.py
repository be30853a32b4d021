"""`vlkit pretrain --config FILE`: CLIP or BLIP (ITC + ITM + LM) pretraining, alone or under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlkit.commands import validate


def _check_config_file(config: Path) -> None:
    """The config is a readable JSON object (its fields are checked by `load_config`)."""
    import json

    from vlkit.data.datasets import read_text
    from vlkit.errors import VlkitError

    if not config.exists():
        return  # load_config names the missing file and the fix
    text = read_text(config, "JSON config")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise VlkitError(f"{config}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise VlkitError(f"{config}: a config is a JSON object of settings, not a {type(value).__name__}")


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
        _check_config_file(config)
        if run_dir is not None:
            validate.out_folder("--run-dir", run_dir)
        if export_to is not None:
            validate.out_folder("--export-to", export_to)
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

"""`vlkit data fetch|build|splits|info`: real datasets from pinned open packages."""

from __future__ import annotations

import time
from typing import Optional

import typer

data_app = typer.Typer(no_args_is_help=True, help="Fetch, build and describe datasets and benchmark tasks.")

DataDirOpt = typer.Option(
    None, "--data-dir", help="Data directory (default $VLKIT_DATA or ~/.cache/vlkit/data; 'sample' = bundled sample)."
)


def _writable_data_dir(data_dir: Optional[str]):
    """The data dir to fetch or build into; the bundled sample is never written to."""
    from vlkit.data.recipes import SAMPLE_DIR, resolve_data_dir
    from vlkit.errors import VlkitError

    root = resolve_data_dir(data_dir)
    if root == SAMPLE_DIR:
        raise VlkitError("--data-dir sample: the bundled sample is read-only; pass another folder (or none for the default)")
    return root


@data_app.command("fetch")
def fetch_cmd(recipe: str = typer.Argument(..., help="emoji or openclipart"), data_dir: Optional[str] = DataDirOpt) -> None:
    """Download the recipe's pinned packages, verify their checksums and unpack them (resumable)."""
    from vlkit.data.recipes import get_recipe

    module = get_recipe(recipe)
    root = _writable_data_dir(data_dir)
    t0 = time.perf_counter()
    module.fetch(root)
    print(f"fetched {recipe} into {root / 'raw' / recipe} in {time.perf_counter() - t0:.1f} s")


@data_app.command("build")
def build_cmd(
    recipe: str = typer.Argument(..., help="emoji or openclipart"),
    data_dir: Optional[str] = DataDirOpt,
    size: int = typer.Option(64, help="Thumbnail side in pixels."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Write thumbnails and metadata.jsonl under <data-dir>/built/ (keeps existing thumbnails)."""
    from vlkit.data.recipes import get_recipe
    from vlkit.errors import VlkitError

    if size < 8:
        raise VlkitError(f"--size {size}: too small; use at least 8 pixels (64 is the default)")
    if size > 1024:
        raise VlkitError(f"--size {size}: too large for thumbnails; use at most 1024 pixels (64 is the default)")
    module = get_recipe(recipe)
    root = _writable_data_dir(data_dir)
    report = module.build(root, size=size, progress=not no_progress)
    print(f"built {recipe} under {root / 'built'} in {report['seconds']:.1f} s")


@data_app.command("splits")
def splits_cmd(
    task: list[str] = typer.Argument(None, help="Task names (default: every task whose data is built)."),
    data_dir: Optional[str] = DataDirOpt,
    shots: str = typer.Option("1,2,4,8,16", help="Comma-separated K values for few-shot split files."),
    seeds: str = typer.Option("1,2,3", help="Comma-separated seeds."),
) -> None:
    """Write each task's train/val/test split file and its few-shot split files."""
    from vlkit.data.fewshot import write_fewshot_splits
    from vlkit.data.tasks import available_tasks, load_task
    from vlkit.errors import VlkitError

    root = _writable_data_dir(data_dir)
    try:
        ks = [int(k) for k in shots.split(",") if k.strip()]
        ss = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise VlkitError(f"--shots {shots!r} / --seeds {seeds!r}: expected comma-separated integers") from None
    from vlkit.commands import validate

    validate.nonempty("--shots", ks)
    validate.nonempty("--seeds", ss)
    for k in ks:
        validate.at_least("--shots", k)
    names = task or available_tasks(root, built_only=True)
    if not names:
        raise VlkitError(f"{root}: no built dataset found; run `vlkit data build emoji` (or openclipart) first")
    for name in names:
        t = load_task(name, root)
        paths = write_fewshot_splits(t, ks, ss)
        counts = ", ".join(f"{k}={len(v)}" for k, v in t.splits.items())
        print(f"{name}: {len(t.classnames)} classes, {counts}; {len(paths)} few-shot files in {paths[0].parent}")


@data_app.command("info")
def info_cmd(name: str = typer.Argument(..., help="A built dataset (emoji, emoji-facebook, openclipart) or a task."),
             data_dir: Optional[str] = DataDirOpt,
             top: int = typer.Option(15, help="Classes to list per table (largest first).")) -> None:
    """Print a dataset card: counts per style, class and split, and the licence of each style."""
    from vlkit.commands import validate
    from vlkit.data.info import dataset_card
    from vlkit.data.recipes import resolve_data_dir

    validate.at_least("--top", top)
    print(dataset_card(name, resolve_data_dir(data_dir), top=top))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")

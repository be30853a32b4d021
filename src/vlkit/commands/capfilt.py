"""`vlkit capfilt caption|filter|write|run`: BLIP's CapFilt over a web table, step by step or in one go.

`--out` is the CapFilt folder, not a run folder under it: every step reads and writes there, so a
step interrupted or run again picks up at the first shard it has not written. `capfilt.json` in the
folder records the web table's digest and the settings each pass ran with; a later step with other
settings is refused (use another --out) rather than mixing outputs. Every argument, both tables and
the models' kinds are checked before any model loads or any file is written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import typer

from vlkit.errors import VlkitError

STATE = "capfilt.json"


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="CapFilt: caption web images, filter web and synthetic texts with ITM, write the bootstrapped collection.",
                      no_args_is_help=True)
    sub.command("caption")(caption)
    sub.command("filter")(filter_)
    sub.command("write")(write)
    sub.command("run")(run)
    app.add_typer(sub, name="capfilt")


# ---------------------------------------------------------------- shared checks


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _web(web: Path, image_column: Optional[str], text_column: Optional[str], shard_size: int, out: Path):
    """The web pairs and their shards, after checking the table, the shard size and the folder's record."""
    from vlkit.blip import capfilt
    from vlkit.blip.match import read_pairs
    from vlkit.commands import validate

    validate.existing("--web", web, "file")
    validate.at_least("--shard-size", shard_size)
    validate.out_folder("--out", out)
    pairs = read_pairs(web, image_column, text_column)
    if not pairs:
        raise VlkitError(f"--web {web}: no image-text pairs")
    record = {"web": str(web.resolve()), "web_sha256": _digest(web), "image_column": image_column,
              "text_column": text_column, "shard_size": shard_size}
    return pairs, capfilt.shards(pairs, out, shard_size), record


def _read_state(out: Path) -> dict[str, Any]:
    import json

    path = out / STATE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise VlkitError(f"{path}: damaged; it must be the JSON a `vlkit capfilt` step wrote (delete the folder to start over)")
    return state


def _merge(state: dict[str, Any], out: Path, section: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The folder's record with `section` set to `settings`; refused when the folder already ran it otherwise."""
    before = state.get(section)
    if before is not None and before != settings:
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        raise VlkitError(f"--out {out}: its {section} step ran with other settings ({', '.join(changed)}); "
                         "use the same settings to resume, or another --out")
    return {**state, section: settings}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    from vlkit import io

    io.write_json(out / STATE, state)


# ---------------------------------------------------------------- the steps' option sets


def _caption_settings(beam: Optional[int], top_p: Optional[float], num_captions: int, max_length: int, min_length: int, seed: int):
    """BLIP's nucleus sampling unless --beam is given."""
    from vlkit.commands.blip import decoding_settings

    return decoding_settings(beam is None, beam, top_p, num_captions, max_length, min_length, seed,
                             to_nucleus="drop --beam", to_more_beams="raise --beam or drop it")


def _do_caption(out, todo, state, captioner: str, settings, batch_size: int, device: str, progress: bool) -> None:
    from vlkit.blip import capfilt
    from vlkit.blip.captioning import progress_bar
    from vlkit.commands.blip import _load

    loaded = _load(captioner, device, "decoder")
    _save_state(out, state)  # after the model loaded: a refused model leaves nothing behind
    with progress_bar(progress, len(todo), "captioning shards") as advance:
        capfilt.caption_pass(loaded, todo, settings, batch_size=batch_size, on_shard=lambda s, done: advance(1))


def _do_filter(out, todo, state, filt: str, threshold: float, batch_size: int, device: str, progress: bool) -> None:
    from vlkit.blip import capfilt
    from vlkit.blip.captioning import progress_bar
    from vlkit.commands.blip import _load

    missing = [s for s in todo if not s.captions_path.exists()]
    if missing:
        raise VlkitError(f"--out {out}: {len(missing)} of {len(todo)} shards have no captions yet; run `vlkit capfilt caption` first")
    loaded = _load(filt, device, "encoder")
    _save_state(out, state)
    with progress_bar(progress, len(todo), "filtering shards") as advance:
        capfilt.filter_pass(loaded, todo, threshold, batch_size=batch_size, on_shard=lambda s, done: advance(1))


def _do_write(out, todo, human: Path, image_column, text_column) -> None:
    from rich.console import Console

    from vlkit.blip import capfilt
    from vlkit.blip.match import read_pairs

    summary = capfilt.write_collection(read_pairs(human, image_column, text_column), todo, out)
    parts = [f"{k} {summary[k]['kept']}/{summary[k]['pairs']} kept" for k in ("human", "web", "synthetic")]
    Console().print(f"{summary['images']} images, {summary['pairs']} pairs ({'; '.join(parts)}): {out / 'collection.jsonl'}", soft_wrap=True)


# ---------------------------------------------------------------- commands

WEB = typer.Option(..., "--web", help="The noisy web pairs: CSV/JSONL with an image and a text column.")
OUT = typer.Option(..., "--out", help="The CapFilt folder (created; steps resume in it).")
IMAGE_COLUMN = typer.Option(None, "--image-column", help="Tables' image column (default: image, path, file, ...).")
TEXT_COLUMN = typer.Option(None, "--text-column", help="Tables' text column (default: text, caption, title).")
SHARD_SIZE = typer.Option(1024, "--shard-size", help="Web pairs per shard (each pass writes one file per shard).")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps.")
PROGRESS = typer.Option(True, "--progress/--no-progress")
CAPTIONER = typer.Option(..., "--captioner", help="BLIP model with a text decoder (a folder, .pth or embedded name).")
FILTER = typer.Option(..., "--filter", help="BLIP model with a text encoder and ITM head.")
HUMAN = typer.Option(..., "--human", help="The human-annotated pairs: CSV/JSONL with an image and a text column.")
BEAM = typer.Option(None, "--beam", help="Beam search with N beams instead of BLIP's nucleus sampling.")
TOP_P = typer.Option(None, "--top-p", help="Nucleus mass (default 0.9).")
NUM_CAPTIONS = typer.Option(1, "--num-captions", help="Synthetic captions per web image.")
MAX_LENGTH = typer.Option(20, "--max-length", help="Most tokens per caption (BLIP: 20).")
MIN_LENGTH = typer.Option(5, "--min-length", help="Fewest tokens (BLIP: 5).")
SEED = typer.Option(0, "--seed", help="Seeds the sampling (each shard from it and its index).")
THRESHOLD = typer.Option(0.5, "--threshold", help="Keep a text when its ITM match probability is above this (BLIP: 0.5).")


def caption(
    web: Path = WEB,
    captioner: str = CAPTIONER,
    out: Path = OUT,
    beam: Optional[int] = BEAM,
    top_p: Optional[float] = TOP_P,
    num_captions: int = NUM_CAPTIONS,
    max_length: int = MAX_LENGTH,
    min_length: int = MIN_LENGTH,
    seed: int = SEED,
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    shard_size: int = SHARD_SIZE,
    image_column: Optional[str] = IMAGE_COLUMN,
    text_column: Optional[str] = TEXT_COLUMN,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Write a synthetic caption for every web image (BLIP: nucleus sampling, top-p 0.9)."""
    from vlkit.commands import validate
    from vlkit.commands.blip import check_blip_model

    settings = _caption_settings(beam, top_p, num_captions, max_length, min_length, seed)
    validate.at_least("--batch-size", batch_size)
    device = validate.device("--device", device)
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    state = _merge(_merge(_read_state(out), out, "web", record), out, "caption", {"captioner": captioner, **settings.to_dict()})
    check_blip_model(captioner, "decoder", "--captioner")
    _do_caption(out, todo, state, captioner, settings, batch_size, device, progress)


def filter_(
    web: Path = WEB,
    filt: str = FILTER,
    out: Path = OUT,
    threshold: float = THRESHOLD,
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    shard_size: int = SHARD_SIZE,
    image_column: Optional[str] = IMAGE_COLUMN,
    text_column: Optional[str] = TEXT_COLUMN,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Score every web text and synthetic caption against its image with ITM; keep those above the threshold."""
    from vlkit.blip import capfilt
    from vlkit.commands import validate
    from vlkit.commands.blip import check_blip_model

    capfilt.check_threshold(threshold)
    validate.at_least("--batch-size", batch_size)
    device = validate.device("--device", device)
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    state = _merge(_merge(_read_state(out), out, "web", record), out, "filter", {"filter": filt, "threshold": threshold})
    check_blip_model(filt, "encoder", "--filter")
    _do_filter(out, todo, state, filt, threshold, batch_size, device, progress)


def write(
    human: Path = HUMAN,
    web: Path = WEB,
    out: Path = OUT,
    shard_size: int = SHARD_SIZE,
    image_column: Optional[str] = IMAGE_COLUMN,
    text_column: Optional[str] = TEXT_COLUMN,
) -> None:
    """Write collection.jsonl (human + kept web + kept synthetic), provenance.jsonl and summary.json."""
    from vlkit.commands import validate

    validate.existing("--human", human, "file")
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    _merge(_read_state(out), out, "web", record)
    _do_write(out, todo, human, image_column, text_column)


def run(
    human: Path = HUMAN,
    web: Path = WEB,
    captioner: str = CAPTIONER,
    filt: str = FILTER,
    out: Path = OUT,
    beam: Optional[int] = BEAM,
    top_p: Optional[float] = TOP_P,
    num_captions: int = NUM_CAPTIONS,
    max_length: int = MAX_LENGTH,
    min_length: int = MIN_LENGTH,
    seed: int = SEED,
    threshold: float = THRESHOLD,
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    shard_size: int = SHARD_SIZE,
    image_column: Optional[str] = IMAGE_COLUMN,
    text_column: Optional[str] = TEXT_COLUMN,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """caption, filter and write in one go (each resumes where an earlier run stopped)."""
    from vlkit.blip import capfilt
    from vlkit.blip.match import read_pairs
    from vlkit.commands import validate
    from vlkit.commands.blip import check_blip_model

    settings = _caption_settings(beam, top_p, num_captions, max_length, min_length, seed)
    capfilt.check_threshold(threshold)
    validate.at_least("--batch-size", batch_size)
    device = validate.device("--device", device)
    validate.existing("--human", human, "file")
    read_pairs(human, image_column, text_column)  # its columns, before any model loads
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    state = _merge(_merge(_read_state(out), out, "web", record), out, "caption", {"captioner": captioner, **settings.to_dict()})
    state = _merge(state, out, "filter", {"filter": filt, "threshold": threshold})
    check_blip_model(captioner, "decoder", "--captioner")
    check_blip_model(filt, "encoder", "--filter")
    _do_caption(out, todo, state, captioner, settings, batch_size, device, progress)
    _do_filter(out, todo, state, filt, threshold, batch_size, device, progress)
    _do_write(out, todo, human, image_column, text_column)

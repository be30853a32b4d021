"""BLIP commands: `vlkit caption`, `vlkit match`, `vlkit eval caption`.

Each is a thin call into `vlkit.blip`; arguments are checked before any model is
loaded or any output is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vlkit.errors import VlkitError


def _eval_group(app: typer.Typer) -> typer.Typer:
    """The app's `eval` group (shared with `eval retrieval`), created on first use."""
    for info in app.registered_groups:
        if info.name == "eval" and info.typer_instance is not None:
            return info.typer_instance
    sub = typer.Typer(help="Evaluate models.", no_args_is_help=True)
    app.add_typer(sub, name="eval")
    return sub


def register(app: typer.Typer) -> None:
    app.command(name="caption")(caption)
    app.command(name="match")(match)
    _eval_group(app).command("caption")(eval_caption)


def _fingerprint(loaded) -> str:
    """The run config's model fingerprint: weights, parts, tokenizer and image preprocessing."""
    return loaded.fingerprint()


_NEEDS = {
    "decoder": ("text decoder (needed to caption)", "BlipForConditionalGeneration"),
    "encoder": ("text encoder and ITM head (needed to match)", "BlipForImageTextRetrieval"),
}


def check_blip_model(spec: str, need: str, flag: str = "--model") -> None:
    """Refuse, before any weights load, a model that is not BLIP or lacks the part `need` (read from its config files)."""
    from vlkit.blip.checkpoint import blip_kind

    kind = blip_kind(spec)
    if kind != "full" and kind != {"decoder": "captioning", "encoder": "retrieval"}[need]:
        what, cls = _NEEDS[need]
        raise VlkitError(f"{flag} {spec}: this BLIP {kind} checkpoint has no {what}; give a {cls} checkpoint or a full BLIP model")


def decoding_settings(
    nucleus: bool, beam: int | None, top_p: float | None, num_captions: int, max_length: int, min_length: int, seed: int,
    *, prompt: str = "", repetition_penalty: float | None = None, precision: str = "fp32",
    to_nucleus: str, to_more_beams: str,
):
    """The `CaptionSettings` of a captioning command's options, each checked in one line; `to_nucleus` and
    `to_more_beams` say how that command switches to sampling or to more beams."""
    from vlkit.blip.generate import BEAM, settings_for
    from vlkit.commands import validate

    if top_p is not None and not nucleus:
        raise VlkitError(f"--top-p {top_p}: applies to nucleus sampling only; {to_nucleus}")
    validate.at_least("--beam", beam)
    validate.at_least("--max-length", max_length, 2)
    validate.at_least("--min-length", min_length, 0)
    validate.at_least("--num-captions", num_captions)
    beams = beam or BEAM.num_beams
    if not nucleus and num_captions > beams:
        raise VlkitError(f"--num-captions {num_captions}: beam search returns at most --beam {beams} captions per image; {to_more_beams}")
    if min_length > max_length:
        raise VlkitError(f"--min-length {min_length}: is above --max-length {max_length}")
    if top_p is not None and not (0 < top_p <= 1):
        raise VlkitError(f"--top-p {top_p}: must be in (0, 1]")
    validate.positive("--repetition-penalty", repetition_penalty)
    validate.choice("--precision", precision, ("fp32", "bf16"))
    overrides: dict = {"max_length": max_length, "min_length": min_length, "seed": seed, "num_return_sequences": num_captions,
                       "precision": precision}
    if beam is not None:
        overrides["num_beams"] = beam
    if top_p is not None:
        overrides["top_p"] = top_p
    if repetition_penalty is not None:
        overrides["repetition_penalty"] = repetition_penalty
    return settings_for("nucleus" if nucleus else "beam", prompt, **overrides)


def _load(spec: str, device: str, need: str):
    """Load a BLIP model that has the part `need` ("decoder" to caption, "encoder" to match)."""
    from vlkit.blip.checkpoint import load_blip

    loaded = load_blip(spec, device=device)
    if not (loaded.model.has_decoder if need == "decoder" else loaded.model.has_encoder):  # a .pth, known only now
        what, cls = _NEEDS[need]
        raise VlkitError(f"--model {spec}: this BLIP checkpoint has no {what}; give a {cls} checkpoint or a full BLIP model")
    return loaded


def caption(
    images: list[Path] = typer.Argument(..., help="Image files, folders (searched recursively) and/or .csv/.jsonl tables with an image column."),
    model: str = typer.Option(..., "--model", help="BLIP model: a Hugging Face BLIP folder, a vlkit-blip folder, an original BLIP .pth or an embedded name."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam search with N beams (the default, BLIP's N = 3)."),
    sample: bool = typer.Option(False, "--sample", help="Nucleus sampling instead (BLIP's CapFilt: top-p 0.9, repetition penalty 1.1)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="With --sample: the nucleus mass (default 0.9)."),
    prompt: str = typer.Option("", "--prompt", help='Text the decoder continues, e.g. "a picture of " (BLIP\'s captioners); stripped from the caption.'),
    max_length: int = typer.Option(20, "--max-length", help="Most tokens per caption, counting [DEC] and the prompt (BLIP: 20)."),
    min_length: int = typer.Option(5, "--min-length", help="Fewest tokens, counted as --max-length (BLIP: 5)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Default BLIP's: 1.0 with beam search, 1.1 with --sample."),
    num_captions: int = typer.Option(1, "--num-captions", help="Captions per image (the best beams, or independent samples)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (exact) or bf16 (autocast: about 2x on CPUs with avx512_bf16; a few captions change)."),
    seed: int = typer.Option(0, "--seed", help="Seeds --sample (recorded either way)."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Tables' image column (default: image, path, file, ...)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Caption images with BLIP: writes captions.jsonl, config.json and metrics.json (skipped files listed) to a run folder."""
    from vlkit import runs
    from vlkit.blip.captioning import caption_files, resolve_images, settings_record, write_captions
    from vlkit.commands import validate

    # every argument first: a typo costs a second, not a model load
    if sample and beam is not None:
        raise VlkitError("--beam and --sample: pick one decoding method (beam search or nucleus sampling)")
    validate.at_least("--batch-size", batch_size)
    settings = decoding_settings(sample, beam, top_p, num_captions, max_length, min_length, seed, prompt=prompt,
                                 repetition_penalty=repetition_penalty, precision=precision,
                                 to_nucleus="add --sample", to_more_beams="raise --beam or use --sample")
    device = validate.device("--device", device)
    validate.out_folder("--out", out)
    paths = resolve_images(images, image_column)
    check_blip_model(model, "decoder")

    loaded = _load(model, device, "decoder")
    result = caption_files(loaded, paths, settings, batch_size=batch_size, progress=progress)
    if not result.records:
        first = result.skipped[0]
        raise VlkitError(f"none of the {len(result.skipped)} images could be read (e.g. {first[0]}: {first[1]}); nothing was written")
    run = runs.new_run_dir(out, "caption")
    config_settings = {
        "images": [str(p) for p in images],
        "model": model,
        "method": settings.method,
        **settings_record(settings),
        "batch_size": batch_size,
        "image_column": image_column,
        "device": device,
        "out": out,
    }
    runs.write_config(run, config_settings, command="caption", model_fingerprint=_fingerprint(loaded), model_notes=loaded.notes, decoding=settings.to_dict())
    write_captions(run, result)
    runs.write_metrics(run, result.metrics())
    _print_captions(result, run)


def _print_captions(result, run: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{len(result.records)} captions ({result.settings.method})")
    table.add_column("image")
    table.add_column("caption")
    for rec in result.records[:20]:
        table.add_row(Path(rec["path"]).name, rec["caption"])
    console.print(table)
    if len(result.records) > 20:
        console.print(f"... and {len(result.records) - 20} more in captions.jsonl")
    _print_skipped(console, result.skipped, "metrics.json")
    m = result.metrics()
    console.print(f"{m['images_per_s']:.2f} images/s; run folder: {run}", soft_wrap=True)


def _print_skipped(console, skipped: list[tuple[str, str]], where: str) -> None:
    if not skipped:
        return
    console.print(f"skipped {len(skipped)} unreadable images (all listed in {where}):")
    for path, reason in skipped[:10]:
        console.print(f"  {path}: {reason}", markup=False, highlight=False, soft_wrap=True)
    if len(skipped) > 10:
        console.print(f"  ... and {len(skipped) - 10} more")


def match(
    model: str = typer.Option(..., "--model", help="BLIP model with an ITM head: a retrieval (BlipForImageTextRetrieval) or full BLIP checkpoint."),
    data: Path = typer.Option(..., "--data", help="CSV/JSONL table of image-text pairs (image paths relative to the table)."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Image column (default: image, path, file, ...)."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column (default: text, caption, title); a list cell gives one pair per text."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images (and pairs) per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """ITM probability (softmax of the ITM logits, "match" column) and ITC cosine of every image-text row: matches.csv + matches.jsonl."""
    from vlkit import runs
    from vlkit.blip.match import match_pairs, read_pairs, write_matches
    from vlkit.commands import validate

    validate.at_least("--batch-size", batch_size)
    device = validate.device("--device", device)
    validate.out_folder("--out", out)
    pairs = read_pairs(data, image_column, text_column)
    check_blip_model(model, "encoder")

    loaded = _load(model, device, "encoder")
    result = match_pairs(loaded.model, loaded.tokenizer, loaded.preprocess, pairs, batch_size=batch_size, progress=progress)
    if not result.rows:
        first = result.skipped[0]
        raise VlkitError(f"{data}: none of its {len(result.skipped)} images could be read (e.g. {first[0]}: {first[1]}); nothing was written")
    run = runs.new_run_dir(out, "match")
    settings = {"model": model, "data": data.resolve(), "image_column": image_column, "text_column": text_column, "batch_size": batch_size, "device": device, "out": out}
    runs.write_config(run, settings, command="match", model_fingerprint=_fingerprint(loaded), model_notes=loaded.notes)
    write_matches(run, result)
    runs.write_metrics(run, result.metrics())
    from rich.console import Console

    console = Console()
    m = result.metrics()
    console.print(f"{m['pairs']} pairs scored; mean ITM probability {m['mean_itm_probability']:.4f}, mean ITC cosine {m['mean_itc_cosine']:.4f}")
    _print_skipped(console, result.skipped, "metrics.json")
    console.print(f"run folder: {run} (matches.csv, matches.jsonl)", soft_wrap=True)


def eval_caption(
    pred: Path = typer.Option(..., "--pred", help="Predicted captions: captions.jsonl from `vlkit caption`, or any CSV/JSONL with image and caption columns."),
    refs: Path = typer.Option(..., "--refs", help="Reference captions: CSV/JSONL with an image column and a caption column (a string or a list; several rows per image are merged)."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="References' image column (default: image, path, file, ...)."),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="References' caption column (default: caption, captions, text, references)."),
    pred_image_column: Optional[str] = typer.Option(None, "--pred-image-column", help="Predictions' image column (default: image, path, ...)."),
    pred_caption_column: Optional[str] = typer.Option(None, "--pred-caption-column", help="Predictions' caption column (default: caption, captions, text)."),
    tokenizer: str = typer.Option("auto", "--tokenizer", help="auto (the Java PTB tokenizer when Java is present, else vlkit's Python mirror), ptb or python."),
    meteor: str = typer.Option("auto", "--meteor", help="auto (when Java is present), on or off."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run folder."),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap's scorers): writes config.json, metrics.json, per_image.jsonl."""
    from vlkit import io, runs
    from vlkit.blip.caption_metrics import evaluate_caption_files

    if tokenizer not in ("auto", "ptb", "python"):
        raise VlkitError(f"--tokenizer {tokenizer}: unknown; use auto, ptb or python")
    if meteor not in ("auto", "on", "off"):
        raise VlkitError(f"--meteor {meteor}: unknown; use auto, on or off")
    ev = evaluate_caption_files(
        pred,
        refs,
        image_column=image_column,
        caption_column=caption_column,
        pred_image_column=pred_image_column,
        pred_caption_column=pred_caption_column,
        tokenizer=tokenizer,  # type: ignore[arg-type]
        meteor=meteor,  # type: ignore[arg-type]
    )
    run = runs.new_run_dir(out, "eval-caption")
    settings = {
        "pred": pred.resolve(),
        "refs": refs.resolve(),
        "image_column": image_column,
        "caption_column": caption_column,
        "pred_image_column": pred_image_column,
        "pred_caption_column": pred_caption_column,
        "tokenizer": tokenizer,
        "meteor": meteor,
        "out": out,
    }
    runs.write_config(run, settings, command="eval caption")
    runs.write_metrics(run, ev.to_dict())
    lines = (json.dumps({"path": path, **scores}, ensure_ascii=False) + "\n" for path, scores in ev.result.per_image.items())
    io.write_text(run / "per_image.jsonl", "".join(lines))
    _print_scores(ev, run)


def _print_scores(ev, run: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    res = ev.result
    table = Table(title=f"caption metrics on {res.images} images")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in res.scores.items():
        table.add_row(name, "n/a" if value is None else f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"tokenizer: {res.tokenizer_detail}", markup=False, highlight=False)
    for note in res.notes:
        console.print(note, markup=False, highlight=False)
    if ev.predictions_without_refs or ev.refs_without_prediction:
        console.print(
            f"left out: {len(ev.predictions_without_refs)} predicted images without references, "
            f"{len(ev.refs_without_prediction)} referenced images without a prediction (examples in metrics.json)"
        )
    console.print(f"run folder: {run}", soft_wrap=True)


# ---------------------------------------------------------------- --rerank itm (called from vlkit.commands.retrieval)


def check_rerank_search(index: Path, model: Optional[str], rerank: str, rerank_k: int, *, text: Optional[str], target: str) -> None:
    """`vlkit search --rerank`: the option, the direction and the index's model's kind, before anything loads."""
    from vlkit.blip.rerank import check_rerank, check_rerank_direction
    from vlkit.retrieval.index import read_manifest

    check_rerank(rerank, rerank_k)
    check_rerank_direction(text is not None, target)
    spec = model or read_manifest(index)["model"]["spec"]
    check_blip_model(spec, "encoder", "--model" if model else f"{index} (built with)")


def eval_retrieval_rerank(
    data: Path,
    model: str,
    rerank: str,
    rerank_k: int,
    caption_field: str,
    caption_template: Optional[str],
    image_field: str,
    batch_size: int,
    runs_dir: Path,
) -> None:
    """`vlkit eval retrieval --rerank itm`: recall@K by ITC alone and by ITC + ITM, side by side, in one run folder."""
    from rich.console import Console
    from rich.table import Table

    from vlkit import runs
    from vlkit.blip.rerank import check_rerank, evaluate_retrieval_rerank
    from vlkit.commands import validate
    from vlkit.retrieval.collection import read_source

    check_rerank(rerank, rerank_k)
    validate.at_least("--batch-size", batch_size)
    validate.caption_template("--caption-template", caption_template)
    validate.out_folder("--runs-dir", runs_dir)
    check_blip_model(model, "encoder")
    source = read_source(data, image_field=image_field, caption_field=caption_field, caption_template=caption_template)
    loaded = _load(model, "cpu", "encoder")
    result = evaluate_retrieval_rerank(loaded, source, k=rerank_k, batch_size=batch_size, progress=True)
    run = runs.new_run_dir(runs_dir, "eval-retrieval")
    settings = {"data": data.resolve(), "model": model, "caption_field": caption_field, "caption_template": caption_template,
                "image_field": image_field, "rerank": rerank, "rerank_k": rerank_k, "batch_size": batch_size}
    runs.write_config(run, settings, command="eval retrieval", model_fingerprint=_fingerprint(loaded), model_notes=loaded.notes)
    runs.write_metrics(run, result.to_dict())
    table = Table(title=f"retrieval on {data.name}: {result.images} images, {result.texts} captions; ITM re-ranks the ITC top {result.k}")
    cols = [c for c in result.itc["text_to_image"] if c != "queries"]
    table.add_column("direction")
    table.add_column("scores")
    for c in cols:
        table.add_column(c)
    for direction in ("text_to_image", "image_to_text"):
        for name, metrics in (("ITC", result.itc), ("ITC + ITM", result.itm)):
            table.add_row(direction.replace("_", " "), name, *(f"{metrics[direction][c]:.2f}" for c in cols))
    console = Console()
    console.print(table)
    _print_skipped(console, result.skipped, "metrics.json")
    console.print(f"run folder: {run}", soft_wrap=True)

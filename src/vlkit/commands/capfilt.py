"""`vlkit capfilt finetune|caption|filter|write|run`: BLIP's CapFilt over a web table, step by step or in one go.

`--out` is the CapFilt folder, not a run folder under it: every step reads and writes there, so a
step interrupted or run again picks up where it stopped (a finished fine-tune is not redone, an
interrupted one resumes from its checkpoint, a pass starts at the first shard it has not written).

`finetune` trains a filter (ITC + ITM) and a captioner (LM) apart from one pretrained BLIP (--model,
default vlkit-blip-tiny) on the human pairs, into `filter/` and `captioner/`. `caption` and `filter`
then use those fine-tuned models unless --captioner / --filter name others; `run` fine-tunes first
unless --no-finetune, where the pretrained --model does both jobs. `--ray` runs the caption and
filter passes on Ray Data, writing byte for byte what the single process writes.

`capfilt.json` records the web table's digest, each step's settings and the fingerprint of every
model a step used; a later step with other settings or another model is refused (use another --out)
rather than mixing outputs. Every argument, both tables and the models' kinds are checked before any
model loads or any file is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.blip.capfilt_finetune import Budget, Stage
    from vlkit.blip.checkpoint import LoadedBlip
    from vlkit.blip.match import Pair

STATE = "capfilt.json"
DEFAULT_MODEL = "vlkit-blip-tiny"
FINETUNED = "finetuned:"  # how capfilt.json names a model fine-tuned in the folder itself: finetuned:filter, finetuned:captioner


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="CapFilt: fine-tune a filter and a captioner, caption web images, filter web and synthetic texts "
                           "with ITM, write the bootstrapped collection.", no_args_is_help=True)
    sub.command("finetune")(finetune)
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


def _human(human: Path, image_column: Optional[str], text_column: Optional[str]) -> list["Pair"]:
    from vlkit.blip.match import read_pairs
    from vlkit.commands import validate

    validate.existing("--human", human, "file")
    return read_pairs(human, image_column, text_column)


def _check_ray(ray: Optional[str], ray_workers: int, device: str) -> None:
    """--ray names a Ray to use ('local' or an address), on CPU workers, and Ray is importable."""
    from vlkit.commands import validate

    validate.at_least("--ray-workers", ray_workers)
    if ray is None:
        return
    if not ray.strip():
        raise VlkitError("--ray '': give 'local' (a private local Ray) or a Ray cluster address")
    if device != "cpu":
        raise VlkitError(f"--ray: the Ray passes run on CPU workers; drop --device {device} or --ray")
    try:
        import ray as _ray  # noqa: F401
    except ImportError:
        raise VlkitError("--ray: Ray is not installed; install the extra with `pip install 'vlkit[ray]'`") from None


def _budget(epochs: int, max_steps: Optional[int], train_batch_size: int, lr: float, precision: str, lock_image: bool,
            checkpoint_every: int, seed: int) -> "Budget":
    from vlkit.blip.capfilt_finetune import Budget
    from vlkit.commands import validate

    validate.at_least("--epochs", epochs)
    validate.at_least("--max-steps", max_steps)
    validate.at_least("--train-batch-size", train_batch_size, 2)
    validate.positive("--lr", lr)
    validate.choice("--precision", precision, ("auto", "fp32", "bf16"))
    validate.at_least("--checkpoint-every", checkpoint_every)
    return Budget(epochs=epochs, max_steps=max_steps, batch_size=train_batch_size, lr=lr, precision=precision,
                  lock_image=lock_image, checkpoint_every=checkpoint_every, seed=seed)


def _check_finetune(model: str, budget: "Budget", pairs: list["Pair"], human: Path) -> None:
    """The pretrained model holds both halves (each stage starts from all of it) and a batch fits the human images."""
    from vlkit.blip.checkpoint import blip_kind

    kind = blip_kind(model)
    if kind != "full":
        lacks = "no text decoder" if kind == "retrieval" else "no text encoder or ITM head"
        raise VlkitError(f"--model {model}: this BLIP {kind} checkpoint has {lacks}; the filter and the captioner are "
                         f"fine-tuned from one full BLIP (e.g. {DEFAULT_MODEL})")
    images = len({p.path for p in pairs})
    if budget.batch_size > images:
        raise VlkitError(f"--train-batch-size {budget.batch_size}: exceeds the {images} images of --human {human}; lower it")


# ---------------------------------------------------------------- the folder's record


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
    """The folder's record with `section` set to `settings`; refused when the folder already ran it otherwise.
    The fingerprints a section holds are compared once the models load (`_same_model`), and kept."""
    before = state.get(section)
    if before is not None:
        fingerprints = {k: v for k, v in before.items() if k.endswith("fingerprint")}
        ran = {k: v for k, v in before.items() if k not in fingerprints}
        if ran != settings:
            changed = sorted(k for k in set(ran) | set(settings) if ran.get(k) != settings.get(k))
            raise VlkitError(f"--out {out}: its {section} step ran with other settings ({', '.join(changed)}); "
                             "use the same settings to resume, or another --out")
        settings = {**settings, **fingerprints}
    return {**state, section: settings}


def _same_model(state: dict[str, Any], out: Path, section: str, key: str, fingerprint: str, flag: str) -> dict[str, Any]:
    """The record with `section.key` = the loaded model's fingerprint; refused when the step ran with other weights."""
    before = state.get(section, {}).get(key)
    if before is not None and before != fingerprint:
        raise VlkitError(f"--out {out}: its {section} step ran with a model of fingerprint {before}, but {flag} now "
                         f"loads fingerprint {fingerprint}; give the model it ran with, or use another --out")
    return {**state, section: {**state.get(section, {}), key: fingerprint}}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    from vlkit import io

    io.write_json(out / STATE, state)


# ---------------------------------------------------------------- which model does a job


@dataclass(frozen=True)
class _Model:
    """A captioner or filter: what capfilt.json records of it and what loads it."""

    record: str
    spec: str
    finetuned: bool = False


def _spec(spec: str) -> str:
    """A model spec as the folder records it: a local file or folder by its absolute path (so `blip` and
    `./blip` are one model), an embedded name or hub id as given."""
    from vlkit.models.registry import EMBEDDED

    path = Path(spec).expanduser()
    return spec if spec in EMBEDDED or not spec.strip() or not path.exists() else str(path.resolve())


def _given(spec: str) -> _Model:
    return _Model(_spec(spec), _spec(spec))


def _finetuned(out: Path, stage: "Stage") -> _Model:
    from vlkit.blip.capfilt_finetune import model_dir

    return _Model(FINETUNED + stage.name, str(model_dir(out, stage)), True)


def _pick(out: Path, given: Optional[str], stage: "Stage", flag: str) -> _Model:
    """`given`, else the model fine-tuned in --out (which must have finished)."""
    from vlkit.blip import capfilt_finetune as ft

    if given is not None:
        return _given(given)
    if ft.finished(out, stage):
        return _finetuned(out, stage)
    if ft.started(out, stage):
        raise VlkitError(f"--out {out}: its {stage.name} fine-tune has not finished; run `vlkit capfilt finetune` with the "
                         f"same settings to finish it, or pass {flag}")
    raise VlkitError(f"{flag}: not given, and --out {out} holds no fine-tuned {stage.name}; run `vlkit capfilt finetune` "
                     f"first, or pass {flag} (e.g. {DEFAULT_MODEL})")


def _check_given(model: _Model, need: str, flag: str) -> None:
    from vlkit.commands.blip import check_blip_model

    if not model.finetuned:
        check_blip_model(model.spec, need, flag)


# ---------------------------------------------------------------- the steps


def _caption_settings(beam: Optional[int], top_p: Optional[float], num_captions: int, max_length: int, min_length: int, seed: int):
    """BLIP's nucleus sampling unless --beam is given."""
    from vlkit.commands.blip import decoding_settings

    return decoding_settings(beam is None, beam, top_p, num_captions, max_length, min_length, seed,
                             to_nucleus="drop --beam", to_more_beams="raise --beam or drop it")


def _finetune_record(model: str, human: Path, image_column: Optional[str], text_column: Optional[str], budget: "Budget") -> dict[str, Any]:
    return {"model": model, "human": str(human.resolve()), "human_sha256": _digest(human), "image_column": image_column,
            "text_column": text_column, **budget.to_dict()}


def _do_finetune(out: Path, state: dict[str, Any], stages: list["Stage"], model: str, pairs: list["Pair"], budget: "Budget",
                 device: str, progress: bool) -> tuple[dict[str, Any], dict[str, "LoadedBlip"]]:
    """Fine-tune the stages not finished before; returns the record and the newly trained models, loaded."""
    import json

    from rich.console import Console

    from vlkit.blip import capfilt_finetune as ft
    from vlkit.blip.checkpoint import load_blip
    from vlkit.pretrain.blip_trainer import trained_blip

    console = Console()
    todo = [s for s in stages if not ft.finished(out, s)]
    trained: dict[str, LoadedBlip] = {}
    for stage in stages:
        if stage not in todo:
            console.print(f"{stage.name}: fine-tuned before: {ft.model_dir(out, stage)}", soft_wrap=True)
    if not todo:
        return state, trained
    state = _same_model(state, out, "finetune", "model_fingerprint", trained_blip(model).fingerprint(), "--model")
    table, images, skipped = ft.human_table(pairs, out)
    done = state.get("finetuned", {})
    state["finetuned"] = {**done, "human_images": images, "human_skipped": [{"path": p, "reason": r} for p, r in skipped]}
    _save_state(out, state)  # after the model loaded: a refused model leaves nothing behind
    if skipped:
        console.print(f"{len(skipped)} human image(s) cannot be read and are left out (listed in {out / STATE})", soft_wrap=True)
    for stage in todo:
        ft.finetune(stage, model, table, images, out, budget, device=device, progress=progress)
        loaded = trained[stage.name] = load_blip(str(ft.model_dir(out, stage)), device=device)
        steps = json.loads((out / stage.name / "metrics.json").read_text(encoding="utf-8"))["train"]["global_step"]
        state["finetuned"][stage.name] = {"model": f"{stage.name}/model", "fingerprint": loaded.fingerprint(),
                                          "objectives": list(stage.objectives), "steps": steps}
        _save_state(out, state)
        console.print(f"{stage.name}: fine-tuned from {model} on {'+'.join(stage.objectives)}, {steps} steps: "
                      f"{ft.model_dir(out, stage)} (fingerprint {loaded.fingerprint()})", soft_wrap=True)
    return state, trained


_FINGERPRINT_KEY = {"caption": "captioner_fingerprint", "filter": "filter_fingerprint"}


def _ready(out: Path, state: dict[str, Any], section: str, model: _Model, need: str, flag: str, device: str,
           loaded: "LoadedBlip | None" = None) -> tuple[dict[str, Any], "LoadedBlip"]:
    """The step's model loaded (unless given) and its fingerprint checked against the folder's and recorded."""
    from vlkit.commands.blip import _load

    loaded = loaded or _load(model.spec, device, need)
    state = _same_model(state, out, section, _FINGERPRINT_KEY[section], loaded.fingerprint(), flag)
    _save_state(out, state)  # after the model loaded: a refused model leaves nothing behind
    return state, loaded


def _need_captions(out: Path, todo) -> None:
    missing = [s for s in todo if not s.captions_path.exists()]
    if missing:
        raise VlkitError(f"--out {out}: {len(missing)} of {len(todo)} shards have no captions yet; run `vlkit capfilt caption` first")


def _passes(todo, progress: bool, ray: Optional[str], ray_workers: int, *, captioner=None, settings=None, filt=None,
            threshold: float = 0.5, caption_batch_size: int = 16, filter_batch_size: int = 32) -> None:
    """The caption pass, the filter pass or both (in that order), in this process or on Ray Data."""
    from vlkit.blip import capfilt
    from vlkit.blip.captioning import progress_bar

    what = " and ".join(w for w, m in (("captioning", captioner), ("filtering", filt)) if m is not None)
    with progress_bar(progress, len(todo), f"{what} shards") as advance:
        if ray is not None:
            from vlkit.blip.capfilt_ray import passes_ray

            passes_ray(todo, captioner=captioner, settings=settings, filt=filt, threshold=threshold, caption_batch_size=caption_batch_size,
                       filter_batch_size=filter_batch_size, address=ray, num_workers=ray_workers, on_shard=lambda s, done: advance(1))
            return
        if captioner is not None:
            capfilt.caption_pass(captioner, todo, settings, batch_size=caption_batch_size,
                                 on_shard=lambda s, done: advance(0 if filt is not None else 1))
        if filt is not None:
            capfilt.filter_pass(filt, todo, threshold, batch_size=filter_batch_size, on_shard=lambda s, done: advance(1))


def _do_write(out, todo, human: list["Pair"]) -> None:
    from rich.console import Console

    from vlkit.blip import capfilt

    summary = capfilt.write_collection(human, todo, out)
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
CAPTIONER = typer.Option(None, "--captioner", help="BLIP model with a text decoder (a folder, .pth or embedded name); "
                                                    "default: the captioner fine-tuned in --out.")
FILTER = typer.Option(None, "--filter", help="BLIP model with a text encoder and ITM head; default: the filter fine-tuned in --out.")
HUMAN = typer.Option(..., "--human", help="The human-annotated pairs: CSV/JSONL with an image and a text column.")
BEAM = typer.Option(None, "--beam", help="Beam search with N beams instead of BLIP's nucleus sampling.")
TOP_P = typer.Option(None, "--top-p", help="Nucleus mass (default 0.9).")
NUM_CAPTIONS = typer.Option(1, "--num-captions", help="Synthetic captions per web image.")
MAX_LENGTH = typer.Option(20, "--max-length", help="Most tokens per caption (BLIP: 20).")
MIN_LENGTH = typer.Option(5, "--min-length", help="Fewest tokens (BLIP: 5).")
SEED = typer.Option(0, "--seed", help="Seeds the sampling (each shard from it and its index) and the fine-tuning.")
THRESHOLD = typer.Option(0.5, "--threshold", help="Keep a text when its ITM match probability is above this (BLIP: 0.5).")
RAY = typer.Option(None, "--ray", help="Run the caption and filter passes on Ray Data: 'local' (a private local Ray) or a cluster address.")
RAY_WORKERS = typer.Option(2, "--ray-workers", help="Ray actors (one model each, one CPU and one torch thread each).")
# fine-tuning
MODEL = typer.Option(DEFAULT_MODEL, "--model", help="The pretrained full BLIP the filter and the captioner are fine-tuned from.")
EPOCHS = typer.Option(2, "--epochs", help="Fine-tuning epochs over the human pairs, per stage.")
MAX_STEPS = typer.Option(None, "--max-steps", help="Stop each stage after this many steps (instead of --epochs).")
TRAIN_BATCH_SIZE = typer.Option(32, "--train-batch-size", help="Human pairs per fine-tuning step (ITC/ITM negatives come from it).")
LR = typer.Option(1e-4, "--lr", help="AdamW learning rate, cosine-decayed to 0 (weight decay 0.05).")
PRECISION = typer.Option("auto", "--precision", help="auto (bf16 on a CUDA GPU, else fp32), fp32 or bf16 (autocast).")
LOCK_IMAGE = typer.Option(True, "--lock-image/--train-image", help="Keep the image tower frozen (its tokens computed once) or train it too (BLIP).")
CHECKPOINT_EVERY = typer.Option(100, "--checkpoint-every", help="Steps between checkpoints (an interrupted fine-tune resumes from the last).")
FINETUNE = typer.Option(True, "--finetune/--no-finetune", help="Fine-tune the filter and the captioner first (BLIP), or use --model for both.")


def finetune(
    human: Path = HUMAN,
    out: Path = OUT,
    model: str = MODEL,
    epochs: int = EPOCHS,
    max_steps: Optional[int] = MAX_STEPS,
    train_batch_size: int = TRAIN_BATCH_SIZE,
    lr: float = LR,
    precision: str = PRECISION,
    lock_image: bool = LOCK_IMAGE,
    checkpoint_every: int = CHECKPOINT_EVERY,
    seed: int = typer.Option(0, "--seed", help="Seeds the fine-tuning."),
    image_column: Optional[str] = IMAGE_COLUMN,
    text_column: Optional[str] = TEXT_COLUMN,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Fine-tune a filter (ITC + ITM) and a captioner (LM) apart from one pretrained BLIP on the human pairs, into --out/filter and --out/captioner."""
    from vlkit.blip.capfilt_finetune import CAPTIONER as CAPTIONER_STAGE
    from vlkit.blip.capfilt_finetune import FILTER as FILTER_STAGE
    from vlkit.commands import validate

    budget = _budget(epochs, max_steps, train_batch_size, lr, precision, lock_image, checkpoint_every, seed)
    device = validate.device("--device", device)
    validate.out_folder("--out", out)
    pairs = _human(human, image_column, text_column)
    model = _spec(model)
    state = _merge(_read_state(out), out, "finetune", _finetune_record(model, human, image_column, text_column, budget))
    _check_finetune(model, budget, pairs, human)
    _do_finetune(out, state, [FILTER_STAGE, CAPTIONER_STAGE], model, pairs, budget, device, progress)


def caption(
    web: Path = WEB,
    out: Path = OUT,
    captioner: Optional[str] = CAPTIONER,
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
    ray: Optional[str] = RAY,
    ray_workers: int = RAY_WORKERS,
    progress: bool = PROGRESS,
) -> None:
    """Write a synthetic caption for every web image (BLIP: nucleus sampling, top-p 0.9)."""
    from vlkit.blip.capfilt_finetune import CAPTIONER as STAGE
    from vlkit.commands import validate

    settings = _caption_settings(beam, top_p, num_captions, max_length, min_length, seed)
    validate.at_least("--batch-size", batch_size)
    device = validate.device("--device", device)
    _check_ray(ray, ray_workers, device)
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    chosen = _pick(out, captioner, STAGE, "--captioner")
    state = _merge(_merge(_read_state(out), out, "web", record), out, "caption", {"captioner": chosen.record, **settings.to_dict()})
    _check_given(chosen, "decoder", "--captioner")
    _, loaded = _ready(out, state, "caption", chosen, "decoder", "--captioner", device)
    _passes(todo, progress, ray, ray_workers, captioner=loaded, settings=settings, caption_batch_size=batch_size)


def filter_(
    web: Path = WEB,
    out: Path = OUT,
    filt: Optional[str] = FILTER,
    threshold: float = THRESHOLD,
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    shard_size: int = SHARD_SIZE,
    image_column: Optional[str] = IMAGE_COLUMN,
    text_column: Optional[str] = TEXT_COLUMN,
    device: str = DEVICE,
    ray: Optional[str] = RAY,
    ray_workers: int = RAY_WORKERS,
    progress: bool = PROGRESS,
) -> None:
    """Score every web text and synthetic caption against its image with ITM; keep those above the threshold."""
    from vlkit.blip import capfilt
    from vlkit.blip.capfilt_finetune import FILTER as STAGE
    from vlkit.commands import validate

    capfilt.check_threshold(threshold)
    validate.at_least("--batch-size", batch_size)
    device = validate.device("--device", device)
    _check_ray(ray, ray_workers, device)
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    chosen = _pick(out, filt, STAGE, "--filter")
    state = _merge(_merge(_read_state(out), out, "web", record), out, "filter", {"filter": chosen.record, "threshold": threshold})
    _check_given(chosen, "encoder", "--filter")
    _need_captions(out, todo)
    _, loaded = _ready(out, state, "filter", chosen, "encoder", "--filter", device)
    _passes(todo, progress, ray, ray_workers, filt=loaded, threshold=threshold, filter_batch_size=batch_size)


def write(
    human: Path = HUMAN,
    web: Path = WEB,
    out: Path = OUT,
    shard_size: int = SHARD_SIZE,
    image_column: Optional[str] = IMAGE_COLUMN,
    text_column: Optional[str] = TEXT_COLUMN,
) -> None:
    """Write collection.jsonl (human + kept web + kept synthetic), provenance.jsonl and summary.json."""
    human_pairs = _human(human, image_column, text_column)
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    _merge(_read_state(out), out, "web", record)
    _do_write(out, todo, human_pairs)


def run(
    human: Path = HUMAN,
    web: Path = WEB,
    out: Path = OUT,
    model: str = MODEL,
    captioner: Optional[str] = typer.Option(None, "--captioner", help="Caption with this BLIP instead of the fine-tuned captioner (or --model)."),
    filt: Optional[str] = typer.Option(None, "--filter", help="Filter with this BLIP instead of the fine-tuned filter (or --model)."),
    do_finetune: bool = FINETUNE,
    epochs: int = EPOCHS,
    max_steps: Optional[int] = MAX_STEPS,
    train_batch_size: int = TRAIN_BATCH_SIZE,
    lr: float = LR,
    precision: str = PRECISION,
    lock_image: bool = LOCK_IMAGE,
    checkpoint_every: int = CHECKPOINT_EVERY,
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
    ray: Optional[str] = RAY,
    ray_workers: int = RAY_WORKERS,
    progress: bool = PROGRESS,
) -> None:
    """finetune (unless --no-finetune), caption, filter and write in one go (each resumes where an earlier run stopped)."""
    from vlkit.blip import capfilt
    from vlkit.blip.capfilt_finetune import CAPTIONER as CAPTIONER_STAGE
    from vlkit.blip.capfilt_finetune import FILTER as FILTER_STAGE
    from vlkit.commands import validate

    settings = _caption_settings(beam, top_p, num_captions, max_length, min_length, seed)
    capfilt.check_threshold(threshold)
    validate.at_least("--batch-size", batch_size)
    budget = _budget(epochs, max_steps, train_batch_size, lr, precision, lock_image, checkpoint_every, seed)
    device = validate.device("--device", device)
    _check_ray(ray, ray_workers, device)
    human_pairs = _human(human, image_column, text_column)  # its columns, before any model loads
    _, todo, record = _web(web, image_column, text_column, shard_size, out)
    model = _spec(model)
    stages = [s for s, given in ((FILTER_STAGE, filt), (CAPTIONER_STAGE, captioner)) if do_finetune and given is None]
    pick = {s.name: _finetuned(out, s) for s in stages}
    chosen_captioner = _given(captioner) if captioner is not None else pick.get(CAPTIONER_STAGE.name, _given(model))
    chosen_filter = _given(filt) if filt is not None else pick.get(FILTER_STAGE.name, _given(model))
    state = _merge(_read_state(out), out, "web", record)
    if stages:
        state = _merge(state, out, "finetune", _finetune_record(model, human, image_column, text_column, budget))
    state = _merge(state, out, "caption", {"captioner": chosen_captioner.record, **settings.to_dict()})
    state = _merge(state, out, "filter", {"filter": chosen_filter.record, "threshold": threshold})
    if stages:
        _check_finetune(model, budget, human_pairs, human)
    _check_given(chosen_captioner, "decoder", "--captioner" if captioner is not None else "--model")
    _check_given(chosen_filter, "encoder", "--filter" if filt is not None else "--model")
    state, trained = _do_finetune(out, state, stages, model, human_pairs, budget, device, progress)
    captioner_flag = "--captioner" if captioner is not None else "--model"
    state, captioning = _ready(out, state, "caption", chosen_captioner, "decoder", captioner_flag, device, trained.get(CAPTIONER_STAGE.name))
    if ray is None:  # one model in memory at a time
        _passes(todo, progress, None, ray_workers, captioner=captioning, settings=settings, caption_batch_size=batch_size)
        captioning = None
    filter_flag = "--filter" if filt is not None else "--model"
    state, filtering = _ready(out, state, "filter", chosen_filter, "encoder", filter_flag, device, trained.get(FILTER_STAGE.name))
    _passes(todo, progress, ray, ray_workers, captioner=captioning, settings=settings, filt=filtering, threshold=threshold,
            caption_batch_size=batch_size, filter_batch_size=batch_size)
    _do_write(out, todo, human_pairs)

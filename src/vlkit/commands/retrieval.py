"""Retrieval commands: `vlkit index build|add`, `vlkit search`, `vlkit eval retrieval`, `vlkit serve`.

Each is a thin call into `vlkit.retrieval`; heavy imports stay inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from vlkit.commands import validate
from vlkit.errors import VlkitError

DEFAULT_MODEL = "vlkit-tiny"


def _group(app: typer.Typer, name: str, help: str) -> typer.Typer:
    """The app's sub-command group `name`, created on first use (several areas add to `eval`)."""
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    sub = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


def _load_model(spec: str):
    from vlkit.models import load_model

    return load_model(spec).eval()


def _embedder(ray: Optional[str], ray_workers: int, batch_size: int, precision: str = "fp32"):
    if ray is None:
        from functools import partial

        from vlkit.retrieval.index import embed_images_local

        return partial(embed_images_local, batch_size=batch_size, precision=precision)
    from vlkit.retrieval.embed_ray import ray_embedder

    return ray_embedder(ray, num_workers=ray_workers, batch_size=batch_size, precision=precision)


def _check_precision(precision: Optional[str]) -> None:
    """An unknown --precision is one error line before anything loads; bf16 on a CPU without
    native bfloat16 gets one note line (it runs, but slower than fp32)."""
    if precision is None:
        return
    from vlkit import precision as precisions

    precisions.check(precision)
    note = precisions.advice(precision)
    if note:
        print(note, file=sys.stderr)


PRECISION_HELP = "fp32 (default), bf16 (bfloat16 autocast) or int8 (dynamic int8 Linear layers of the image tower; CPU)."
INDEX_PRECISION_HELP = "fp32, bf16 or int8; defaults to the precision the index was built with."


def _print_add_report(out: Path, report: Any) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"embedded {report.embedded} images and {report.captions} captions; {report.already_done} already in the index")
    for name, info in report.collections.items():
        if info["count"]:
            console.print(f"{name}: {info['count']} vectors, faiss {info['faiss']['factory']} ({info['faiss']['type']})")
    if report.skipped:
        console.print(f"skipped {len(report.skipped)} unreadable images (all listed in {out / 'skipped.json'}):")
        for path, reason in report.skipped[:20]:
            console.print(f"  {path}: {reason}", markup=False, highlight=False)
        if len(report.skipped) > 20:
            console.print(f"  ... and {len(report.skipped) - 20} more")


def _hits_table(hits: list, title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("rank", "score", "id", "label / caption"):
        table.add_column(col)
    for h in hits:
        m = h.metadata
        text = m.get("text") if h.kind == "caption" else (m.get("label") or m.get("caption") or "; ".join(m.get("captions", [])[:1]))
        table.add_row(str(h.rank), f"{h.score:.4f}", h.id, str(text or ""))
    return table


def _check_add_args(chunk_size: int, batch_size: int, ray_workers: int, caption_template: Optional[str]) -> None:
    validate.at_least("--chunk-size", chunk_size)
    validate.at_least("--batch-size", batch_size)
    validate.at_least("--ray-workers", ray_workers)
    validate.caption_template("--caption-template", caption_template)


def register(app: typer.Typer) -> None:
    index_app = typer.Typer(help="Build and grow retrieval indexes.", no_args_is_help=True)
    app.add_typer(index_app, name="index")
    eval_app = _group(app, "eval", "Evaluate models.")

    images_opt = typer.Option(..., "--images", help="Image folder, or a .csv/.jsonl table with an image column (paths relative to it).")
    caption_field_opt = typer.Option("caption", "--caption-field", help="Table column holding captions (a string or a list).")
    template_opt = typer.Option(None, "--caption-template", help="Build captions from row fields, e.g. 'an emoji of {label}'.")
    image_field_opt = typer.Option("image", "--image-field", help="Table column holding image paths.")

    @index_app.command("build")
    def index_build(
        images: Path = images_opt,
        out: Path = typer.Option(..., "--out", help="Index folder to create (or to resume after an interrupted build)."),
        model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model spec: a folder, a hub-style id, open_clip:NAME or vlkit-tiny."),
        caption_field: str = caption_field_opt,
        caption_template: Optional[str] = template_opt,
        image_field: str = image_field_opt,
        image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the index serves files from (default: the folder or the table's folder)."),
        index_type: str = typer.Option("auto", "--index-type", help="auto (exact below 100k vectors, IVF-PQ above), flat, hnsw or ivfpq."),
        chunk_size: int = typer.Option(512, "--chunk-size", help="Images per committed shard (the unit of resumption)."),
        batch_size: int = typer.Option(64, "--batch-size"),
        ray: Optional[str] = typer.Option(None, "--ray", help="Embed on Ray Data: a cluster address, or 'local' for a local instance."),
        ray_workers: int = typer.Option(2, "--ray-workers", help="Ray actors (one model each)."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP + " Recorded in the index; add and search default to it."),
    ) -> None:
        """Embed images (and their captions) and build a faiss index; rerun to resume."""
        from vlkit.retrieval.collection import read_source
        from vlkit.retrieval.index import INDEX_TYPES, build_index, preflight_build

        _check_precision(precision)
        _check_add_args(chunk_size, batch_size, ray_workers, caption_template)
        validate.choice("--index-type", index_type, INDEX_TYPES)
        validate.out_folder("--out", out)
        validate.existing("--image-root", image_root, "folder")
        source = read_source(images, image_field=image_field, caption_field=caption_field, caption_template=caption_template)
        preflight_build(out, source, image_root=image_root, index_type=index_type, chunk_size=chunk_size, precision=precision)
        report = build_index(
            out,
            _load_model(model),
            source,
            image_root=image_root,
            index_type=index_type,
            chunk_size=chunk_size if ray is None else max(chunk_size, 4096),
            embedder=_embedder(ray, ray_workers, batch_size, precision),
            progress=progress,
            precision=precision,
        )
        _print_add_report(out, report)

    @index_app.command("add")
    def index_add(
        index: Path = typer.Argument(..., help="Index folder."),
        images: Path = images_opt,
        model: Optional[str] = typer.Option(None, "--model", help="Defaults to the model the index was built with; a different one is refused."),
        caption_field: str = caption_field_opt,
        caption_template: Optional[str] = template_opt,
        image_field: str = image_field_opt,
        chunk_size: int = typer.Option(512, "--chunk-size"),
        batch_size: int = typer.Option(64, "--batch-size"),
        ray: Optional[str] = typer.Option(None, "--ray"),
        ray_workers: int = typer.Option(2, "--ray-workers"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        precision: Optional[str] = typer.Option(None, "--precision", help=INDEX_PRECISION_HELP + " Another one is refused (one index, one precision)."),
    ) -> None:
        """Add images not yet in the index (resumable; images already there are skipped)."""
        from vlkit.retrieval.collection import read_source
        from vlkit.retrieval.index import add_images, check_precision, read_manifest

        _check_precision(precision)
        _check_add_args(chunk_size, batch_size, ray_workers, caption_template)
        man = read_manifest(index)
        spec = model or man["model"]["spec"]
        precision = check_precision(man, precision, index)
        source = read_source(images, image_field=image_field, caption_field=caption_field, caption_template=caption_template)
        report = add_images(
            index,
            _load_model(spec),
            source,
            chunk_size=chunk_size if ray is None else max(chunk_size, 4096),
            embedder=_embedder(ray, ray_workers, batch_size, precision),
            progress=progress,
            precision=precision,
        )
        _print_add_report(index, report)

    @app.command("search")
    def search(
        index: Path = typer.Argument(..., help="Index folder."),
        text: Optional[str] = typer.Option(None, "--text", help="Text query."),
        image: Optional[Path] = typer.Option(None, "--image", help="Image file query."),
        k: int = typer.Option(10, "-k", "--k", help="Number of results."),
        target: str = typer.Option("images", "--target", help="Search indexed 'images' or indexed 'captions'."),
        model: Optional[str] = typer.Option(None, "--model", help="Defaults to the index's model."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        rerank: str = typer.Option("none", "--rerank", help="'itm': re-score the ITC top --rerank-k with a BLIP model's ITM head (BLIP: ITM logit + cosine); text->images and image->captions."),
        rerank_k: int = typer.Option(128, "--rerank-k", help="With --rerank itm: how many ITC candidates ITM re-scores."),
        precision: Optional[str] = typer.Option(None, "--precision", help=INDEX_PRECISION_HELP + " Another one embeds the query in it, with a note."),
    ) -> None:
        """Search an index: text->image, image->image, image->text, text->text."""
        from vlkit.retrieval.index import RetrievalIndex
        from vlkit.retrieval.search import TARGETS, Searcher

        _check_precision(precision)
        if (text is None) == (image is None):
            raise VlkitError("vlkit search: give exactly one of --text or --image")
        if text is not None and not text.strip():
            raise VlkitError("--text: empty; give some words to search for")
        validate.at_least("-k", k)
        validate.at_least("--rerank-k", rerank_k)
        validate.choice("--target", target, TARGETS)
        if rerank != "none":
            from vlkit.commands.blip import check_rerank_search

            check_rerank_search(index, model, rerank, rerank_k, text=text, target=target)
        if image is not None:
            from vlkit.data.images import probe_image

            probe_image(image)  # a missing, empty, non-image or oversized query fails before the model loads
        opened = RetrievalIndex(index)
        size = len(opened.collection(target).items)
        if k > size:
            from rich.console import Console

            Console(stderr=True).print(f"-k {k}: the index holds {size} {target}; showing all {size}", markup=False, highlight=False)
            k = size
        searcher = Searcher(opened, _load_model(model or opened.model_spec), precision)
        if searcher.precision_note:
            print(searcher.precision_note, file=sys.stderr)
        skipped: list = []
        if rerank == "itm":
            from vlkit.blip.rerank import rerank_search

            hits, skipped = rerank_search(searcher, text=text, image=image, k=k, target=target, rerank_k=rerank_k)
        else:
            hits = searcher.search_text(text, k, target) if text is not None else searcher.search_image(image, k, target)
        query = {"text": text} if text is not None else {"image": str(image)}
        if skipped:
            print(f"re-ranking skipped {len(skipped)} candidate images that can no longer be read: "
                  + "; ".join(f"{p}: {r}" for p, r in skipped[:5]), file=sys.stderr)
        if as_json:
            body = {"query": {**query, "k": k, "target": target, "rerank": rerank}, "results": [h.to_dict() for h in hits]}
            print(json.dumps(body, ensure_ascii=False, indent=2))
            return
        from rich.console import Console

        Console().print(_hits_table(hits, f"{target} for {json.dumps(query, ensure_ascii=False)}"))

    @app.command("serve")
    def serve(
        index: Path = typer.Argument(..., help="Index folder."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 127.0.0.1 keeps it local."),
        port: int = typer.Option(8000, "--port"),
        model: Optional[str] = typer.Option(None, "--model", help="Defaults to the index's model."),
        max_k: int = typer.Option(100, "--max-k", help="Largest k a query may ask for."),
        max_query_chars: int = typer.Option(256, "--max-query-chars", help="Longest text query."),
        max_upload_mb: float = typer.Option(5.0, "--max-upload-mb", help="Largest uploaded query image, in MiB (refused before it is read whole)."),
        max_image_mp: float = typer.Option(16.0, "--max-image-mp", help="Most decoded megapixels per uploaded query (JPEGs above are decoded at reduced scale, other formats refused)."),
    ) -> None:
        """Serve a search page and JSON API over an index."""
        from vlkit.retrieval.index import RetrievalIndex
        from vlkit.retrieval.search import Searcher
        from vlkit.retrieval.server import Limits, serve as run_server

        validate.listen(host, port)
        validate.at_least("--max-k", max_k)
        validate.at_least("--max-query-chars", max_query_chars)
        validate.positive("--max-upload-mb", max_upload_mb)
        validate.positive("--max-image-mp", max_image_mp)
        try:
            import fastapi, multipart, uvicorn  # noqa: F401, E401
        except ImportError:
            raise VlkitError("vlkit serve: the 'serve' extra is not installed; `pip install 'vlkit[serve]'`") from None
        limits = Limits(max_query_chars=max_query_chars, max_k=max_k, max_upload_bytes=max(1, int(max_upload_mb * 1024 * 1024)),
                        max_pixels=max(1, int(max_image_mp * 1_000_000)))
        opened = RetrievalIndex(index)  # a missing or damaged index fails before the model loads
        run_server(Searcher(opened, _load_model(model or opened.model_spec)), host=host, port=port, limits=limits)

    @eval_app.command("retrieval")
    def eval_retrieval(
        data: Path = typer.Option(..., "--data", help="Caption table (.csv/.jsonl) with image and caption columns."),
        model: str = typer.Option(DEFAULT_MODEL, "--model"),
        caption_field: str = caption_field_opt,
        caption_template: Optional[str] = template_opt,
        image_field: str = image_field_opt,
        batch_size: int = typer.Option(64, "--batch-size"),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where the run folder is created."),
        rerank: str = typer.Option("none", "--rerank", help="'itm': BLIP's ITC + ITM re-ranking of the ITC top --rerank-k (reported beside ITC alone)."),
        rerank_k: int = typer.Option(128, "--rerank-k", help="With --rerank itm: candidates per query that ITM re-scores."),
    ) -> None:
        """Recall@1/5/10 (any true match), mean and median rank, text->image and image->text."""
        if rerank != "none":
            from vlkit.commands.blip import eval_retrieval_rerank

            eval_retrieval_rerank(data, model, rerank, rerank_k, caption_field, caption_template, image_field, batch_size, runs_dir)
            return
        from functools import partial

        from rich.console import Console
        from rich.table import Table

        from vlkit import runs
        from vlkit.retrieval.collection import read_source
        from vlkit.retrieval.evaluate import as_dict, evaluate_retrieval
        from vlkit.retrieval.index import embed_images_local

        validate.at_least("--batch-size", batch_size)
        validate.at_least("--rerank-k", rerank_k)
        validate.caption_template("--caption-template", caption_template)
        validate.out_folder("--runs-dir", runs_dir)
        source = read_source(data, image_field=image_field, caption_field=caption_field, caption_template=caption_template)
        if not any(it.captions for it in source.items):  # known from the table alone: say so before the model loads
            raise VlkitError(f"{data}: no captions found in column {caption_field!r}; pass --caption-field or --caption-template")
        vl = _load_model(model)
        result = evaluate_retrieval(vl, source, embedder=partial(embed_images_local, batch_size=batch_size))
        run = runs.new_run_dir(runs_dir, "eval-retrieval")
        settings = {"data": data.resolve(), "model": model, "caption_field": caption_field, "caption_template": caption_template, "image_field": image_field}
        runs.write_config(run, settings, model_fingerprint=vl.fingerprint())
        runs.write_metrics(run, as_dict(result))
        table = Table(title=f"retrieval on {data.name}: {result.images} images, {result.texts} captions")
        cols = [c for c in result.metrics["text_to_image"] if c != "queries"]
        table.add_column("direction")
        for c in cols:
            table.add_column(c)
        for direction, m in result.metrics.items():
            table.add_row(direction.replace("_", " "), *(f"{m[c]:.2f}" for c in cols))
        console = Console()
        console.print(table)
        if result.skipped:
            console.print(f"skipped {len(result.skipped)} unreadable images (listed in metrics.json)")
        console.print(f"run folder: {run}")

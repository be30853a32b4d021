"""`vlkit serve`: a small HTTP API and one web page over a retrieval index (the `serve` extra).

Endpoints:
    GET  /                   the search page (static HTML + JS, no external assets)
    GET  /api/info           model, counts and limits
    GET  /api/search?q=&k=&target=     text query
    POST /api/search/image   multipart upload `file`, form fields k, target
    GET  /files/{path}       an indexed image, by its path under the image root

Input is checked before any model work: query length, k range, target name, upload
size (read in bounded chunks, never whole) and type (decoded, not trusted from the
header). Files are served only when the resolved path lies under the index's image
root *and* is an indexed image, so `..`, encoded dots, absolute paths and symlinks
pointing out of the root all get 404.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations
# at runtime, and its types are imported inside `create_app` (the extra is optional).
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from vlkit.retrieval.search import Searcher

ALLOWED_UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class Limits:
    """What the server accepts; anything outside gets a 4xx with a one-line reason."""

    max_query_chars: int = 256
    max_k: int = 100
    max_upload_bytes: int = 5 * 1024 * 1024


def _page() -> str:
    return resources.files("vlkit.retrieval").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(searcher: "Searcher", limits: Limits = Limits()) -> "FastAPI":
    """The FastAPI app for one opened index."""
    try:
        from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
        from fastapi.responses import FileResponse, HTMLResponse
    except ImportError:
        raise VlkitError("vlkit serve: FastAPI is not installed; install the extra with `pip install 'vlkit[serve]'`") from None

    index = searcher.index
    root = index.image_root.resolve()
    served = {rec["path"] for rec in index.collection("images").items} if "images" in index.collections else set()
    app = FastAPI(title="vlkit search", docs_url=None, redoc_url=None, openapi_url=None)
    page = _page()

    def check(k: int, target: str) -> None:
        if not 1 <= k <= limits.max_k:
            raise HTTPException(422, f"k={k}: must be between 1 and {limits.max_k}")
        if target not in ("images", "captions"):
            raise HTTPException(422, f"target '{target}': use 'images' or 'captions'")
        if target not in index.collections:
            raise HTTPException(422, f"this index has no {target}")

    def respond(hits: list, query: dict[str, Any]) -> dict[str, Any]:
        out = []
        for h in hits:
            d = h.to_dict()
            path = d["metadata"].get("path")
            d["url"] = f"/files/{path}" if path else None
            out.append(d)
        return {"query": query, "results": out}

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "model": index.manifest["model"],
            "counts": index.counts(),
            "limits": {"max_query_chars": limits.max_query_chars, "max_k": limits.max_k, "max_upload_bytes": limits.max_upload_bytes},
        }

    @app.get("/api/search")
    def search_text(q: str = Query(...), k: int = 10, target: str = "images") -> dict[str, Any]:
        check(k, target)
        if not q.strip():
            raise HTTPException(422, "q: empty; type some words")
        if len(q) > limits.max_query_chars:
            raise HTTPException(413, f"q: {len(q)} characters; at most {limits.max_query_chars}")
        return respond(searcher.search_text(q, k, target), {"text": q, "k": k, "target": target})

    @app.post("/api/search/image")
    async def search_image(file: UploadFile = File(...), k: int = Form(10), target: str = Form("images")) -> dict[str, Any]:
        check(k, target)
        data = bytearray()
        while chunk := await file.read(64 * 1024):
            data.extend(chunk)
            if len(data) > limits.max_upload_bytes:
                raise HTTPException(413, f"upload: larger than {limits.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, "upload: empty file")
        fmt = _image_format(bytes(data))
        if fmt not in ALLOWED_UPLOAD_FORMATS:
            raise HTTPException(415, f"upload: not an image vlkit accepts ({', '.join(ALLOWED_UPLOAD_FORMATS)})")
        fd, tmp = tempfile.mkstemp(suffix=f".{fmt.lower()}")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                hits = searcher.search_image(tmp, k, target)
            except VlkitError as e:
                raise HTTPException(422, f"upload: {str(e).split(': ', 1)[-1]}") from None
        finally:
            os.unlink(tmp)
        return respond(hits, {"image": file.filename, "k": k, "target": target})

    @app.get("/files/{rel:path}")
    def files(rel: str) -> FileResponse:
        path = safe_path(root, rel)
        if path is None or path.relative_to(root).as_posix() not in served:
            raise HTTPException(404, "not an indexed image")
        return FileResponse(path)

    return app


def _image_format(data: bytes) -> str | None:
    """The decoded format of `data`, or None when PIL cannot identify it as an image."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            return im.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def safe_path(root: Path, rel: str) -> Path | None:
    """`root/rel` resolved (symlinks followed) if it is a file inside `root`, else None."""
    if not rel or "\x00" in rel or os.path.isabs(rel):
        return None
    try:
        path = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_file() or not path.is_relative_to(root):
        return None
    return path


def serve(searcher: "Searcher", host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits()) -> None:
    """Run the app with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise VlkitError("vlkit serve: uvicorn is not installed; install the extra with `pip install 'vlkit[serve]'`") from None
    uvicorn.run(create_app(searcher, limits), host=host, port=port, log_level="info")

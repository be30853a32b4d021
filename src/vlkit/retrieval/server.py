"""`vlkit serve`: a small HTTP API and one web page over a retrieval index (the `serve` extra).

Endpoints:
    GET  /                   the search page (static HTML + JS, no external assets)
    GET  /api/info           model, counts and limits
    GET  /api/search?q=&k=&target=     text query
    POST /api/search/image   multipart upload `file`, form fields k, target
    GET  /files/{path}       an indexed image, by its path under the image root

Input is checked before any model work: query length, k range, target name. An
upload is refused before it is read whole: a Content-Length over the limit gets 413
at once, and a body without one is counted as it arrives and cut off at the limit
(`_BodyLimit`). The image is then decoded by `vlkit.data.images.load_image`, the
same function every command uses, restricted to common raster formats and to
`Limits.max_pixels` (16 MP by default: far above the model's input size, and a
header read decides it, so a 78 KB PNG declaring 9000x9000 costs microseconds, not
seconds of inflating). Every bad upload is a 4xx with a JSON `detail`: 413 too
large (bytes or pixels), 415 not an accepted image, 422 empty, truncated or corrupt.
Decoding runs in worker threads outside the model lock, a few at a time.
Files are served only when the resolved path lies under the index's image
root *and* is an indexed image, so `..`, encoded dots, absolute paths and symlinks
pointing out of the root all get 404.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations
# at runtime, and its types are imported inside `create_app` (the extra is optional).
import json
import os
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from vlkit.retrieval.search import Searcher

ALLOWED_UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Room for the multipart envelope (boundaries, part headers, the k and target fields).
FORM_OVERHEAD_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """What the server accepts; anything outside gets a 4xx with a one-line reason.

    max_pixels: decoded pixels per uploaded query (width x height from the header,
    before decoding). A JPEG above it is decoded at 1/2, 1/4 or 1/8 scale when that
    fits; anything else above it is refused (413). max_decodes: uploads decoded at
    once; the rest wait, so a burst cannot hold many large images in memory.
    """

    max_query_chars: int = 256
    max_k: int = 100
    max_upload_bytes: int = 5 * 1024 * 1024
    max_pixels: int = 16_000_000
    max_decodes: int = 4

    def __post_init__(self) -> None:
        for name in ("max_query_chars", "max_k", "max_upload_bytes", "max_pixels", "max_decodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise VlkitError(f"server limit {name}={value!r}: must be a whole number of at least 1")

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _page() -> str:
    return resources.files("vlkit.retrieval").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(searcher: "Searcher", limits: Limits = Limits()) -> "FastAPI":
    """The FastAPI app for one opened index."""
    try:
        from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
        from fastapi.responses import FileResponse, HTMLResponse
    except ImportError:
        raise VlkitError("vlkit serve: FastAPI is not installed; install the extra with `pip install 'vlkit[serve]'`") from None
    from vlkit.data import images as img

    index = searcher.index
    root = index.image_root.resolve()
    served = {rec["path"] for rec in index.collection("images").items} if "images" in index.collections else set()
    app = FastAPI(title="vlkit search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=limits.max_upload_bytes + FORM_OVERHEAD_BYTES, file_limit=limits.max_upload_bytes)
    page = _page()
    decode_slots = threading.BoundedSemaphore(limits.max_decodes)
    status_for = {img.TOO_LARGE: 413, img.NOT_AN_IMAGE: 415, img.EMPTY: 422, img.CORRUPT: 422}

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
        return {"model": index.manifest["model"], "counts": index.counts(), "limits": limits.as_dict()}

    @app.get("/api/search")
    def search_text(q: str = Query(...), k: int = 10, target: str = "images") -> dict[str, Any]:
        check(k, target)
        if not q.strip():
            raise HTTPException(422, "q: empty; type some words")
        if len(q) > limits.max_query_chars:
            raise HTTPException(413, f"q: {len(q)} characters; at most {limits.max_query_chars}")
        return respond(searcher.search_text(q, k, target), {"text": q, "k": k, "target": target})

    @app.post("/api/search/image")
    def search_image(file: UploadFile = File(...), k: int = Form(10), target: str = Form("images")) -> dict[str, Any]:
        # a plain `def`: FastAPI runs it in a worker thread, so decoding never blocks the event loop
        check(k, target)
        data = bytearray()
        while chunk := file.file.read(READ_CHUNK):
            data.extend(chunk)
            if len(data) > limits.max_upload_bytes:
                raise HTTPException(413, f"upload: larger than {limits.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, "upload: empty file")
        with decode_slots:
            try:
                hits = searcher.search_image(bytes(data), k, target, max_pixels=limits.max_pixels, name="upload",
                                             formats=ALLOWED_UPLOAD_FORMATS)
            except img.BadImage as e:
                status = status_for.get(e.kind, 422)
                reason = e.reason
                if e.kind == img.TOO_LARGE:
                    reason = reason.split(" exceeds")[0] + f"; this server decodes at most {limits.max_pixels / 1e6:g} MP per query: downscale it"
                raise HTTPException(status, f"upload: {reason}") from None
        return respond(hits, {"image": file.filename, "k": k, "target": target})

    @app.get("/files/{rel:path}")
    def files(rel: str) -> FileResponse:
        path = safe_path(root, rel)
        if path is None or path.relative_to(root).as_posix() not in served:
            raise HTTPException(404, "not an indexed image")
        return FileResponse(path)

    return app


class _BodyLimit:
    """ASGI middleware: refuse a POST body over `limit` bytes without reading it whole.

    A Content-Length over the limit is answered 413 before a byte of the body is
    read; without one (chunked), the bytes are counted as they arrive and the read
    stops with 413 as soon as the count passes the limit. Starlette's form parser
    would otherwise spool the whole body to disk before the endpoint runs.
    """

    def __init__(self, app: Any, limit: int, file_limit: int) -> None:
        self.app, self.limit, self.file_limit = app, limit, file_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, "Content-Length: not a number")
                return
            if declared > self.limit:
                await _send_json(send, 413, f"upload: request of {declared} bytes; images up to {self.file_limit} bytes are accepted")
                return
        from starlette.exceptions import HTTPException

        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"upload: request body over {self.limit} bytes; images up to {self.file_limit} bytes are accepted")
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except HTTPException as e:  # raised where no handler turned it into a response
            if started or e.status_code != 413:
                raise
            await _send_json(send, 413, str(e.detail))


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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

"""One image-opening path: `vlkit search --image` and the server's uploads judge every file
as `load_image` does, and the server bounds pixels and bodies before doing the work."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from reliability_corpus import (
    bad_image_files,
    bomb_png,
    forbid_model_loading,
    header_only_png,
    png_bytes,
    run_cli,
    tiff_bytes,
    truncated_jpeg,
    write_bad_files,
)
from test_retrieval_fakes import ColorModel, make_caption_table

from vlkit.data import images as img


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("rel-img")
    table = make_caption_table(root / "data")
    res = run_cli(["index", "build", "--images", table, "--out", root / "index", "--model", tiny_clip_dir, "--no-progress"])
    assert res.code == 0, res.describe()
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return write_bad_files(tmp_path_factory.mktemp("rel-bad"))


def test_search_image_with_every_bad_file_is_one_error_line(clip_index, bad):
    for name, path in [*bad.items(), ("missing.png", clip_index / "missing.png")]:
        res = run_cli(["search", clip_index / "index", "--image", path])
        assert res.failed_cleanly(), f"{name}: {res.describe()}"
        assert str(path) in res.error_lines[0], name


def test_search_image_judges_the_file_before_loading_a_model(clip_index, bad, monkeypatch):
    forbid_model_loading(monkeypatch)
    header_level = ["empty.png", "text.png", "svg.png", "folder.png", "loop-a.png", "dangling.png", "bomb-30000.png", "fifo.png"]
    for name in header_level:
        if name in bad:
            res = run_cli(["search", clip_index / "index", "--image", bad[name]])
            assert res.failed_cleanly() and "model was loaded" not in res.err, f"{name}: {res.describe()}"
    reasons = {n: run_cli(["search", clip_index / "index", "--image", bad[n]]).error_lines[0] for n in ("loop-a.png", "dangling.png", "folder.png")}
    assert "symlink loop" in reasons["loop-a.png"] and "dangling symlink" in reasons["dangling.png"]
    assert "is a folder" in reasons["folder.png"]


def test_load_image_reads_bytes_with_the_same_verdicts_as_files(bad):
    for name, data in bad_image_files().items():
        with pytest.raises(img.BadImage) as from_bytes:
            img.load_image(data, name=name)
        with pytest.raises(img.BadImage) as from_file:
            img.load_image(bad[name])
        assert from_bytes.value.reason == from_file.value.reason and from_bytes.value.kind == from_file.value.kind, name
    assert img.load_image(png_bytes((5, 3)), name="ok").size == (5, 3)


# ---------------------------------------------------------------- the server

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vlkit.retrieval.collection import read_source
    from vlkit.retrieval.index import build_index
    from vlkit.retrieval.search import Searcher
    from vlkit.retrieval.server import Limits, create_app

    root = tmp_path_factory.mktemp("rel-serve")
    build_index(root / "index", ColorModel(), read_source(make_caption_table(root / "data")), progress=False)
    searcher = Searcher.open(root / "index", ColorModel())
    return create_app(searcher, Limits(max_upload_bytes=200_000, max_pixels=4_000_000))


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    return TestClient(served)


HOSTILE_UPLOADS = [
    ("truncated.jpg", truncated_jpeg(0.5), 422, "truncated"),
    ("12000.png", bomb_png(12000, 12000), 413, "12000x12000"),
    ("30000.png", header_only_png(30000, 30000), 413, "30000x30000"),
    ("9000.png", bomb_png(9000, 9000), 413, "9000x9000"),
    ("svg.png", bad_image_files()["svg.png"], 415, "SVG"),
    ("text.png", b"hello", 415, "not an image"),
    ("scan.tif", tiff_bytes(), 415, "accepted formats"),
    ("cut.png", bad_image_files()["cut-idat.png"], 422, "cannot decode"),
    ("sig.png", b"\x89PNG\r\n\x1a\n", 422, "corrupt PNG"),
]


@pytest.mark.parametrize("name, data, status, words", HOSTILE_UPLOADS, ids=[h[0] for h in HOSTILE_UPLOADS])
def test_every_bad_upload_is_a_4xx_with_a_json_reason(client, name, data, status, words):
    r = client.post("/api/search/image", files={"file": (name, data, "image/png")})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_pixels_are_capped_from_the_header_without_decoding(client, monkeypatch):
    """A 10 KB PNG declaring 9000x9000 (81 MP, under the library's 100 MP guard) must not be inflated."""
    from PIL import ImageFile

    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real(self))
    data = bomb_png(9000, 9000)
    assert len(data) < 20_000
    r = client.post("/api/search/image", files={"file": ("big.png", data, "image/png")})
    assert r.status_code == 413 and "at most 4 MP" in r.json()["detail"]
    assert loads == []  # refused from the header: no pixel was decoded
    r = client.post("/api/search/image", files={"file": ("ok.png", png_bytes((40, 40), (0, 0, 255)), "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "img/blue.png" and loads


def _part_head(boundary: str = "vlkitboundary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()


def _multipart(payload: bytes, boundary: str = "vlkitboundary") -> bytes:
    return _part_head(boundary) + payload + f"\r\n--{boundary}--\r\n".encode()


def _asgi_post(app, chunks, headers) -> tuple[int, dict, int]:
    """POST /api/search/image straight through ASGI; returns status, JSON body and the body bytes the app read."""
    consumed = [0]
    it = iter(chunks)
    sent: list[dict] = []

    async def receive():
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/search/image", "raw_path": b"/api/search/image", "query_string": b"", "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), consumed[0]


def test_oversize_body_with_content_length_is_refused_before_a_byte_is_read(served):
    body = _multipart(b"\x00" * 20_000_000)
    headers = [("content-type", "multipart/form-data; boundary=vlkitboundary"), ("content-length", str(len(body)))]
    status, detail, consumed = _asgi_post(served, (body[i : i + 65536] for i in range(0, len(body), 65536)), headers)
    assert status == 413 and "200000 bytes" in detail["detail"]
    assert consumed == 0


def test_oversize_chunked_body_is_cut_off_at_the_limit(served):
    chunk = b"\x00" * 65536
    chunks = itertools.chain([_part_head()], itertools.repeat(chunk, 300))  # ~20 MB, no Content-Length
    headers = [("content-type", "multipart/form-data; boundary=vlkitboundary"), ("transfer-encoding", "chunked")]
    status, detail, consumed = _asgi_post(served, chunks, headers)
    assert status == 413 and "over" in detail["detail"]
    from vlkit.retrieval.server import FORM_OVERHEAD_BYTES

    assert consumed <= 200_000 + FORM_OVERHEAD_BYTES + 2 * len(chunk)  # read stopped at the limit, not at 20 MB


def test_bombs_under_concurrency_never_turn_requests_into_500s(served):
    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(served, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        good = png_bytes((30, 30), (255, 0, 0))
        jobs = [("good", good), ("bomb", header_only_png(30000, 30000)), ("big", bomb_png(12000, 12000)),
                ("cut", truncated_jpeg(0.4))] * 6

        def post(job):
            kind, data = job
            with httpx.Client(timeout=60) as c:
                return kind, c.post(f"{url}/api/search/image", files={"file": ("q.png", data, "image/png")}).status_code

        def text(_):
            with httpx.Client(timeout=60) as c:
                return "text", c.get(f"{url}/api/search", params={"q": "red", "k": 2}).status_code

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, jobs)) + list(pool.map(text, range(8)))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    statuses = {kind: {code for k, code in results if k == kind} for kind in ("good", "bomb", "big", "cut", "text")}
    assert statuses == {"good": {200}, "bomb": {413}, "big": {413}, "cut": {422}, "text": {200}}

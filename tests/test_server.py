"""`vlkit serve`: input validation, path-traversal refusal, and the page in headless Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
from PIL import Image
from test_retrieval_fakes import ColorModel, make_caption_table

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from vlkit.retrieval.collection import read_source  # noqa: E402
from vlkit.retrieval.index import build_index  # noqa: E402
from vlkit.retrieval.search import Searcher  # noqa: E402
from vlkit.retrieval.server import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    table = make_caption_table(root / "data")
    (root / "secret.txt").write_text("outside the image root")
    (root / "data" / "img" / "escape.png").symlink_to(root / "secret.txt")
    build_index(root / "index", ColorModel(), read_source(table), progress=False)
    searcher = Searcher.open(root / "index", ColorModel())
    app = create_app(searcher, Limits(max_query_chars=40, max_k=20, max_upload_bytes=2000))
    return root, app


@pytest.fixture(scope="module")
def client(served):
    return TestClient(served[1])


def _png(color=(0, 0, 255), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_text_search_api(client):
    r = client.get("/api/search", params={"q": "yellow", "k": 3})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["rank"] for x in results] == [1, 2, 3]
    assert results[0]["id"] == "img/yellow.png" and results[0]["url"] == "/files/img/yellow.png"
    r = client.get("/api/search", params={"q": "green", "k": 2, "target": "captions"})
    assert r.json()["results"][0]["metadata"]["image_id"] == "img/green.png"


def test_image_upload_search(client):
    r = client.post("/api/search/image", files={"file": ("q.png", _png(), "image/png")}, data={"k": "2"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == "img/blue.png"


@pytest.mark.parametrize(
    "params, status, message",
    [
        ({"q": "red", "k": 0}, 422, "k=0: must be between 1 and 20"),
        ({"q": "red", "k": 21}, 422, "k=21: must be between 1 and 20"),
        ({"q": "red", "target": "videos"}, 422, "target 'videos'"),
        ({"q": "   "}, 422, "q: empty"),
        ({"q": "x" * 41}, 413, "q: 41 characters; at most 40"),
    ],
)
def test_text_query_validation(client, params, status, message):
    r = client.get("/api/search", params=params)
    assert r.status_code == status and message in r.json()["detail"]


def test_upload_validation(client):
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    big = buf.getvalue()  # a real PNG over the 2000-byte limit
    assert len(big) > 2000
    r = client.post("/api/search/image", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "larger than 2000 bytes" in r.json()["detail"]
    r = client.post("/api/search/image", files={"file": ("fake.png", b"#!/bin/sh\necho not an image\n", "image/png")})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = client.post("/api/search/image", files={"file": ("e.png", b"", "image/png")})
    assert r.status_code == 422
    r = client.post("/api/search/image", files={"file": ("q.png", _png(), "image/png")}, data={"k": "500"})
    assert r.status_code == 422 and "k=500" in r.json()["detail"]


def test_upload_is_read_in_chunks_and_reading_stops_at_the_limit(client, monkeypatch):
    """40 KB passes the middleware's bound (limit + form overhead) and reaches the endpoint,
    which must read it a chunk at a time and stop once past the 2000-byte limit: a spy on
    the spooled upload's `read` sees no unbounded read and about 2000 bytes, not 40 KB."""
    import tempfile

    from vlkit.retrieval import server

    monkeypatch.setattr(server, "READ_CHUNK", 256)
    reads: list[tuple[tuple, int]] = []
    real = tempfile.SpooledTemporaryFile.read

    def spy(self, *args):
        data = real(self, *args)
        reads.append((args, len(data)))
        return data

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "read", spy)
    r = client.post("/api/search/image", files={"file": ("big.png", os.urandom(40_000), "image/png")})
    assert r.status_code == 413 and "larger than 2000 bytes" in r.json()["detail"]
    assert reads and all(args and 0 < args[0] <= 256 for args, _ in reads), reads
    assert 2000 < sum(n for _, n in reads) <= 2000 + 256


def test_files_are_served_only_from_the_image_root(client, served):
    root, _ = served
    ok = client.get("/files/img/red.png")
    assert ok.status_code == 200 and ok.content == (root / "data" / "img" / "red.png").read_bytes()
    attempts = [
        "/files/../secret.txt",
        "/files/img/../../secret.txt",
        "/files/%2e%2e/secret.txt",
        "/files/img/%2e%2e/%2e%2e/secret.txt",
        "/files/..%2fsecret.txt",
        "/files/%2Fetc%2Fpasswd",
        "/files//etc/passwd",
        "/files/img/escape.png",  # a symlink inside the root that points outside it
        "/files/captions.jsonl",  # inside the root but not an indexed image
        "/files/img/nope.png",
    ]
    for url in attempts:
        r = client.get(url)
        assert r.status_code == 404, url
        assert b"outside the image root" not in r.content, url


def test_safe_path_itself_refuses_escapes(served):
    from vlkit.retrieval.server import safe_path

    root, _ = served
    img_root = (root / "data").resolve()
    assert safe_path(img_root, "img/red.png") == img_root / "img" / "red.png"
    for rel in ["../secret.txt", "img/../../secret.txt", str(root / "secret.txt"), "img/escape.png", "img/red.png\x00", "", "img"]:
        assert safe_path(img_root, rel) is None, rel


def test_page_has_search_box_upload_and_grid(client):
    html = client.get("/").text
    assert 'id="q"' in html and 'type="file"' in html and 'id="results"' in html
    info = client.get("/api/info").json()
    assert info["counts"] == {"images": 6, "captions": 12} and info["limits"]["max_k"] == 20


# ---------------------------------------------------------------- headless browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed; the test set-up installs it with `apt-get install -y chromium`")
def test_browser_text_query_shows_expected_image(served, tmp_path):
    import uvicorn

    _, app = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        cmd = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"http://127.0.0.1:{port}/?q=magenta",  # the page fills the box and submits its form
        ]
        env = {**os.environ, "HOME": str(tmp_path)}
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env).stdout
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    cards = re.findall(r'<figure class="result" data-id="([^"]+)"', dom)
    assert cards, f"no results rendered; page was:\n{dom[-2000:]}"
    assert cards[0] == "img/magenta.png" and len(cards) == 6  # k=10 on a 6-image index
    assert '<img src="/files/img/magenta.png"' in dom
    assert re.search(r'id="status"[^>]*>\d+ results<', dom)

"""The retrieval commands end to end on a real (tiny, random) HF CLIP checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_retrieval_fakes import make_caption_table
from typer.testing import CliRunner

from vlkit.errors import VlkitError


@pytest.fixture(scope="module")
def cli():
    from vlkit.cli import _register, app

    if "index" not in [g.name for g in app.registered_groups]:
        _register()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)

    return invoke


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_dir, cli):
    root = tmp_path_factory.mktemp("cli")
    table = make_caption_table(root / "data")
    out = root / "index"
    res = cli("index", "build", "--images", table, "--out", out, "--model", tiny_clip_dir, "--no-progress", "--chunk-size", "4")
    assert res.exit_code == 0, res.output
    return root, table, out


def test_build_reports_counts_and_index_type(built):
    _, _, out = built
    man = json.loads((out / "index.json").read_text())
    assert man["collections"]["images"]["count"] == 6 and man["collections"]["captions"]["count"] == 12
    assert man["collections"]["images"]["faiss"]["factory"] == "Flat"
    assert len(list((out / "shards").glob("*.json"))) == 2  # chunk size 4: 4 + 2 images


def test_search_json_image_query_finds_itself(built, cli):
    root, _, out = built
    res = cli("search", out, "--image", root / "data" / "img" / "green.png", "-k", "3", "--json")
    assert res.exit_code == 0, res.output
    body = json.loads(res.output)
    assert [r["rank"] for r in body["results"]] == [1, 2, 3]
    assert body["results"][0]["id"] == "img/green.png" and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_text_table_and_captions(built, cli):
    _, _, out = built
    res = cli("search", out, "--text", "a red square", "--target", "captions", "-k", "2")
    assert res.exit_code == 0, res.output
    assert "rank" in res.output and "#" in res.output  # caption ids look like img/x.png#0
    res = cli("search", out)
    assert isinstance(res.exception, VlkitError) and "exactly one of --text or --image" in str(res.exception)


def test_search_matches_python_api(built, tiny_clip_model, cli):
    from vlkit.retrieval.search import Searcher

    _, _, out = built
    res = cli("search", out, "--text", "a cat", "-k", "6", "--json")
    api = Searcher.open(out, tiny_clip_model).search_text("a cat", k=6)
    cli_hits = json.loads(res.output)["results"]
    assert [h["id"] for h in cli_hits] == [h.id for h in api]
    np.testing.assert_allclose([h["score"] for h in cli_hits], [h.score for h in api], atol=1e-6)


def _ranks_by_sorting(scores: np.ndarray, truth: list[set[int]]) -> np.ndarray:
    """1-based position of each query's best-placed true candidate in its descending score order."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array([1 + next(pos for pos, c in enumerate(row) if c in true) for row, true in zip(order, truth)])


def test_eval_retrieval_writes_run_folder(built, tiny_clip_dir, tiny_clip_model, cli, tmp_path):
    from PIL import Image

    _, table, _ = built
    res = cli("eval", "retrieval", "--data", table, "--model", tiny_clip_dir, "--runs-dir", tmp_path)
    assert res.exit_code == 0, res.output
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert metrics["images"] == 6 and metrics["texts"] == 12
    # the same numbers from the model's own features, ranked by sorting
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    images = sorted({r["image"] for r in rows})
    captions = [r["caption"] for r in rows]
    m = tiny_clip_model
    with torch.no_grad():
        img = m.encode_image(torch.stack([m.preprocess(Image.open(table.parent / p)) for p in images])).numpy()
    txt = m.embed_texts(captions).numpy()
    sim = txt @ img.T
    truth_t2i = [{images.index(r["image"])} for r in rows]
    truth_i2t = [{t for t, r in enumerate(rows) if r["image"] == p} for p in images]
    for direction, ranks in (("text_to_image", _ranks_by_sorting(sim, truth_t2i)), ("image_to_text", _ranks_by_sorting(sim.T, truth_i2t))):
        expected = {f"R@{k}": 100.0 * float((ranks <= k).mean()) for k in (1, 5, 10)}
        expected |= {"mean_rank": float(ranks.mean()), "median_rank": float(np.median(ranks)), "queries": len(ranks)}
        assert metrics[direction] == pytest.approx(expected), direction
    assert config["model_fingerprint"] and "R@1" in res.output


def test_index_add_refuses_other_model(built, tiny_dual_dir, cli):
    root, table, out = built
    res = cli("index", "add", out, "--images", table, "--model", tiny_dual_dir, "--no-progress")
    assert isinstance(res.exception, VlkitError) and "built with model" in str(res.exception)
    res = cli("index", "add", out, "--images", table, "--no-progress")  # default: the index's own model
    assert res.exit_code == 0, res.output
    assert "0 images and 0 captions; 6 already in the index" in res.output


def test_serve_binds_localhost_by_default(built, cli, monkeypatch):
    import vlkit.retrieval.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda searcher, host, port, limits: seen.update(host=host, port=port, limits=limits))
    _, _, out = built
    res = cli("serve", out, "--max-k", "7")
    assert res.exit_code == 0, res.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["limits"].max_k == 7

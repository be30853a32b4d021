"""Retrieval: metrics, index type choice, build/add/resume, model refusal, every search direction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_retrieval_fakes import COLORS, ColorModel, make_caption_table, make_squares

from vlkit.errors import VlkitError
from vlkit.retrieval.collection import read_source
from vlkit.retrieval.evaluate import evaluate_retrieval
from vlkit.retrieval.index import (
    RetrievalIndex,
    add_images,
    build_faiss,
    build_index,
    choose_index_spec,
    embed_images_local,
    load_embeddings,
    read_manifest,
)
from vlkit.retrieval.metrics import ranks_from_scores, retrieval_metrics, summarize_ranks
from vlkit.retrieval.search import Searcher

# ---------------------------------------------------------------- metrics


def test_ranks_any_true_match_and_pessimistic_ties():
    scores = np.array(
        [
            [0.9, 0.8, 0.1, 0.0],  # true {1}: one wrong candidate above -> rank 2
            [0.1, 0.2, 0.7, 0.9],  # true {0, 2}: best true is 2 (0.7), one wrong above -> rank 2
            [0.5, 0.5, 0.5, 0.5],  # true {3}: all tied -> worst rank 4, not a lucky 1
            [0.0, 0.0, 0.0, 1.0],  # true {3}: rank 1
        ]
    )
    ranks = ranks_from_scores(scores, [[1], [0, 2], [3], [3]])
    assert ranks.tolist() == [2, 2, 4, 1]
    s = summarize_ranks(ranks, ks=(1, 2))
    assert s["R@1"] == 25.0 and s["R@2"] == 75.0
    assert s["mean_rank"] == 2.25 and s["median_rank"] == 2.0 and s["queries"] == 4


def test_retrieval_metrics_both_directions():
    # 3 images, 4 texts: texts 0,1 describe image 0; text 2 image 1; text 3 image 2.
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0.9, 0.1]], dtype=np.float32)
    m = retrieval_metrics(img, txt, [[0], [0], [1], [2]], ks=(1, 5))
    # t->i: text1 scores image 0 at 0, tied with image 1 and below image 2 -> rank 3 (ties
    # count against); text3 ranks image 1 above its image 2 -> rank 2; ranks 1, 3, 1, 2
    assert m["text_to_image"]["R@1"] == 50.0 and m["text_to_image"]["mean_rank"] == 1.75
    # i->t: image 0 finds text 0 (any match); image 1: text 2 (1.0) first -> rank 1;
    # image 2: text 1 (1.0) above text 3 (0.1) -> rank 2
    assert m["image_to_text"]["R@1"] == pytest.approx(200 / 3)
    assert m["image_to_text"]["median_rank"] == 1.0


# ---------------------------------------------------------------- index type choice


def test_index_type_follows_size():
    assert choose_index_spec(99_999, 256)["type"] == "flat"
    big = choose_index_spec(1_000_000, 256)
    assert big["type"] == "ivfpq"
    assert big["nlist"] == 1024 and big["pq_m"] == 64 and big["pq_bits"] == 8 and big["nprobe"] == 32 and big["k_factor"] == 16
    assert big["factory"] == "IVF1024,PQ64x8,RFlat" and big["train_size"] == 65536
    assert choose_index_spec(10, 256, "hnsw")["factory"] == "HNSW32,Flat"
    assert choose_index_spec(500_000, 256, "flat")["type"] == "flat"
    with pytest.raises(VlkitError, match="index type 'annoy': unknown"):
        choose_index_spec(10, 8, "annoy")


def test_approximate_index_recall_against_exact():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 16))
    x = centers[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[:200] + 0.05 * rng.normal(size=(200, 16)).astype(np.float32)
    spec = choose_index_spec(len(x), 16, "ivfpq")
    import faiss

    approx = build_faiss(x, spec)
    assert isinstance(approx, faiss.IndexRefine) and faiss.extract_index_ivf(approx).nprobe == spec["nprobe"]
    _, got = approx.search(q, 10)
    _, want = build_faiss(x, choose_index_spec(len(x), 16)).search(q, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall > 0.9


# ---------------------------------------------------------------- build, search, add, resume


@pytest.fixture()
def color_index(tmp_path) -> Path:
    table = make_caption_table(tmp_path / "data")
    out = tmp_path / "index"
    build_index(out, ColorModel(), read_source(table), progress=False)
    return out


def test_build_records_model_metadata_and_captions(color_index):
    man = read_manifest(color_index)
    assert man["complete"] and man["model"]["fingerprint"] == ColorModel().fingerprint() and man["model"]["embed_dim"] == 8
    assert man["collections"]["images"]["count"] == 6 and man["collections"]["captions"]["count"] == 12
    assert man["collections"]["images"]["faiss"]["type"] == "flat"
    idx = RetrievalIndex(color_index)
    rec = idx.images_by_id["img/red.png"]
    assert rec["meta"]["label"] == "red" and idx.captions_by_image["img/red.png"] == ["a red square", "red"]
    assert Path(man["image_root"]) == (color_index.parent / "data").resolve()


@pytest.mark.parametrize(
    "query, target, expected",
    [
        (("text", "red"), "images", "img/red.png"),  # text -> image
        (("text", "a yellow square"), "images", "img/yellow.png"),
        (("image", "cyan"), "images", "img/cyan.png"),  # image -> image
        (("image", "blue"), "captions", "blue"),  # image -> text (caption text)
        (("text", "magenta"), "captions", "magenta"),  # text -> text
    ],
)
def test_every_direction_finds_the_right_item(color_index, tmp_path, query, target, expected):
    searcher = Searcher.open(color_index, ColorModel())
    kind, value = query
    if kind == "text":
        hits = searcher.search_text(value, k=3, target=target)
    else:
        (probe,) = make_squares(tmp_path / "probe", [value], size=20)  # a different file of the same colour
        hits = searcher.search_image(probe, k=3, target=target)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
    top = hits[0]
    if target == "images":
        assert top.id == expected and top.kind == "image" and top.metadata["label"] == expected.split("/")[1][:-4]
    else:
        assert top.kind == "caption" and expected in top.metadata["text"]
        assert top.metadata["image_id"] == f"img/{expected}.png"
    assert top.score == pytest.approx(1.0, abs=1e-3)


def test_k_larger_than_collection_and_missing_captions(tmp_path):
    make_squares(tmp_path / "imgs")
    build_index(tmp_path / "ix", ColorModel(), read_source(tmp_path / "imgs"), progress=False)
    s = Searcher.open(tmp_path / "ix", ColorModel())
    assert len(s.search_text("green", k=50)) == 6
    with pytest.raises(VlkitError, match="has no indexed captions"):
        s.search_text("green", target="captions")
    with pytest.raises(VlkitError, match="query text: empty"):
        s.search_text("   ")


def test_add_appends_and_skips_known_images(tmp_path):
    folder = tmp_path / "imgs"
    make_squares(folder, ["red", "green"])
    out = tmp_path / "ix"
    build_index(out, ColorModel(), read_source(folder), progress=False)
    make_squares(folder, ["blue", "yellow"])
    report = add_images(out, ColorModel(), read_source(folder), progress=False)
    assert report.embedded == 2 and report.already_done == 2
    idx = RetrievalIndex(out)
    assert [r["id"] for r in idx.collections["images"].items] == ["green.png", "red.png", "blue.png", "yellow.png"]
    assert Searcher(idx, ColorModel()).search_text("blue", k=1)[0].id == "blue.png"
    with pytest.raises(VlkitError, match="an index already exists there; add to it with `vlkit index add"):
        build_index(out, ColorModel(), read_source(folder), progress=False)


def test_growing_past_the_exact_limit_switches_to_ivfpq(tmp_path):
    folder = tmp_path / "imgs"
    make_squares(folder, ["red", "green", "blue"])
    out = tmp_path / "ix"
    build_index(out, ColorModel(), read_source(folder), exact_max=5, progress=False)
    assert read_manifest(out)["collections"]["images"]["faiss"]["type"] == "flat"
    make_squares(folder, ["cyan", "magenta", "yellow"])
    add_images(out, ColorModel(), read_source(folder), progress=False)
    spec = read_manifest(out)["collections"]["images"]["faiss"]
    assert spec["type"] == "ivfpq" and spec["factory"] == f"IVF{spec['nlist']},PQ{spec['pq_m']}x{spec['pq_bits']},RFlat"
    import faiss

    idx = RetrievalIndex(out)
    assert isinstance(idx.collections["images"].index, faiss.IndexRefine) and idx.collections["images"].index.ntotal == 6
    assert Searcher(idx, ColorModel()).search_text("cyan", k=1)[0].id == "cyan.png"  # exact re-ranking of the candidates


def test_approximate_index_is_extended_not_retrained(tmp_path):
    folder = tmp_path / "imgs"
    make_squares(folder, ["red", "green", "blue"])
    out = tmp_path / "ix"
    build_index(out, ColorModel(), read_source(folder), index_type="hnsw", progress=False)
    make_squares(folder, ["cyan", "magenta"])
    add_images(out, ColorModel(), read_source(folder), progress=False)
    idx = RetrievalIndex(out)
    assert idx.manifest["collections"]["images"]["faiss"]["type"] == "hnsw" and idx.collections["images"].index.ntotal == 5
    assert Searcher(idx, ColorModel()).search_text("magenta", k=1)[0].id == "magenta.png"


def test_bad_images_are_skipped_listed_and_not_retried(tmp_path):
    folder = tmp_path / "imgs"
    make_squares(folder, ["red", "green"])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    out = tmp_path / "ix"
    report = build_index(out, ColorModel(), read_source(folder), progress=False)
    assert sorted(p for p, _ in report.skipped) == ["empty.png", "text.jpg"]
    listed = dict(json.loads((out / "skipped.json").read_text()))
    assert set(listed) == {"empty.png", "text.jpg"} and "empty" in listed["empty.png"]
    assert read_manifest(out)["skipped"] == 2 and read_manifest(out)["collections"]["images"]["count"] == 2
    again = add_images(out, ColorModel(), read_source(folder), progress=False)
    assert again.embedded == 0 and again.already_done == 4


def test_interrupted_build_resumes_where_it_stopped(tmp_path):
    folder = tmp_path / "imgs"
    make_squares(folder)
    calls: list[list[str]] = []

    def crashing(model, paths):
        calls.append(paths)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third chunk
        return embed_images_local(model, paths)

    out = tmp_path / "ix"
    with pytest.raises(KeyboardInterrupt):
        build_index(out, ColorModel(), read_source(folder), chunk_size=2, embedder=crashing, progress=False)
    assert not read_manifest(out)["complete"]
    with pytest.raises(VlkitError, match="build was interrupted; rerun the same"):
        RetrievalIndex(out)
    calls.clear()
    report = build_index(out, ColorModel(), read_source(folder), chunk_size=2, embedder=crashing, progress=False)
    assert report.already_done == 4 and report.embedded == 2 and len(calls) == 1  # only the last chunk
    fresh = tmp_path / "fresh"
    build_index(fresh, ColorModel(), read_source(folder), progress=False)
    a, b = RetrievalIndex(out), RetrievalIndex(fresh)
    assert [r["id"] for r in a.collections["images"].items] == [r["id"] for r in b.collections["images"].items]
    np.testing.assert_array_equal(load_embeddings(out, "images", 8), load_embeddings(fresh, "images", 8))


def test_refuses_to_mix_models(color_index, tmp_path):
    other = ColorModel(variant="b")
    make_squares(tmp_path / "data" / "img" / "more", ["red"])
    with pytest.raises(VlkitError, match=r"built with model 'color-test-a' \(fingerprint [0-9a-f]+\), not 'color-test-b'"):
        add_images(color_index, other, read_source(tmp_path / "data" / "img" / "more"), progress=False)
    with pytest.raises(VlkitError, match="use --model color-test-a"):
        Searcher.open(color_index, other)
    assert read_manifest(color_index)["collections"]["images"]["count"] == 6


def test_image_outside_root_is_refused(color_index, tmp_path):
    make_squares(tmp_path / "elsewhere", ["red"])
    with pytest.raises(VlkitError, match="none of its 1 images can be indexed .*outside the image root"):
        add_images(color_index, ColorModel(), read_source(tmp_path / "elsewhere"), progress=False)
    assert read_manifest(color_index)["complete"]  # refused before anything was written
    assert Searcher.open(color_index, ColorModel()).search_text("red", k=1)[0].id == "img/red.png"


def test_source_errors_name_the_input(tmp_path):
    with pytest.raises(VlkitError, match="does not exist"):
        read_source(tmp_path / "nope")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"image": "a.png"}\n{oops\n')
    with pytest.raises(VlkitError, match=r"t.jsonl:2: not valid JSON"):
        read_source(bad)
    bad.write_text('{"path": "a.png"}\n')
    with pytest.raises(VlkitError, match="no 'image' column"):
        read_source(bad)
    bad.write_text('{"image": "a.png", "label": "x"}\n')
    with pytest.raises(VlkitError, match="names field 'name'"):
        read_source(bad, caption_template="an emoji of {name}")


# ---------------------------------------------------------------- evaluation


def test_evaluate_retrieval_on_caption_table(tmp_path):
    table = make_caption_table(tmp_path / "data")
    result = evaluate_retrieval(ColorModel(), read_source(table))
    assert result.images == 6 and result.texts == 12 and result.without_caption == 0
    # the colour model is exact: every caption finds its square first and vice versa
    for direction in ("text_to_image", "image_to_text"):
        assert result.metrics[direction]["R@1"] == 100.0 and result.metrics[direction]["mean_rank"] == 1.0


def test_evaluate_scores_wrong_captions_as_misses(tmp_path):
    table = make_caption_table(tmp_path / "data")
    names = list(COLORS)
    wrong = {n: names[(i + 1) % len(names)] for i, n in enumerate(names)}  # each square captioned with the next colour
    rows = [{"image": f"img/{n}.png", "caption": f"a {wrong[n]} square"} for n in names]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_retrieval(ColorModel(), read_source(table))
    assert result.metrics["text_to_image"]["R@1"] == 0.0 and result.metrics["image_to_text"]["R@1"] == 0.0
    assert result.metrics["text_to_image"]["mean_rank"] > 1.0

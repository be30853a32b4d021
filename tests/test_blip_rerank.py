"""ITM re-ranking: BLIP's score (ITM logit[:, 1] + ITC cosine on the ITC top k) on a tiny random BlipModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_tiny import pixels, tiny_blip_model
from vlkit.blip.rerank import (
    check_rerank,
    itm_match_logits,
    rerank_image_to_text,
    rerank_scores,
    rerank_text_to_image,
)
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError

TEXTS = ["a dog on the beach", "two cats", "a red heart", "a big yellow sun in the sky", "flag", "a car"]


def full_itm(blip, texts, embeds) -> torch.Tensor:
    """[T, I] match logit of every pair, one pair at a time (the reference the re-ranker must agree with)."""
    out = torch.empty(texts.input_ids.shape[0], embeds.shape[0])
    with torch.no_grad():
        for t in range(out.shape[0]):
            for i in range(out.shape[1]):
                out[t, i] = blip.itm_logits(embeds[i : i + 1], texts.input_ids[t : t + 1], texts.attention_mask[t : t + 1])[0, 1]
    return out


@pytest.fixture(scope="module")
def setup():
    """A tiny random BlipModel whose ITM logits differ between images by about as much as its ITC cosines do."""
    blip = tiny_blip_model(seed=0)
    with torch.no_grad():  # a spread-out ITM head, so re-ranking visibly reorders
        blip.itm_head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    texts = BlipTokenizer.from_minilm()(TEXTS)
    with torch.no_grad():
        embeds = blip.image_embeds(pixels(5, seed=3))
        itc = blip.text_feat(texts.input_ids, texts.attention_mask) @ blip.image_feat(embeds).T  # [T, I]
    return blip, texts, embeds, itc, full_itm(blip, texts, embeds)


def expected_order(itc_row: torch.Tensor, itm_row: torch.Tensor, k: int) -> list[int]:
    """BLIP's ranking: the ITC top k sorted by itm + cos, then the others in ITC order."""
    top = sorted(range(len(itc_row)), key=lambda j: -float(itc_row[j]))[:k]
    rest = [j for j in sorted(range(len(itc_row)), key=lambda j: -float(itc_row[j])) if j not in top]
    return sorted(top, key=lambda j: -float(itm_row[j] + itc_row[j])) + rest


@pytest.mark.parametrize("k", [1, 3, 5])
def test_text_to_image_follows_blips_formula(setup, k):
    blip, texts, embeds, itc, itm = setup
    scores = rerank_text_to_image(blip, itc, embeds, texts, k=k, batch_size=2)
    for t in range(itc.shape[0]):
        order = torch.argsort(scores[t], descending=True, stable=True).tolist()
        assert order == expected_order(itc[t], itm[t], k)
        top = torch.sort(itc[t], descending=True, stable=True).indices[:k]
        torch.testing.assert_close(scores[t, top], itm[t, top] + itc[t, top], atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [2, 6])
def test_image_to_text_follows_blips_formula(setup, k):
    blip, texts, embeds, itc, itm = setup
    itm = itm.T  # [I, T]
    scores = rerank_image_to_text(blip, itc.T.contiguous(), embeds, texts, k=k, batch_size=4)
    for i in range(itc.shape[1]):
        order = torch.argsort(scores[i], descending=True, stable=True).tolist()
        assert order == expected_order(itc[:, i], itm[i], k)
        top = torch.sort(itc[:, i], descending=True, stable=True).indices[:k]
        torch.testing.assert_close(scores[i, top], itm[i, top] + itc[top, i], atol=1e-5, rtol=0)


def test_rerank_changes_the_itc_order(setup):
    """The tiny model's ITM head disagrees with its ITC order: the formula tests above are not vacuous."""
    blip, texts, embeds, itc, _ = setup
    scores = rerank_text_to_image(blip, itc, embeds, texts, k=5)
    assert all(
        torch.argsort(scores[t], descending=True).tolist() != torch.argsort(itc[t], descending=True).tolist() for t in range(itc.shape[0])
    )


def test_itm_logits_batched_equal_one_by_one(setup):
    blip, texts, embeds, _, itm = setup
    ids, mask = texts.input_ids[:5], texts.attention_mask[:5]
    torch.testing.assert_close(itm_match_logits(blip, embeds, ids, mask, batch_size=2), itm.diagonal(), atol=1e-5, rtol=0)


def test_perfect_itm_recovers_the_right_ranking():
    # 4 queries x 8 candidates; query q's true candidate is q, placed at ITC rank 1..4 (inside k=5)
    # or rank 7 (outside it). A perfect ITM head (large logit for the true pair only) lifts a true
    # candidate inside the top k to rank 1 and cannot reach one outside it.
    gen = torch.Generator().manual_seed(0)
    itc = torch.rand(4, 8, generator=gen) * 0.5
    for q, itc_rank in enumerate([1, 3, 5, 7]):
        others = sorted((j for j in range(8) if j != q), key=lambda j: -float(itc[q, j]))
        itc[q, q] = (itc[q, others[itc_rank - 2]] + itc[q, others[itc_rank - 1]]) / 2 if 1 < itc_rank < 8 else 0.9
    ranks = lambda s: [int((s[q] > s[q, q]).sum()) + 1 for q in range(4)]  # noqa: E731
    assert ranks(itc) == [1, 3, 5, 7]

    def perfect(q: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        return torch.where(cands == q, 10.0, -10.0)

    assert ranks(rerank_scores(itc, 5, perfect)) == [1, 1, 1, 7]
    assert ranks(rerank_scores(itc, 8, perfect)) == [1, 1, 1, 1]


def test_itm_scores_several_queries_per_call_and_equals_one_query_at_a_time():
    itc = torch.rand(7, 9, generator=torch.Generator().manual_seed(3))
    calls: list[int] = []

    def itm(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(len(q))
        return (q * 10 + c).float().sin()  # a pair's own score, whatever batch it comes in

    batched = rerank_scores(itc, 3, itm, pairs_per_call=7)  # 2 queries (6 pairs) a call
    assert calls == [6, 6, 6, 3]
    calls.clear()
    assert torch.equal(batched, rerank_scores(itc, 3, itm, pairs_per_call=1)) and calls == [3] * 7


def test_outside_top_k_keeps_itc_order_below_every_rescored():
    itc = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]])
    scores = rerank_scores(itc, 2, lambda q, c: torch.tensor([-50.0, -60.0]))
    assert torch.argsort(scores[0], descending=True).tolist() == [0, 4, 2, 3, 1]
    assert scores[0, [2, 3, 1]].max() < scores[0, [0, 4]].min()
    assert scores[0, 0] == pytest.approx(0.9 - 50.0) and scores[0, 4] == pytest.approx(0.7 - 60.0)


def test_check_rerank():
    check_rerank("itm", 128)
    check_rerank("none", 1)
    with pytest.raises(VlkitError, match="--rerank itc: unknown"):
        check_rerank("itc", 10)
    with pytest.raises(VlkitError, match="--rerank-k 0"):
        check_rerank("itm", 0)


# ---------------------------------------------------------------- eval retrieval --rerank itm


def test_evaluate_retrieval_rerank_matches_a_direct_computation(setup, tmp_path):
    import json
    from types import SimpleNamespace

    from PIL import Image

    from blip_tiny import IMAGE_SIZE
    from vlkit.blip.match import blip_texts
    from vlkit.blip.rerank import evaluate_retrieval_rerank
    from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig
    from vlkit.retrieval.collection import read_source
    from vlkit.retrieval.metrics import ranks_from_scores

    blip = setup[0]
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "grey": (120, 120, 120)}
    rows = []
    for i, (name, rgb) in enumerate(colours.items()):
        im = Image.new("RGB", (36, 36), rgb)
        im.paste((255, 255, 255), (6 * i, 2, 6 * i + 9, 30))
        im.save(tmp_path / f"{name}.png")
        rows += [{"image": f"{name}.png", "caption": f"a {name} square"}, {"image": f"{name}.png", "caption": "a square"}]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows.append({"image": "bad.png", "caption": "a broken one"})
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess = PilImagePreprocess(PreprocessConfig(resize="exact", size=(IMAGE_SIZE, IMAGE_SIZE), crop_size=None, mean=(0.5,) * 3, std=(0.5,) * 3))
    loaded = SimpleNamespace(model=blip, tokenizer=BlipTokenizer.from_minilm(), preprocess=preprocess)

    k = 2
    res = evaluate_retrieval_rerank(loaded, read_source(table), k=k, batch_size=3)
    assert (res.images, res.texts, res.k) == (4, 5, 2) and res.skipped[0][0].endswith("bad.png")

    # the same thing by hand: every ITM logit, BLIP's score on the ITC top k, others below in ITC order
    texts = ["a red square", "a square", "a green square", "a blue square", "a grey square"]
    tok = blip_texts(loaded.tokenizer, texts)
    with torch.no_grad():
        embeds = blip.image_embeds(torch.stack([preprocess(Image.open(tmp_path / f"{c}.png").convert("RGB")) for c in colours]))
        itc = blip.text_feat(tok.input_ids, tok.attention_mask) @ blip.image_feat(embeds).T
    itm = full_itm(blip, tok, embeds)
    rel_t2i = [[0], [0, 1, 2, 3], [1], [2], [3]]
    rel_i2t = [[0, 1], [1, 2], [1, 3], [1, 4]]

    def ranks(scores_itc, scores_itm, relevant):
        out = []
        for q, rel in enumerate(relevant):
            order = expected_order(scores_itc[q], scores_itm[q], k)
            out.append(1 + min(order.index(r) for r in rel))
        return out

    def recall(r, n):
        return 100.0 * sum(x <= n for x in r) / len(r)

    t2i, i2t = ranks(itc, itm, rel_t2i), ranks(itc.T, itm.T, rel_i2t)
    for n in (1, 5, 10):
        assert res.itm["text_to_image"][f"R@{n}"] == pytest.approx(recall(t2i, n))
        assert res.itm["image_to_text"][f"R@{n}"] == pytest.approx(recall(i2t, n))
    assert res.itm["text_to_image"]["mean_rank"] == pytest.approx(sum(t2i) / len(t2i))
    assert res.itc["text_to_image"]["mean_rank"] == pytest.approx(ranks_from_scores(itc.numpy(), rel_t2i).mean())
    d = res.to_dict()
    assert d["text_to_image"] == d["itc_itm"]["text_to_image"] and d["rerank"]["k"] == 2

    # tokens computed once elsewhere (one tower pass shared by several evaluations): same result, no image read
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    for name in colours:
        (tmp_path / f"{name}.png").write_bytes(b"")  # would be skipped if read
    again = evaluate_retrieval_rerank(loaded, read_source(good), k=k, batch_size=3, image_embeds=embeds)
    assert (again.itm, again.itc, again.images, again.skipped) == (res.itm, res.itc, 4, [])
    with pytest.raises(ValueError, match="3 rows for 4 captioned images"):
        evaluate_retrieval_rerank(loaded, read_source(good), k=k, image_embeds=embeds[:3])


# ---------------------------------------------------------------- search --rerank itm


@pytest.fixture(scope="module")
def blip_index(tmp_path_factory):
    """A tiny BLIP retrieval checkpoint, an index built with it over colour squares with captions."""
    import json

    from PIL import Image

    from blip_tiny import save_tiny_hf_blip
    from vlkit.models import load_model
    from vlkit.retrieval import build_index, read_source

    root = tmp_path_factory.mktemp("blipindex")
    retrieval, _ = save_tiny_hf_blip(root / "model")
    rows = []
    for i, (name, rgb) in enumerate({"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "grey": (120, 120, 120), "pink": (240, 150, 190)}.items()):
        im = Image.new("RGB", (36, 36), rgb)
        im.paste((255, 255, 255), (6 * i, 2, 6 * i + 9, 30))
        im.save(root / f"{name}.png")
        rows += [{"image": f"{name}.png", "caption": f"a {name} square"}, {"image": f"{name}.png", "caption": f"{name} thing"}]
    table = root / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    vl = load_model(str(retrieval))
    build_index(root / "index", vl, read_source(table), progress=False)
    return root, vl


def test_search_rerank_text_to_images_follows_the_formula(blip_index):
    from PIL import Image

    from vlkit.blip.match import blip_texts
    from vlkit.blip.rerank import rerank_search
    from vlkit.retrieval.search import Searcher

    root, vl = blip_index
    searcher = Searcher.open(root / "index", vl)
    hits, skipped = rerank_search(searcher, text="a red square", k=2, rerank_k=4)
    assert skipped == [] and [h.rank for h in hits] == [1, 2]
    itc = searcher.search_text("a red square", 4, "images")
    q = blip_texts(vl.tokenizer, ["a red square"])
    expected = []
    with torch.no_grad():
        for h in itc:
            x = vl.preprocess(Image.open(root / h.metadata["path"]).convert("RGB"))[None]
            logit = vl.blip.itm_logits(vl.blip.image_embeds(x), q.input_ids, q.attention_mask)[0, 1].item()
            expected.append((logit + h.score, h.id, logit))
    expected.sort(key=lambda t: -t[0])
    assert [h.id for h in hits] == [e[1] for e in expected[:2]]
    for h, (score, _, logit) in zip(hits, expected):
        assert h.score == pytest.approx(score, abs=1e-5) and h.metadata["itm_logit"] == pytest.approx(logit, abs=1e-5)
        assert h.score == pytest.approx(h.metadata["itm_logit"] + h.metadata["itc_cosine"], abs=1e-6)


def test_search_rerank_image_to_captions_and_bad_directions(blip_index):
    from vlkit.blip.match import blip_texts
    from vlkit.blip.rerank import rerank_search
    from vlkit.retrieval.search import Searcher

    root, vl = blip_index
    searcher = Searcher.open(root / "index", vl)
    hits, _ = rerank_search(searcher, image=root / "blue.png", k=3, rerank_k=10, target="captions")
    itc = searcher.search_image(root / "blue.png", 10, "captions")
    with torch.no_grad():
        from PIL import Image

        embeds = vl.blip.image_embeds(vl.preprocess(Image.open(root / "blue.png").convert("RGB"))[None])
        caps = blip_texts(vl.tokenizer, [h.metadata["text"] for h in itc])
        logits = vl.blip.itm_logits(embeds.expand(len(itc), -1, -1), caps.input_ids, caps.attention_mask)[:, 1]
    final = sorted(((float(l) + h.score, h.id) for l, h in zip(logits, itc)), reverse=True)
    assert [h.id for h in hits] == [i for _, i in final[:3]]
    with pytest.raises(VlkitError, match="not text -> captions"):
        rerank_search(searcher, text="red", target="captions")
    with pytest.raises(VlkitError, match="not image -> images"):
        rerank_search(searcher, image=root / "blue.png", target="images")


def test_search_rerank_drops_a_candidate_image_gone_since_indexing(blip_index, tmp_path):
    import shutil

    from vlkit.blip.rerank import rerank_search
    from vlkit.retrieval.search import Searcher

    root, vl = blip_index
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("model"))
    man = (copy / "index" / "index.json").read_text().replace(str(root), str(copy))
    (copy / "index" / "index.json").write_text(man)
    (copy / "green.png").write_bytes(b"")
    hits, skipped = rerank_search(Searcher.open(copy / "index", vl), text="a green square", k=5, rerank_k=5)
    assert [Path(p).name for p, _ in skipped] == ["green.png"] and "empty" in skipped[0][1]
    assert "green.png" not in [h.id for h in hits] and len(hits) == 4


def test_search_rerank_refuses_a_clip_model(tiny_clip_model):
    from vlkit.blip.rerank import blip_of

    with pytest.raises(VlkitError, match="is not a BLIP model, so it has no ITM head"):
        blip_of(tiny_clip_model, tiny_clip_model.spec)


def _cli(args: list, capsys) -> tuple[int, str, str]:
    from vlkit.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else int(e.code)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_search_and_eval_retrieval_with_rerank(blip_index, tmp_path, capsys):
    import json

    root, vl = blip_index
    code, out, err = _cli(["search", root / "index", "--text", "a red square", "-k", "3", "--rerank", "itm", "--rerank-k", "4", "--json"], capsys)
    assert code == 0, err
    body = json.loads(out)
    assert body["query"]["rerank"] == "itm" and len(body["results"]) == 3
    assert all(r["score"] == pytest.approx(r["metadata"]["itm_logit"] + r["metadata"]["itc_cosine"], abs=1e-6) for r in body["results"])
    runs = tmp_path / "runs"
    retrieval = root / "model" / "retrieval"
    code, out, err = _cli(["eval", "retrieval", "--data", root / "t.jsonl", "--model", retrieval, "--rerank", "itm", "--rerank-k", "3", "--runs-dir", runs], capsys)
    assert code == 0, err
    metrics = json.loads(next(runs.iterdir()).joinpath("metrics.json").read_text())
    assert set(metrics["itc"]) == {"text_to_image", "image_to_text"} and metrics["rerank"]["k"] == 3
    assert metrics["text_to_image"] == metrics["itc_itm"]["text_to_image"] and metrics["texts"] == 10
    assert "ITC + ITM" in out


def test_cli_rerank_bad_input_is_one_line_before_loading(blip_index, tiny_clip_dir, tiny_clip_model, tmp_path, capsys, monkeypatch):
    from vlkit.retrieval import build_index, read_source

    root, _ = blip_index
    clip_index = tmp_path / "clip-index"
    build_index(clip_index, tiny_clip_model, read_source(root / "t.jsonl"), progress=False)
    import vlkit.blip.checkpoint as checkpoint
    import vlkit.models.registry as registry

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(checkpoint, "load_blip", refuse)
    monkeypatch.setattr(registry, "load_model", refuse)
    monkeypatch.setattr("vlkit.models.load_model", refuse)
    cases = [
        (["search", clip_index, "--text", "red", "--rerank", "itm"], "holds a 'clip' checkpoint"),
        (["search", root / "index", "--text", "red", "--rerank", "itm", "--target", "captions"], "not text -> captions"),
        (["search", root / "index", "--text", "red", "--rerank", "itc"], "--rerank itc: unknown"),
        (["search", root / "index", "--text", "red", "--rerank", "itm", "--rerank-k", "0"], "--rerank-k 0"),
        (["search", root / "index", "--text", "red", "--rerank", "itm", "--model", root / "model" / "captioning"], "has no text encoder and ITM head"),
        (["eval", "retrieval", "--data", root / "t.jsonl", "--model", tiny_clip_dir, "--rerank", "itm", "--runs-dir", tmp_path / "r"], "holds a 'clip' checkpoint"),
        (["eval", "retrieval", "--data", root / "t.jsonl", "--rerank", "itm", "--runs-dir", tmp_path / "r"], "vlkit-dual-encoder"),
    ]
    for args, msg in cases:
        code, _, err = _cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, err)
    assert not (tmp_path / "r").exists()

"""Caption metrics: hand-computed BLEU/ROUGE-L/CIDEr values, the Java/Python tokenizer agreement, METEOR, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap")

from vlkit.blip import caption_metrics as cm  # noqa: E402
from vlkit.blip.caption_metrics import evaluate_caption_files, python_ptb_tokenize_one, score_captions  # noqa: E402
from vlkit.errors import VlkitError  # noqa: E402

JAVA = cm.java_available()
needs_java = pytest.mark.skipif(not JAVA, reason="no working java on PATH")
SAMPLE = Path(__file__).resolve().parent.parent / "src" / "vlkit" / "assets" / "sample" / "built"


def py(pred: dict, refs: dict) -> cm.CaptionScores:
    return score_captions(pred, refs, tokenizer="python", meteor="off")


def test_identical_caption_scores_one():
    r = py({"a": "a man riding a wave on a surfboard"}, {"a": ["a man riding a wave on a surfboard", "a surfer"]})
    for n in range(1, 5):
        assert r.scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert r.scores["ROUGE-L"] == pytest.approx(1.0)


def test_bleu_and_rouge_by_hand():
    # hypothesis 6 words, reference 6 words: unigrams 5/6 match (not "sat"), bigrams 3/5
    # (the cat, on the, the mat), trigrams 1/4 (on the mat), no 4-gram; brevity penalty 1.
    r = py({"a": "the cat sat on the mat"}, {"a": ["the cat is on the mat"]})
    assert r.scores["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    assert r.scores["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert r.scores["BLEU-3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert r.scores["BLEU-4"] < 1e-3  # no matching 4-gram (pycocoevalcap's tiny smoothing keeps it above 0)
    # ROUGE-L: LCS "the cat on the mat" = 5, P = R = 5/6, so F_beta = 5/6 for any beta
    assert r.scores["ROUGE-L"] == pytest.approx(5 / 6)


def test_brevity_penalty():
    r = py({"a": "the cat"}, {"a": ["the cat sat on the mat"]})
    assert r.scores["BLEU-1"] == pytest.approx(math.exp(1 - 6 / 2), abs=1e-6)


def test_cider_by_hand():
    # Two images with disjoint words: every n-gram has document frequency 1 of 2, so every idf is
    # log 2; an exact copy has cosine 1 at every n (x10 = 10), a caption sharing nothing scores 0.
    refs = {"a": ["a dog runs on grass"], "b": ["two cats sleep inside today"]}
    assert py({"a": "a dog runs on grass", "b": "two cats sleep inside today"}, refs).scores["CIDEr"] == pytest.approx(10.0)
    r = py({"a": "a dog runs on grass", "b": "red boat"}, refs)
    assert r.per_image["a"]["CIDEr"] == pytest.approx(10.0) and r.per_image["b"]["CIDEr"] == 0.0
    assert r.scores["CIDEr"] == pytest.approx(5.0)


def test_tokenisation_removes_case_and_punctuation():
    a = py({"a": "A Dog, running on the beach!"}, {"a": ["a dog running on the beach."]})
    assert a.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert python_ptb_tokenize_one("The dog's ball (red), isn't it?") == "the dog 's ball -lrb- red -rrb- is n't it"


SIMPLE = [
    "A man riding a wave on top of a surfboard.",
    "The dog's ball, it's red!  Isn't it?",
    '"Hello," she said -- (quietly) [ok] 3.5 1,000 U.S. e-mail well-known',
    "can't won't don't I'm you're we've they'll he'd",
    "A red double-decker bus driving down a street.",
    "The bathroom has a toilet, sink, and a mirror; it's clean.",
    "People at the St. Patrick's Day parade",
    'A sign that says "STOP" on a pole',
    "A kitchen with stainless steel appliances & wooden cabinets",
    "A 10-year-old boy playing soccer at 3:30 pm",
    "Is this a bird? Yes!!",
    "A picture of a pizza... yum",
    "grinning face with sweat 😅 and ☀️",
    "Japanese “congratulations” button",
    "flag: St. Kitts & Nevis",
    "woman’s hat",
]


@needs_java
def test_python_tokenizer_matches_java_ptb():
    labels = set()
    with open(SAMPLE / "emoji" / "metadata.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            labels.update([row["label"], row["base_label"], row["subgroup_name"], *row["tags"]])
    sentences = SIMPLE + sorted(labels)
    java = cm.java_ptb_tokenize(sentences)
    python = cm.python_ptb_tokenize(sentences)
    differ = [(s, j, p) for s, j, p in zip(sentences, java, python) if j != p]
    assert not differ, differ[:5]
    assert len(sentences) > 1000


@needs_java
def test_ptb_is_used_with_java_and_gives_the_same_scores_on_simple_captions():
    pred = {"a": "The cat sat on the mat.", "b": "A dog's toy, (red)!"}
    refs = {"a": ["the cat is on the mat", "A cat on a mat."], "b": ["a dog's red toy", "red toy"]}
    java = score_captions(pred, refs, meteor="off")
    assert java.tokenizer == "ptb" and "Stanford PTBTokenizer" in java.tokenizer_detail
    python = score_captions(pred, refs, tokenizer="python", meteor="off")
    assert python.tokenizer == "python"
    assert java.scores == python.scores


@needs_java
def test_meteor_with_java():
    pred = {"a": "a man riding a wave on top of a surfboard", "b": "x y z", "c": "a dog runs on the grass"}
    refs = {"a": ["a man riding a wave on top of a surfboard"], "b": ["a red car"], "c": ["a dog running on grass"]}
    r = score_captions(pred, refs, tokenizer="python", meteor="auto")
    assert r.meteor.startswith("computed")
    assert r.per_image["a"]["METEOR"] == pytest.approx(1.0)
    assert r.per_image["b"]["METEOR"] == 0.0
    assert 0.0 < r.per_image["c"]["METEOR"] < 1.0
    assert 0.0 < r.scores["METEOR"] < 1.0


def test_without_java_falls_back_with_notes(monkeypatch):
    monkeypatch.setattr(cm, "java_available", lambda: False)
    r = score_captions({"a": "a dog"}, {"a": ["a dog"]})
    assert r.tokenizer == "python" and "Java not found" in r.tokenizer_detail
    assert r.scores["METEOR"] is None and any("METEOR not computed" in n and "Java" in n for n in r.notes)
    assert any("SPICE" in n for n in r.notes)
    with pytest.raises(VlkitError, match="needs Java"):
        score_captions({"a": "a dog"}, {"a": ["a dog"]}, meteor="on")
    with pytest.raises(VlkitError, match="needs Java"):
        score_captions({"a": "a dog"}, {"a": ["a dog"]}, tokenizer="ptb", meteor="off")


def test_mismatched_keys_and_empty_references_are_errors():
    with pytest.raises(VlkitError, match="different images"):
        py({"a": "x", "b": "y"}, {"a": ["x"]})
    with pytest.raises(VlkitError, match="no reference caption"):
        py({"a": "x"}, {"a": ["  "]})


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_files_are_joined_by_resolved_path(tmp_path):
    # predictions hold absolute paths (as `vlkit caption` writes them); references are relative to their table
    data = tmp_path / "data"
    refs = data / "refs.csv"
    refs.parent.mkdir()
    refs.write_text("image,caption\nimg/a.png,the cat is on the mat\nimg/b.png,a dog runs\nimg/b.png,a dog running\nimg/c.png,only ref\n")
    pred = _write(
        tmp_path / "run" / "captions.jsonl",
        [
            {"path": str(data / "img" / "a.png"), "caption": "the cat sat on the mat", "captions": ["the cat sat on the mat"]},
            {"path": str(data / "img" / "b.png"), "caption": "a dog runs"},
            {"path": str(data / "img" / "z.png"), "caption": "no reference"},
        ],
    )
    ev = evaluate_caption_files(pred, refs, tokenizer="python", meteor="off")
    assert ev.result.images == 2
    assert ev.predictions_without_refs == [str(data / "img" / "z.png")]
    assert ev.refs_without_prediction == [str(data / "img" / "c.png")]
    assert ev.result.per_image[str(data / "img" / "b.png")]["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert ev.to_dict()["references_without_prediction"] == 1


def test_file_errors_name_the_input(tmp_path):
    refs = tmp_path / "refs.jsonl"
    _write(refs, [{"file": "a.png", "text": "a cat"}])
    pred = _write(tmp_path / "p.jsonl", [{"path": "a.png", "caption": "a cat"}])
    with pytest.raises(VlkitError, match=r"no column 'caption' \(caption\); columns present: file, text"):
        evaluate_caption_files(pred, refs, caption_column="caption", tokenizer="python", meteor="off")
    assert evaluate_caption_files(pred, refs, tokenizer="python", meteor="off").result.images == 1  # file/text picked
    with pytest.raises(VlkitError, match="does not exist"):
        evaluate_caption_files(tmp_path / "nope.jsonl", refs)
    dup = _write(tmp_path / "dup.jsonl", [{"path": "a.png", "caption": "x"}, {"path": "a.png", "caption": "y"}])
    with pytest.raises(VlkitError, match="second row"):
        evaluate_caption_files(dup, refs, tokenizer="python", meteor="off")
    other = _write(tmp_path / "other.jsonl", [{"path": "b.png", "caption": "x"}])
    with pytest.raises(VlkitError, match="none of its 1 images"):
        evaluate_caption_files(other, refs, tokenizer="python", meteor="off")


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from vlkit.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else int(e.code)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_eval_caption(tmp_path, capsys):
    refs = tmp_path / "refs.csv"
    refs.write_text("image,caption\na.png,the cat is on the mat\nb.png,a dog runs on grass\n")
    pred = _write(tmp_path / "p.jsonl", [{"path": "a.png", "caption": "the cat sat on the mat"}, {"path": "b.png", "caption": "a dog runs on grass"}])
    runs = tmp_path / "runs"
    code, out, err = _cli(["eval", "caption", "--pred", pred, "--refs", refs, "--tokenizer", "python", "--meteor", "off", "--out", runs], capsys)
    assert code == 0, err
    (run,) = runs.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["tokenizer"] == "python" and metrics["scores"]["METEOR"] is None
    assert metrics["scores"]["BLEU-1"] == pytest.approx(10 / 11, abs=1e-6)  # corpus BLEU-1: 10 of the 11 words match
    per = [json.loads(line) for line in (run / "per_image.jsonl").read_text().splitlines()]
    assert [p["path"] for p in per] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert json.loads((run / "config.json").read_text())["settings"]["tokenizer"] == "python"
    for args, msg in (
        (["--tokenizer", "nltk"], "--tokenizer nltk: unknown"),
        (["--caption-column", "cap"], "no column 'cap' (caption); columns present: image, caption"),
    ):
        code, _, err = _cli(["eval", "caption", "--pred", pred, "--refs", refs, "--out", tmp_path / "bad", *args], capsys)
        assert code == 2 and err.strip().count("\n") == 0 and err.startswith("error: ") and msg in err, err
    assert not (tmp_path / "bad").exists()

"""BLIP's user-facing layer: matching pairs from a table, captioning files, their commands and bad input."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip_tiny import IMAGE_SIZE, tiny_blip_model
from vlkit.blip.match import blip_texts, match_pairs, read_pairs, write_matches
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError
from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


@pytest.fixture(scope="module")
def parts():
    """A tiny random BlipModel (noise on every weight), BLIP's tokenizer and a 32 px preprocessing."""
    blip = tiny_blip_model(seed=0)
    preprocess = PilImagePreprocess(PreprocessConfig(resize="exact", size=(IMAGE_SIZE, IMAGE_SIZE), crop_size=None, mean=(0.5,) * 3, std=(0.5,) * 3))
    return blip, BlipTokenizer.from_minilm(), preprocess


@pytest.fixture()
def data(tmp_path) -> Path:
    """img/<colour>.png squares with a pattern, a corrupt PNG, and a pairs table naming them (two texts for red)."""
    img = tmp_path / "data" / "img"
    img.mkdir(parents=True)
    for i, (name, rgb) in enumerate(COLORS.items()):
        im = Image.new("RGB", (40 + 8 * i, 40), rgb)
        im.paste((255, 255, 255), (4 * i, 4, 4 * i + 10, 20))
        im.save(img / f"{name}.png")
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows = [
        {"image": "img/red.png", "text": "a red square"},
        {"image": "img/broken.png", "text": "a broken file"},
        {"image": "img/green.png", "text": "a green square!"},
        {"image": "img/red.png", "text": "a blue square"},
        {"image": "img/blue.png", "text": "blue"},
        {"image": "img/yellow.png", "text": "A Yellow (square)."},
    ]
    table = tmp_path / "data" / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def direct_scores(blip, tok, preprocess, path: str, text: str) -> tuple[float, float]:
    """ITM probability and ITC cosine of one pair, computed straight from the model's methods."""
    with torch.no_grad():
        x = preprocess(Image.open(path).convert("RGB"))[None]
        embeds = blip.image_embeds(x)
        t = blip_texts(tok, [text])
        prob = blip.itm_logits(embeds, t.input_ids, t.attention_mask).softmax(-1)[0, 1]
        cos = (blip.image_feat(embeds) * blip.text_feat(t.input_ids, t.attention_mask)).sum()
    return float(prob), float(cos)


# ---------------------------------------------------------------- match (library)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_match_scores_equal_the_models_heads_and_skip_the_corrupt_image(parts, data, batch_size):
    blip, tok, preprocess = parts
    pairs = read_pairs(data)
    assert [Path(p.path).name for p in pairs] == ["red.png", "broken.png", "green.png", "red.png", "blue.png", "yellow.png"]
    result = match_pairs(blip, tok, preprocess, pairs, batch_size=batch_size, num_workers=0 if batch_size == 1 else 2)
    assert [r["text"] for r in result.rows] == ["a red square", "a green square!", "a blue square", "blue", "A Yellow (square)."]
    assert len(result.skipped) == 1 and result.skipped[0][0].endswith("broken.png") and "PNG" in result.skipped[0][1]
    assert result.pairs_skipped == 1
    for row in result.rows:
        prob, cos = direct_scores(blip, tok, preprocess, row["path"], row["text"])
        assert row["itm_probability"] == pytest.approx(prob, abs=1e-5)
        assert row["itc_cosine"] == pytest.approx(cos, abs=1e-5)
        assert row["itm_probability"] == pytest.approx(torch.tensor([row["itm_logit_no"], row["itm_logit_yes"]]).softmax(0)[1].item(), abs=1e-6)
    m = result.metrics()
    assert m["pairs"] == 5 and m["images_skipped"] == 1 and m["skipped"][0]["reason"] == result.skipped[0][1]


def test_match_outputs_csv_and_jsonl_agree(parts, data, tmp_path):
    blip, tok, preprocess = parts
    result = match_pairs(blip, tok, preprocess, read_pairs(data), batch_size=4)
    csv_path, jsonl_path = write_matches(tmp_path / "run", result)
    with open(csv_path, newline="", encoding="utf-8") as f:
        from_csv = list(csv.DictReader(f))
    from_jsonl = [json.loads(line) for line in jsonl_path.read_text(encoding="utf-8").splitlines()]
    assert len(from_csv) == len(from_jsonl) == 5
    for a, b in zip(from_csv, from_jsonl):
        assert a["path"] == b["path"] and a["text"] == b["text"]
        assert float(a["itm_probability"]) == pytest.approx(b["itm_probability"], rel=1e-12)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_match_table_errors_name_the_columns(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("file,caption,id\na.png,a cat,1\n")
    assert [(Path(p.path).name, p.text) for p in read_pairs(table)] == [("a.png", "a cat")]  # file/caption picked
    with pytest.raises(VlkitError, match=r"no column 'text' \(--text-column\); columns present: file, caption, id"):
        read_pairs(table, text_column="text")
    with pytest.raises(VlkitError, match=r"no column 'img' \(--image-column\); columns present: file, caption, id"):
        read_pairs(table, image_column="img")
    other = tmp_path / "o.csv"
    other.write_text("name,label\na.png,cat\n")
    with pytest.raises(VlkitError, match=r"no image column \(tried image, path.*columns present: name, label; pass --image-column"):
        read_pairs(other)
    with pytest.raises(VlkitError, match="does not exist"):
        read_pairs(tmp_path / "missing.csv")


# ---------------------------------------------------------------- captioning (library)


@pytest.fixture(scope="module")
def blip_dirs(tmp_path_factory):
    """A tiny Hugging Face BLIP model on disk: parent/retrieval and parent/captioning (two halves of one model)."""
    from blip_tiny import save_tiny_hf_blip

    parent = tmp_path_factory.mktemp("blip")
    retrieval, captioning = save_tiny_hf_blip(parent)
    return parent, retrieval, captioning


@pytest.fixture(scope="module")
def loaded(blip_dirs):
    from vlkit.blip.checkpoint import load_blip

    return load_blip(str(blip_dirs[0]))


def good_images(data: Path) -> list[Path]:
    return [data.parent / "img" / f"{c}.png" for c in COLORS]


def test_resolve_images_from_files_folders_and_tables(data, tmp_path):
    from vlkit.blip.captioning import resolve_images

    img = data.parent / "img"
    table = tmp_path / "list.csv"
    table.write_text(f"path,note\n{img / 'red.png'}\nrel.png,x\n")
    got = resolve_images([img / "red.png", img, table])
    names = [Path(p).name for p in got]
    assert names == ["red.png", "blue.png", "broken.png", "green.png", "yellow.png", "rel.png"]  # each once, folder sorted
    assert got[-1] == str(tmp_path / "rel.png")  # relative to the table
    with pytest.raises(VlkitError, match="does not exist"):
        resolve_images([tmp_path / "nope.png"])
    with pytest.raises(VlkitError, match=r"no column 'file' \(--image-column\); columns present: path, note"):
        resolve_images([table], image_column="file")
    with pytest.raises(VlkitError, match="no image files found"):
        (tmp_path / "empty").mkdir()
        resolve_images([tmp_path / "empty"])


def test_caption_files_equal_blip_core_captions_and_skip_the_corrupt_file(loaded, data):
    from vlkit.blip.captioning import caption_files, resolve_images
    from vlkit.blip.generate import BEAM, caption_images
    from vlkit.data.images import load_image

    paths = resolve_images([data.parent / "img"])
    beam = replace(BEAM, max_length=10)  # BLIP's beam search, shorter (the tiny model's captions are noise anyway)
    run = caption_files(loaded, paths, beam, batch_size=3)
    assert [Path(r["path"]).name for r in run.records] == ["blue.png", "green.png", "red.png", "yellow.png"]
    assert [Path(p).name for p, _ in run.skipped] == ["broken.png"]
    expected = caption_images(loaded, [load_image(r["path"]) for r in run.records], beam, batch_size=3)
    assert [r["caption"] for r in run.records] == expected and all(expected)
    rec = run.records[0]
    assert rec["method"] == "beam" and rec["settings"]["num_beams"] == 3 and rec["settings"]["max_length"] == 10
    m = run.metrics()
    assert (m["images"], m["captioned"], m["skipped_count"]) == (5, 4, 1) and m["images_per_s"] > 0
    assert m["skipped"][0]["reason"].startswith("corrupt PNG")


def test_nucleus_captions_are_seeded_and_several_per_image(loaded, data):
    from vlkit.blip.captioning import caption_files
    from vlkit.blip.generate import caption_images, settings_for
    from vlkit.data.images import load_image

    paths = [str(p) for p in good_images(data)]
    settings = settings_for("nucleus", seed=7, max_length=10)
    a = caption_files(loaded, paths, settings, batch_size=2)
    assert [r["caption"] for r in a.records] == caption_images(loaded, [load_image(p) for p in paths], settings, batch_size=2)
    assert [r["caption"] for r in caption_files(loaded, paths, settings, batch_size=2).records] == [r["caption"] for r in a.records]
    other = caption_files(loaded, paths, settings_for("nucleus", seed=8, max_length=10), batch_size=2)
    assert [r["caption"] for r in other.records] != [r["caption"] for r in a.records]
    three = caption_files(loaded, paths, settings_for("nucleus", seed=7, max_length=10, num_return_sequences=3), batch_size=2)
    assert all(len(r["captions"]) == 3 and r["caption"] == r["captions"][0] for r in three.records)
    assert len({c for r in three.records for c in r["captions"]}) > len(paths)  # the samples differ
    assert three.records[0]["settings"]["top_p"] == 0.9 and three.records[0]["settings"]["repetition_penalty"] == 1.1


def test_caption_batch_size_error(loaded, data):
    from vlkit.blip.captioning import caption_files
    from vlkit.blip.generate import BEAM

    with pytest.raises(VlkitError, match="--batch-size 0"):
        caption_files(loaded, [str(p) for p in good_images(data)], BEAM, batch_size=0)


def test_best_beams(loaded, data):
    from vlkit.blip.captioning import caption_files
    from vlkit.blip.generate import BEAM, settings_for

    paths = [str(p) for p in good_images(data)][:2]
    best = caption_files(loaded, paths, settings_for("beam", max_length=10), batch_size=2)
    two = caption_files(loaded, paths, settings_for("beam", max_length=10, num_return_sequences=2), batch_size=2)
    assert [r["captions"][0] for r in two.records] == [r["caption"] for r in best.records]
    assert all(len(set(r["captions"])) == 2 for r in two.records) and two.records[0]["settings"]["num_captions"] == 2


def test_write_captions_is_jsonl(loaded, data, tmp_path):
    from vlkit.blip.captioning import caption_files, write_captions
    from vlkit.blip.generate import GREEDY

    run = caption_files(loaded, [str(p) for p in good_images(data)], GREEDY, batch_size=4)
    path = write_captions(tmp_path / "run", run)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == run.records and [p.name for p in (tmp_path / "run").iterdir()] == ["captions.jsonl"]


# ---------------------------------------------------------------- commands


def cli(args: list, capsys) -> tuple[int, str, str]:
    from vlkit.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else int(e.code)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_caption_writes_a_run_folder(blip_dirs, loaded, data, tmp_path, capsys):
    from vlkit.blip.captioning import caption_files, resolve_images
    from vlkit.blip.generate import settings_for

    runs = tmp_path / "runs"
    args = ["caption", data.parent / "img", "--model", blip_dirs[0], "--batch-size", "2", "--max-length", "10", "--out", runs, "--no-progress"]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    (run,) = runs.iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["captions.jsonl", "config.json", "metrics.json"]
    rows = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    expected = caption_files(loaded, resolve_images([data.parent / "img"]), settings_for("beam", max_length=10), batch_size=2)
    assert [r["caption"] for r in rows] == [r["caption"] for r in expected.records]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["captioned"] == 4 and metrics["skipped"][0]["path"].endswith("broken.png") and metrics["images_per_s"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["num_beams"] == 3 and config["settings"]["min_length"] == 5 and config["model_fingerprint"]
    assert "broken.png" in out and "skipped 1" in out


def test_cli_caption_sampling_with_a_prompt(blip_dirs, data, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["caption", *good_images(data), "--model", blip_dirs[2], "--sample", "--top-p", "0.8", "--num-captions", "2",
            "--seed", "5", "--prompt", "a picture of ", "--max-length", "12", "--out", runs, "--no-progress"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in next(runs.iterdir()).joinpath("captions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["captions"]) == 2 for r in rows)
    assert rows[0]["method"] == "nucleus" and rows[0]["settings"]["top_p"] == 0.8 and rows[0]["settings"]["prompt"] == "a picture of "
    assert not any(c.startswith("a picture of") for r in rows for c in r["captions"])


def test_bf16_captions_are_the_autocast_computation_and_recorded(blip_dirs, loaded, data, tmp_path, capsys, monkeypatch):
    """--precision bf16: the tower and the decoder under bfloat16 autocast, the same as running transformers'
    generate by hand inside `torch.autocast`; fp32 stays the default and exact."""
    from vlkit.blip.captioning import caption_files
    from vlkit.blip.generate import decode, generate, settings_for

    settings = settings_for("beam", max_length=10, precision="bf16")
    run = caption_files(loaded, good_images(data), settings, batch_size=4)
    pixels = torch.stack([loaded.preprocess(Image.open(p).convert("RGB")) for p in good_images(data)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embeds = loaded.model.image_embeds(pixels)
        want = decode(loaded.tokenizer, generate(loaded.model, embeds, loaded.tokenizer, settings_for("beam", max_length=10)))
    with torch.no_grad():
        assert not torch.equal(embeds, loaded.model.image_embeds(pixels))  # the matmuls did run in bfloat16
    assert [r["caption"] for r in run.records] == want
    tower, autocast_on = loaded.model.image_embeds, []
    monkeypatch.setattr(loaded.model, "image_embeds", lambda px: (autocast_on.append(torch.is_autocast_enabled("cpu")), tower(px))[1])
    caption_files(loaded, good_images(data), settings, batch_size=4)
    caption_files(loaded, good_images(data), settings_for("beam", max_length=10), batch_size=4)
    assert autocast_on == [True, False]  # the tower too, and only when asked
    monkeypatch.undo()
    assert run.records[0]["settings"]["precision"] == "bf16" and "precision" not in settings_record_of(loaded, data)
    code, _, err = cli(["caption", *good_images(data), "--model", blip_dirs[0], "--precision", "bf16", "--max-length", "10",
                        "--batch-size", "4", "--out", tmp_path / "runs", "--no-progress"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in next((tmp_path / "runs").iterdir()).joinpath("captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == want
    code, _, err = cli(["caption", *good_images(data), "--model", blip_dirs[0], "--precision", "fp16", "--out", tmp_path / "r2"], capsys)
    assert "--precision 'fp16': unknown; use one of fp32, bf16" in one_error_line(code, err)


def settings_record_of(loaded, data) -> dict:
    from vlkit.blip.captioning import caption_files
    from vlkit.blip.generate import settings_for

    return caption_files(loaded, good_images(data)[:1], settings_for("beam", max_length=10)).records[0]["settings"]


def test_cli_match_writes_csv_and_jsonl(blip_dirs, data, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = cli(["match", "--model", blip_dirs[1], "--data", data, "--out", runs, "--no-progress"], capsys)
    assert code == 0, err
    (run,) = runs.iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "matches.csv", "matches.jsonl", "metrics.json"]
    rows = [json.loads(line) for line in (run / "matches.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(0 < r["itm_probability"] < 1 for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pairs_skipped"] == 1 and metrics["skipped"][0]["path"].endswith("broken.png")


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading any model fails the test: the argument errors below must come first."""
    import vlkit.blip.checkpoint as checkpoint

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(checkpoint, "load_blip", refuse)


def test_cli_bad_arguments_fail_before_any_model_loads(blip_dirs, tiny_clip_dir, data, tmp_path, capsys, no_model_load):
    parent, retrieval, captioning = blip_dirs
    img = data.parent / "img"
    afile = tmp_path / "afile"
    afile.write_text("x")
    runs = tmp_path / "runs"
    cases = [
        (["caption", img, "--model", tiny_clip_dir], "holds a 'clip' checkpoint"),
        (["caption", img, "--model", retrieval], "this BLIP retrieval checkpoint has no text decoder (needed to caption)"),
        (["caption", img, "--model", tmp_path / "no-such-model"], "not found"),
        (["caption", img, "--model", "no-such-model"], "not found"),
        (["caption", img, "--model", parent, "--beam", "2", "--sample"], "pick one decoding method"),
        (["caption", img, "--model", parent, "--top-p", "0.5"], "--top-p 0.5: applies to nucleus sampling only"),
        (["caption", img, "--model", parent, "--sample", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
        (["caption", img, "--model", parent, "--beam", "0"], "--beam 0: must be at least 1"),
        (["caption", img, "--model", parent, "--min-length", "9", "--max-length", "8"], "--min-length 9: is above --max-length 8"),
        (["caption", img, "--model", parent, "--num-captions", "4"], "--num-captions 4: beam search returns at most --beam 3"),
        (["caption", img, "--model", parent, "--num-captions", "0"], "--num-captions 0: must be at least 1"),
        (["caption", img, "--model", parent, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["caption", img, "--model", parent, "--repetition-penalty", "nan"], "--repetition-penalty nan"),
        (["caption", img, "--model", parent, "--device", "banana"], "--device 'banana': not a device"),
        (["caption", img, "--model", parent, "--out", afile], "is an existing file"),
        (["caption", tmp_path / "missing.png", "--model", parent], "does not exist"),
        (["match", "--model", tiny_clip_dir, "--data", data], "holds a 'clip' checkpoint"),
        (["match", "--model", captioning, "--data", data], "this BLIP captioning checkpoint has no text encoder and ITM head (needed to match)"),
        (["match", "--model", parent, "--data", data, "--text-column", "caption"], "no column 'caption' (--text-column); columns present: image, text"),
        (["match", "--model", parent, "--data", tmp_path / "none.csv"], "table does not exist"),
    ]
    for args, msg in cases:
        out = [] if "--out" in args else ["--out", runs]
        code, _, err = cli([*args, *out, "--no-progress"], capsys)
        line = one_error_line(code, err)
        assert msg in line, (args, line)
    assert not runs.exists()


def test_python_api_takes_a_spec(blip_dirs, data):
    from vlkit.blip.captioning import caption_files
    from vlkit.blip.generate import GREEDY
    from vlkit.blip.match import match_table

    result = match_table(str(blip_dirs[1]), data, batch_size=4)
    assert len(result.rows) == 5 and len(result.skipped) == 1
    assert len(caption_files(str(blip_dirs[2]), [str(p) for p in good_images(data)], GREEDY).records) == 4


def test_links_that_lead_nowhere_are_skipped_and_listed(loaded, data, tmp_path):
    import os

    from vlkit.blip.captioning import caption_files, resolve_images
    from vlkit.blip.generate import GREEDY

    img = data.parent / "img"
    os.symlink(tmp_path / "gone.png", img / "dangling.png")
    os.symlink(img / "loop.png", img / "loop.png")
    run = caption_files(loaded, resolve_images([img]), GREEDY, batch_size=4)
    reasons = {Path(p).name: r for p, r in run.skipped}
    assert set(reasons) == {"broken.png", "dangling.png", "loop.png"}
    assert "dangling symlink" in reasons["dangling.png"] and "symlink loop" in reasons["loop.png"]
    assert len(run.records) == 4

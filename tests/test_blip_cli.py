"""BLIP's user-facing layer: matching pairs from a table, captioning files, their commands and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip_tiny import IMAGE_SIZE, tiny_configs
from vlkit.blip.match import blip_texts, match_pairs, read_pairs, write_matches
from vlkit.blip.model import BlipModel
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError
from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


@pytest.fixture(scope="module")
def parts():
    """A tiny random BlipModel (noise on every weight), BLIP's tokenizer and a 32 px preprocessing."""
    torch.manual_seed(0)
    vision, text = tiny_configs()
    blip = BlipModel.from_config(vision, text, embed_dim=16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in blip.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
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

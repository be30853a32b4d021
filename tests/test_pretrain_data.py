"""Pretraining pairs: captions carry the task vocabulary, the held-out style never
enters training, and augmentation is exact where it should be the identity."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.pretrain import augment
from vlkit.pretrain.data import (
    clipart_captions,
    describing_captions,
    emoji_captions,
    load_pairs,
    sample_captions,
    step_generator,
)

WAVE = {"label": "waving hand: medium skin tone", "base_label": "waving hand", "tags": ["hand", "wave"],
        "group_name": "people & body", "subgroup_name": "hand fingers open", "base_label_zh": "挥手",
        "tags_zh": ["挥手"], "group_zh": "人物与身体", "subgroup_zh": "手掌张开", "style": "twitter"}


def test_emoji_captions_name_base_group_subgroup_and_chinese():
    caps = emoji_captions(WAVE)
    assert "an emoji of waving hand." in caps and "a waving hand emoji." in caps
    assert "an emoji from the category people & body." in caps
    assert "an emoji from the category hand fingers open." in caps
    assert "挥手的表情符号" in caps
    # a skin-tone variant is captioned as its base emoji (as the label task counts it)
    assert not any("medium skin tone" in c for c in caps)
    # name phrasings are listed twice: about half of the draws name the emoji
    assert caps.count("an emoji of waving hand.") == 2
    assert "挥手的表情符号" not in emoji_captions(WAVE, languages=("en",))


def test_clipart_captions_use_the_task_level_category():
    caps = clipart_captions({"category": "computer/icons/flat-theme/action", "caption": "go next arrow"})
    assert "a clip art of icons." in caps and "go next arrow" in caps
    assert "a clip art of action icons." in caps
    assert "a clip art of map symbols." in clipart_captions({"category": "signs_and_symbols/map_symbols", "caption": "x"})


def test_describing_captions_name_what_the_picture_shows_in_one_phrasing():
    assert describing_captions(WAVE) == ["an emoji of waving hand."]  # the base name, not the tone
    assert describing_captions({"category": "computer/icons/flat-theme/action", "caption": "go next arrow"}) == [
        "a clip art of icons.", "a clip art of action icons."]
    assert describing_captions({"category": "animals", "caption": "cat"}) == ["a clip art of animals."]
    assert describing_captions({"label": "", "style": "twitter"}) == []


def test_describing_ids_index_the_rows_own_captions(tmp_path):
    meta = _write(tmp_path, ["twitter", "google"])
    pairs = load_pairs([str(meta)], tmp_path, styles=["twitter", "google"], train_split_tasks={})
    for ids, describing in zip(pairs.caption_ids, pairs.describing_ids):
        assert [pairs.captions[i] for i in describing] == ["an emoji of waving hand."]
        assert set(describing) <= set(ids)  # no caption ITC never sees


def _write(tmp_path, styles):
    rows = []
    (tmp_path / "images").mkdir()
    for i, style in enumerate(styles):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        rows.append({**WAVE, "image": f"images/{i}.png", "style": style})
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return meta


def test_held_out_style_never_loaded(tmp_path):
    meta = _write(tmp_path, ["twitter", "facebook", "google", "facebook"])
    pairs = load_pairs([str(meta)], tmp_path, styles=["twitter", "google", "facebook"], train_split_tasks={})
    assert pairs.styles == ["twitter", "google"]
    with pytest.raises(VlkitError, match="no training rows"):
        load_pairs([str(meta)], tmp_path, styles=["facebook"], train_split_tasks={})
    with pytest.raises(VlkitError, match="vlkit data build"):
        load_pairs(["no-such-dataset"], tmp_path, styles=["twitter"])


def test_caption_draws_are_a_function_of_the_step():
    ids = [[0, 1, 2], [3], [4, 5]]
    rows = torch.tensor([2, 0, 1, 0] * 300)
    a = sample_captions(ids, rows, step_generator(0, 1, 7))
    assert torch.equal(a, sample_captions(ids, rows, step_generator(0, 1, 7)))  # same (seed, epoch, step): same draw
    for other in [(0, 1, 8), (0, 2, 7), (1, 1, 7)]:  # any other step, epoch or seed: another draw
        assert not torch.equal(a, sample_captions(ids, rows, step_generator(*other))), other
    assert (a[2::4] == 3).all()  # a row with one caption always gets it
    # uniform among a row's captions, the last one included: 600 draws from 3, 300 from 2
    three, two = torch.cat([a[1::4], a[3::4]]), a[0::4]
    assert torch.bincount(three, minlength=6).tolist() == pytest.approx([200, 200, 200, 0, 0, 0], abs=45)
    assert torch.bincount(two, minlength=6).tolist() == pytest.approx([0, 0, 0, 0, 150, 150], abs=40)


def test_augment_identity_and_flip_are_exact():
    x = torch.rand(3, 3, 8, 8)
    ident = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]] * 3)
    assert torch.allclose(augment.apply(x, ident), x, atol=1e-5)
    flip = torch.tensor([[1.0, 1.0, 0.0, 0.0, -1.0]] * 3)
    out = augment.apply(x, flip, flip_ok=torch.tensor([True, False, True]))
    assert torch.allclose(out[0], x[0].flip(-1), atol=1e-5) and torch.allclose(out[1], x[1], atol=1e-5)
    assert torch.allclose(augment.apply_color(x, torch.ones(3, 3)), x, atol=1e-6)

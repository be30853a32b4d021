"""open_clip backend against the real open_clip package, on a tiny random ViT config.

`make setup` installs open_clip_torch with --no-deps. Its torchvision is not
installable beside vlkit's CPU torch, so `open_clip_import` imports open_clip with
stand-ins for the torchvision names it imports at module level (see there: model
construction, tokenizer and encoders use none of them, and any use raises). So
here, with the same weights file: `load_model("open_clip:ARCH:FILE")` against
open_clip's own `create_model`, tokenizer, `encode_image` and `encode_text`, the
embedding path, and the preprocessing against open_clip's documented eval
transform (its preprocess config for the model: resize the shortest side with
bicubic, center crop with torchvision's rounded offset, RGB, /255, OpenAI
mean/std), written out here with PIL and numpy. Only the pixel-for-pixel
comparison with open_clip's torchvision transform needs a real torchvision and
skips without one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip_import import forget, import_open_clip
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.models import load_model

ARCH = "vlkit-test-tiny-oc"
SIZE = 32
TEXTS = ["a photo of a cat.", "a red heart", "an emoji of a smiling face with big eyes", "x"]


@pytest.fixture(scope="module")
def open_clip():
    module, real_torchvision = import_open_clip()
    yield module, real_torchvision
    forget()


@pytest.fixture(scope="module")
def tiny_open_clip(open_clip, tmp_path_factory):
    oc, _ = open_clip
    folder = tmp_path_factory.mktemp("oc")
    (folder / f"{ARCH}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }))
    oc.add_model_config(folder)
    torch.manual_seed(0)
    ref = oc.create_model(ARCH)
    weights = folder / "weights.pt"
    torch.save(ref.state_dict(), weights)
    return ref.eval(), oc.get_tokenizer(ARCH), load_model(f"open_clip:{ARCH}:{weights}"), weights


def _images():
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(32, 32), (45, 37), (37, 46), (90, 33)]]
    return [*rgb, Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8), mode="L")]


def _documented_eval_transform(image: Image.Image, cfg: dict) -> torch.Tensor:
    """open_clip's eval transform for resize_mode 'shortest': Resize(size) (long side
    int(size * long / short)), CenterCrop(size) (offset int(round(excess / 2))),
    convert('RGB'), ToTensor, Normalize(mean, std)."""
    size = cfg["size"][0]
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.Resampling.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]


def test_preprocessing_is_open_clips_documented_eval_transform(open_clip, tiny_open_clip):
    oc, _ = open_clip
    ref, _, model, _ = tiny_open_clip
    cfg = oc.get_model_preprocess_cfg(ref)
    assert (cfg["size"], cfg["interpolation"], cfg["resize_mode"]) == ((SIZE, SIZE), "bicubic", "shortest")
    assert tuple(cfg["mean"]) == oc.OPENAI_DATASET_MEAN and tuple(cfg["std"]) == oc.OPENAI_DATASET_STD
    described = model.preprocess.describe()
    assert (described["resize"], described["size"], described["crop_size"], described["resample"]) == ("shortest_edge", SIZE, [SIZE, SIZE], "bicubic")
    for image in _images():
        torch.testing.assert_close(model.preprocess(image), _documented_eval_transform(image, cfg), atol=1e-6, rtol=0)


def test_preprocessing_equals_open_clips_torchvision_transform(open_clip, tiny_open_clip):
    oc, real_torchvision = open_clip
    if not real_torchvision:
        pytest.skip("needs a torchvision that imports beside this torch (open_clip's transform is torchvision code)")
    ref, _, model, _ = tiny_open_clip
    ref_preprocess = oc.image_transform(SIZE, is_train=False)
    for image in _images():
        torch.testing.assert_close(model.preprocess(image), ref_preprocess(image), atol=1e-6, rtol=0)


def test_image_features_are_open_clips(tiny_open_clip):
    ref, _, model, _ = tiny_open_clip
    px = torch.stack([model.preprocess(im) for im in _images()])
    with torch.no_grad():
        ours = model.encode_image(px)
        theirs = F.normalize(ref.encode_image(px), dim=-1)
        raw = model.encode_image(px, normalize=False)
    assert ours.shape == (len(px), 16) and model.embed_dim == 16
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(raw, ref.encode_image(px).detach(), atol=1e-5, rtol=0)


def test_text_features_and_embedding_path_are_open_clips(tiny_open_clip):
    ref, ref_tokenizer, model, _ = tiny_open_clip
    batch = model.tokenize(TEXTS)
    assert torch.equal(batch.input_ids, ref_tokenizer(TEXTS))
    # the mask ends at each text's end-of-text token
    assert batch.attention_mask.sum(1).tolist() == [len(ref_tokenizer.encode(t)) + 2 for t in TEXTS]
    with torch.no_grad():
        ours = model.encode_text(batch.input_ids, batch.attention_mask)
        theirs = F.normalize(ref.encode_text(ref_tokenizer(TEXTS)), dim=-1)
        by_embeds = model.encode_text_embeddings(model.token_embedding(batch.input_ids), batch.attention_mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(ours, by_embeds)
    assert model.logit_scale.item() == pytest.approx(ref.logit_scale.exp().item())
    assert model.tokenizer.tokens("a photo") == ref_tokenizer.encode("a photo")
    assert model.tokenizer.id_to_token(ref_tokenizer.encode("cat")[0]) == "cat</w>"


def test_fingerprint_follows_the_weights(tiny_open_clip, tmp_path):
    ref, _, model, weights = tiny_open_clip
    assert load_model(f"open_clip:{ARCH}:{weights}").fingerprint() == model.fingerprint()
    state = ref.state_dict()
    state["text_projection"] = state["text_projection"] + 1e-3
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert load_model(f"open_clip:{ARCH}:{other}").fingerprint() != model.fingerprint()


def test_specs_that_cannot_load_offline_are_one_clear_line(tiny_open_clip, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    cases = [
        (f"open_clip:{ARCH}:{tmp_path / 'missing.pt'}", "does not exist"),
        (f"open_clip:{ARCH}:no-such-tag", "neither a file nor a pretrained tag"),
        ("open_clip:ViT-B-32:laion2b_s34b_b79k", "not in the local Hugging Face cache"),
        ("open_clip:vlkit-no-such-arch", "could not build it offline"),
        ("open_clip:", "give an architecture"),
    ]
    for spec, message in cases:
        with pytest.raises(VlkitError, match=message) as exc:
            load_model(spec)
        assert "\n" not in str(exc.value)

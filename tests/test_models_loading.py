"""load_model: spec resolution, offline folders, vlkit's own format, tokenizer and fingerprint
behaviour, and one clear error per bad spec."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_tiny_bert_folder
from vlkit.errors import VlkitError
from vlkit.models import EMBEDDED, VLModel, build_vlkit_dual_encoder, load_model, save_vlkit_dual_encoder

TINY_VIT = {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8}


def test_fixtures_load_as_vlmodels(tiny_clip_model, tiny_dual_model):
    assert isinstance(tiny_clip_model, VLModel) and isinstance(tiny_dual_model, VLModel)
    assert tiny_clip_model.text_pooling == "eot"
    assert tiny_dual_model.text_pooling == "pooler"
    assert tiny_clip_model.embed_dim == tiny_dual_model.embed_dim == 16
    assert not tiny_clip_model.training and tiny_clip_model.device.type == "cpu"


# ------------------------------------------------------------------ errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_path_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(VlkitError, match="does not exist") as exc:
        load_model(str(missing))
    assert str(missing) in _one_line(exc)


def test_wrong_kind_of_checkpoint_names_what_it_holds(tmp_path):
    bert = build_tiny_bert_folder(tmp_path / "bert")
    with pytest.raises(VlkitError) as exc:
        load_model(str(bert))
    msg = _one_line(exc)
    assert "'bert'" in msg and str(bert) in msg and "clip" in msg


def test_folder_without_config_and_file_instead_of_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlkitError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(VlkitError, match="is a file"):
        load_model(str(tmp_path / "w.bin"))


def test_weights_of_another_checkpoint_are_refused_not_randomly_filled(tmp_path, tiny_clip_dir, tiny_dual_dir):
    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    shutil.copy(tiny_dual_dir / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(VlkitError, match="do not fit its CLIPModel config") as exc:
        load_model(str(folder))
    assert str(folder) in _one_line(exc)


def test_truncated_weights_file_is_one_clear_error(tmp_path, tiny_clip_dir):
    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VlkitError, match="cannot load the CLIPModel weights") as exc:
        load_model(str(folder))
    _one_line(exc)


def test_checkpoint_without_tokenizer_says_so(tmp_path, tiny_clip_dir):
    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(VlkitError, match="tokenizer") as exc:
        load_model(str(folder))
    assert str(folder) in _one_line(exc)


def test_checkpoint_without_image_processor_says_so(tmp_path, tiny_dual_dir):
    folder = tmp_path / "dual"
    shutil.copytree(tiny_dual_dir, folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(VlkitError, match="preprocessor_config.json"):
        load_model(str(folder))


def test_hf_id_not_in_local_cache_is_not_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VlkitError, match="not in the local Hugging Face cache") as exc:
        load_model("vlkit-tests/no-such-model")
    assert "vlkit-tests/no-such-model" in _one_line(exc)


def test_unknown_spec_lists_what_was_looked_for():
    with pytest.raises(VlkitError, match="not found") as exc:
        load_model("no such thing")
    assert "vlkit-tiny" in _one_line(exc) and "open_clip" in str(exc.value)


def test_missing_vlkit_tiny_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(EMBEDDED, "vlkit-tiny", tmp_path / "vlkit-tiny")
    with pytest.raises(VlkitError, match="vlkit-tiny") as exc:
        load_model("vlkit-tiny")
    assert str(tmp_path / "vlkit-tiny" / "config.json") in _one_line(exc)


def test_open_clip_missing_extra_is_one_line():
    try:
        import open_clip  # noqa: F401
    except ImportError as missing:
        # make setup installs open_clip without its torchvision: the message says which of the two is missing
        said = "torchvision, which it imports, is not" if missing.name == "torchvision" else "extra is not installed"
        with pytest.raises(VlkitError, match=r"pip install 'vlkit\[open_clip\]'") as exc:
            load_model("open_clip:ViT-B-32")
        assert said in _one_line(exc)
    else:
        pytest.skip("open_clip is installed with torchvision; its behaviour is tested in test_models_open_clip.py")


# ------------------------------------------------------------------ vlkit format


@pytest.fixture(scope="module")
def text_tower_dir(tmp_path_factory):
    return build_tiny_bert_folder(tmp_path_factory.mktemp("st_bert"), sentence_pooling="mean")


def _features(model):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    batch = model.tokenize(["a red heart", "a photo of a cat"])
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(batch.input_ids, batch.attention_mask)


def test_vlkit_format_round_trip_references_a_locked_text_tower(tmp_path, text_tower_dir):
    model = build_vlkit_dual_encoder(TINY_VIT, text_tower=text_tower_dir, projection_dim=16, context_length=20)
    with torch.no_grad():
        model.log_logit_scale.fill_(3.0)
    folder = save_vlkit_dual_encoder(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "vlkit-dual-encoder" and config["text_weights"] == "source"
    assert config["text_pooling"] == "mean" and config["context_length"] == 20
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("text_model.") for k in keys)
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= keys

    loaded = load_model(str(folder))
    assert loaded.logit_scale.item() == pytest.approx(torch.e**3, rel=1e-6)
    assert loaded.tokenizer.context_length == 20
    assert loaded.fingerprint() == model.eval().fingerprint()
    for a, b in zip(_features(model), _features(loaded)):
        assert torch.equal(a, b)


def test_vlkit_format_includes_a_trained_text_tower(tmp_path, text_tower_dir):
    model = build_vlkit_dual_encoder(TINY_VIT, text_tower=text_tower_dir, projection_dim=16)
    with torch.no_grad():
        model.text_model.encoder.layer[0].output.dense.bias.add_(0.5)
    folder = save_vlkit_dual_encoder(model, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["text_weights"] == "included"
    loaded = load_model(str(folder))
    for a, b in zip(_features(model.eval()), _features(loaded)):
        assert torch.equal(a, b)


def test_vlkit_format_refuses_a_changed_text_tower_source(tmp_path, text_tower_dir):
    source = tmp_path / "bert"
    shutil.copytree(text_tower_dir, source)
    model = build_vlkit_dual_encoder(TINY_VIT, text_tower=source, projection_dim=16)
    folder = save_vlkit_dual_encoder(model, tmp_path / "m")
    build_tiny_bert_folder(source, seed=1, sentence_pooling="mean")  # the "package" now ships other weights
    with pytest.raises(VlkitError, match="other weights") as exc:
        load_model(str(folder))
    _one_line(exc)


def test_vlkit_format_with_incomplete_config_is_one_clear_error(tmp_path, text_tower_dir):
    model = build_vlkit_dual_encoder(TINY_VIT, text_tower=text_tower_dir, projection_dim=16)
    folder = save_vlkit_dual_encoder(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["text_pooling"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VlkitError, match="missing text_pooling") as exc:
        load_model(str(folder))
    _one_line(exc)


def test_embedded_name_loads_its_folder(monkeypatch, tmp_path, text_tower_dir):
    model = build_vlkit_dual_encoder(TINY_VIT, text_tower=text_tower_dir, projection_dim=16)
    save_vlkit_dual_encoder(model, tmp_path / "vlkit-tiny")
    monkeypatch.setitem(EMBEDDED, "vlkit-tiny", tmp_path / "vlkit-tiny")
    loaded = load_model("vlkit-tiny")
    assert loaded.spec == "vlkit-tiny" and loaded.kind == "vlkit-dual-encoder"


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_right_pads_with_mask_and_truncates_keeping_eot(tiny_clip_model):
    tok = tiny_clip_model.tokenizer
    hf = tok.hf
    batch = tok(["a cat", "a photo of a red heart"])
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.shape == mask.shape and ids.shape[1] == int(mask.sum(1).max())
    short = int(mask[0].sum())
    assert mask[0, :short].all() and not mask[0, short:].any()
    assert ids[0, 0] == hf.bos_token_id and ids[0, short - 1] == hf.eos_token_id
    long = tok(["cat " * 200])
    assert long.input_ids.shape[1] == tok.context_length
    assert long.input_ids[0, -1] == hf.eos_token_id


def test_tokenizer_tokens_without_specials_and_back(tiny_clip_model, tiny_dual_model):
    for model in (tiny_clip_model, tiny_dual_model):
        tok = model.tokenizer
        ids = tok.tokens("a photo")
        full = tok(["a photo"]).input_ids[0].tolist()
        assert full[1:-1] == ids  # the same ids, minus start and end tokens
        words = [tok.id_to_token(i) for i in ids]
        assert "".join(words).replace("</w>", "").replace("##", "") == "aphoto"
        assert tok.vocab_size > max(full)
    assert tiny_dual_model.tokenizer.vocab_size == 30522
    empty = tiny_clip_model.tokenizer([])
    assert empty.input_ids.shape[0] == 0


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable_and_changes_with_weights_and_preprocessing(tmp_path, tiny_clip_dir, tiny_clip_model):
    model = load_model(str(tiny_clip_dir))
    first = model.fingerprint()
    assert first == tiny_clip_model.fingerprint() == model.fingerprint()
    assert len(first) == 16
    original = model.visual_projection.weight[0, 0].item()
    with torch.no_grad():
        model.visual_projection.weight[0, 0] += 1e-3
    changed = model.fingerprint()
    assert changed != first
    with torch.no_grad():
        model.visual_projection.weight[0, 0] = original  # the exact bits back: a function of the weights, not a memo
    assert model.fingerprint() == first

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg["resample"] = 2  # bilinear instead of bicubic
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    other = load_model(str(folder))
    assert other.preprocess.describe()["resample"] == "bilinear"
    assert other.fingerprint() != first


def test_fingerprint_differs_between_checkpoints(tiny_clip_model, tiny_dual_model):
    assert tiny_clip_model.fingerprint() != tiny_dual_model.fingerprint()

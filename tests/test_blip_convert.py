"""Saving and loading BLIP: transformers folders (export, import, halves), vlkit-blip folders, original .pth files."""

from __future__ import annotations

import os

import pytest
import torch

from blip_tiny import pixels, save_tiny_hf_blip, tiny_blip_model
from vlkit.blip.checkpoint import blip_preprocess, export_hf, load_blip, load_hf, save_blip
from vlkit.blip.convert import hf_to_original_name, load_original, original_to_hf_name, save_original
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError

TEXTS = ["a dog running on the beach", "two cats"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def tok():
    return BlipTokenizer.from_minilm()


@pytest.fixture(scope="module")
def model():
    return tiny_blip_model(seed=3)


@pytest.fixture(scope="module")
def exported(model, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    written = export_hf(model, tok, blip_preprocess(32, *IMAGENET), folder)
    return folder, written


@torch.no_grad()
def outputs(m, tok):
    """Everything a BlipModel computes from weights: image tokens, ITC, ITM, LM (those it has)."""
    text, px = tok(TEXTS), pixels(2)
    e = m.image_embeds(px)
    out = {"embeds": e}
    if m.has_encoder:
        out["itc"] = m.image_feat(e) @ m.text_feat(text.input_ids, text.attention_mask).T
        out["itm"] = m.itm_logits(e, text.input_ids, text.attention_mask)
        out["temp"] = m.temp.detach().clone()
    if m.has_decoder:
        out["lm"] = m.lm_loss(e, text.input_ids, text.attention_mask, prompt_length=2, reduction="none")
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- transformers folders


def test_export_loads_in_transformers_unchanged_and_matches(model, tok, exported):
    from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

    folder, written = exported
    assert set(written) == {"retrieval", "captioning"}
    text, px = tok(TEXTS), pixels(2)
    mine = outputs(model, tok)
    for name, cls in (("retrieval", BlipForImageTextRetrieval), ("captioning", BlipForConditionalGeneration)):
        hf, info = cls.from_pretrained(str(folder / name), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        processor = AutoProcessor.from_pretrained(str(folder / name))
        assert tuple(processor.image_processor.image_mean) == IMAGENET[0]
        assert processor.tokenizer.convert_tokens_to_ids("[ENC]") == 30523
        hf.eval()
        with torch.no_grad():
            if name == "retrieval":
                itc = hf(input_ids=text.input_ids, pixel_values=px, attention_mask=text.attention_mask, use_itm_head=False).itm_score
                enc = text.input_ids.clone()
                enc[:, 0] = 30523
                itm = hf(input_ids=enc, pixel_values=px, attention_mask=text.attention_mask).itm_score
                assert (itc - mine["itc"]).abs().max() <= 1e-5 and (itm - mine["itm"]).abs().max() <= 1e-5
                assert hf.config.vlkit["temp"] == pytest.approx(0.0625)
            else:
                dec = text.input_ids.clone()
                dec[:, 0] = 30522
                labels = dec.masked_fill(dec == 0, -100)
                labels[:, :2] = -100
                hf.text_decoder.label_smoothing = 0.1
                loss = hf(pixel_values=px, input_ids=dec, attention_mask=text.attention_mask, labels=labels).loss
                expected = mine["lm"].sum() / (labels[:, 1:] != -100).sum()
                assert abs(loss.item() - expected.item()) <= 1e-5


def test_exported_pair_loads_back_into_one_model(model, tok, exported):
    folder, _ = exported
    loaded = load_blip(str(folder))
    assert loaded.model.has_encoder and loaded.model.has_decoder and loaded.kind == "hf-blip"
    assert_same(outputs(loaded.model, tok), outputs(model, tok))
    m = loaded.model
    assert m.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight is m.text_encoder.encoder.layer[0].crossattention.self.key.weight
    assert loaded.preprocess.config == blip_preprocess(32, *IMAGENET)
    assert loaded.tokenizer.enc_token_id == m.enc_token_id == 30523


def test_one_half_loads_alone_and_lacks_the_other(model, tok, exported):
    folder, _ = exported
    ret = load_blip(str(folder / "retrieval"))
    assert ret.model.has_encoder and not ret.model.has_decoder
    mine = outputs(model, tok)
    got = outputs(ret.model, tok)
    assert all(torch.equal(got[k], mine[k]) for k in got)
    with pytest.raises(VlkitError, match="no text decoder") as err:
        text = tok(TEXTS[:1])
        ret.model.lm_loss(ret.model.image_embeds(pixels(1)), text.input_ids, text.attention_mask)
    assert "\n" not in str(err.value)
    cap = load_hf(captioning=folder / "captioning")
    assert cap.model.has_decoder and not cap.model.has_encoder
    assert torch.equal(outputs(cap.model, tok)["lm"], mine["lm"])
    with pytest.raises(VlkitError, match="retrieval one was expected"):
        load_hf(retrieval=folder / "captioning")


def test_halves_of_two_models_are_refused(tmp_path, exported):
    folder, _ = exported
    other_ret, other_cap = save_tiny_hf_blip(tmp_path, seed=7)
    with pytest.raises(VlkitError, match="not two halves of one BLIP model") as err:
        load_hf(retrieval=folder / "retrieval", captioning=other_cap)
    assert "vision_model." in str(err.value) and "\n" not in str(err.value)


@torch.no_grad()
def test_checkpoints_written_by_transformers_load(tmp_path, tok):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    ret_dir, cap_dir = save_tiny_hf_blip(tmp_path, seed=2)
    loaded = load_hf(ret_dir, cap_dir)
    assert any("temperature" in n for n in loaded.notes)  # transformers' retrieval class stores no temp
    assert loaded.model.temp.item() == pytest.approx(0.07)
    ret = BlipForImageTextRetrieval.from_pretrained(str(ret_dir)).eval()
    cap = BlipForConditionalGeneration.from_pretrained(str(cap_dir)).eval()
    text, px = tok(TEXTS), pixels(2)
    m = loaded.model
    itc = ret(input_ids=text.input_ids, pixel_values=px, attention_mask=text.attention_mask, use_itm_head=False).itm_score
    assert (m.image_feat(m.image_embeds(px)) @ m.text_feat(text.input_ids, text.attention_mask).T - itc).abs().max() <= 1e-5
    dec = text.input_ids.clone()
    dec[:, 0] = 30522
    ref = cap(pixel_values=px, input_ids=dec, attention_mask=text.attention_mask, labels=dec.masked_fill(dec == 0, -100)).loss
    assert abs(m.lm_loss(m.image_embeds(px), text.input_ids, text.attention_mask, label_smoothing=0.0).item() - ref.item()) <= 1e-5


def test_clip_folder_is_refused_naming_what_it_is(tiny_clip_dir):
    with pytest.raises(VlkitError) as err:
        load_blip(str(tiny_clip_dir))
    message = str(err.value)
    assert "'clip'" in message and "BLIP needs a Hugging Face BLIP folder" in message and "\n" not in message


def test_unknown_spec_is_one_line():
    with pytest.raises(VlkitError, match="not found") as err:
        load_blip("no/such-blip-model-here")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- vlkit-blip folders


def test_vlkit_folder_round_trips_with_its_preprocessing(model, tok, tmp_path):
    from safetensors import safe_open

    save_blip(model, tok, blip_preprocess(32, *IMAGENET, resample="bilinear"), tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == len(model.state_dict()) and "text_decoder.cls.predictions.decoder.weight" not in keys
    loaded = load_blip(str(tmp_path / "m"))
    assert loaded.kind == "vlkit-blip"
    assert_same(outputs(loaded.model, tok), outputs(model, tok))
    described = loaded.preprocess.describe()
    assert tuple(described["mean"]) == IMAGENET[0] and described["resample"] == "bilinear" and described["size"] == [32, 32]


def test_vlkit_folder_with_foreign_weights_is_refused(model, tok, tmp_path):
    save_blip(model, tok, blip_preprocess(32), tmp_path / "m")
    from vlkit import io

    io.save_safetensors(tmp_path / "m" / "model.safetensors", {"vision_model.x": torch.zeros(1)})
    with pytest.raises(VlkitError, match="does not fit its config"):
        load_blip(str(tmp_path / "m"))


# ---------------------------------------------------------------- original BLIP .pth


def test_original_names_are_blips():
    assert hf_to_original_name("vision_model.encoder.layers.3.self_attn.qkv.weight") == "visual_encoder.blocks.3.attn.qkv.weight"
    assert hf_to_original_name("vision_model.encoder.layers.0.self_attn.projection.bias") == "visual_encoder.blocks.0.attn.proj.bias"
    assert hf_to_original_name("vision_model.post_layernorm.weight") == "visual_encoder.norm.weight"
    assert hf_to_original_name("vision_model.embeddings.position_embedding") == "visual_encoder.pos_embed"
    assert hf_to_original_name("vision_model.embeddings.class_embedding") == "visual_encoder.cls_token"
    assert hf_to_original_name("vision_model.embeddings.patch_embedding.weight") == "visual_encoder.patch_embed.proj.weight"
    assert hf_to_original_name("vision_model.encoder.layers.11.layer_norm2.bias") == "visual_encoder.blocks.11.norm2.bias"
    name = "text_encoder.encoder.layer.0.crossattention.self.query.weight"
    assert hf_to_original_name(name) == name and original_to_hf_name(name) == name
    assert original_to_hf_name("visual_encoder.blocks.2.mlp.fc1.weight") == "vision_model.encoder.layers.2.mlp.fc1.weight"
    for skipped in ("visual_encoder_m.blocks.0.attn.qkv.weight", "text_encoder_m.embeddings.word_embeddings.weight", "image_queue",
                    "queue_ptr", "text_encoder.embeddings.position_ids"):
        assert original_to_hf_name(skipped) is None
    with pytest.raises(KeyError):
        original_to_hf_name("visual_encoder.head.weight")


@pytest.fixture(scope="module")
def wide():
    """64-wide heads, as BLIP's: the .pth loader infers the head count from the width."""
    return tiny_blip_model(seed=4, width=64, heads=1)


def test_pth_round_trip_gives_identical_outputs(wide, tok, tmp_path):
    path = tmp_path / "model_base.pth"
    save_original(wide, path)
    raw = torch.load(str(path), weights_only=True)["model"]
    assert "visual_encoder.blocks.1.attn.qkv.weight" in raw and "text_decoder.cls.predictions.decoder.weight" in raw
    assert "text_decoder.bert.encoder.layer.1.crossattention.output.dense.weight" in raw  # the tie saved under both names
    loaded = load_original(path)
    assert loaded.kind == "blip-original" and loaded.model.vision_config.layer_norm_eps == 1e-6
    assert loaded.model.vision_config.image_size == 32 and loaded.model.vision_config.num_attention_heads == 1
    assert_same(outputs(loaded.model, tok), outputs(wide, tok))
    assert loaded.preprocess.config == blip_preprocess(32)  # BLIP's: bicubic resize, CLIP mean/std


def test_pth_pretraining_layout_skips_momentum_and_queues(wide, tok, tmp_path):
    path = tmp_path / "model_base.pth"
    save_original(wide, path)
    obj = torch.load(str(path), weights_only=True)
    state = obj["model"]
    for name in [k for k in state if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."))]:
        head, rest = name.split(".", 1)
        state[f"{head}_m.{rest}"] = state[name].clone() + 1
    state["image_queue"], state["text_queue"] = torch.randn(16, 8), torch.randn(16, 8)
    state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"model": state, "epoch": 19, "config": {"queue_size": 8}}, str(path))
    loaded = load_blip(str(path))
    assert loaded.notes and "momentum" in loaded.notes[0]
    assert_same(outputs(loaded.model, tok), outputs(wide, tok))


def test_pth_retrieval_only_and_caption_only(wide, tok, tmp_path):
    path = tmp_path / "m.pth"
    save_original(wide, path)
    full = torch.load(str(path), weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in full.items() if not k.startswith("text_decoder.")}}, str(tmp_path / "ret.pth"))
    torch.save({k: v for k, v in full.items() if k.startswith(("visual_encoder.", "text_decoder."))}, str(tmp_path / "cap.pth"))
    ret = load_original(tmp_path / "ret.pth")
    cap = load_original(tmp_path / "cap.pth")
    assert ret.model.has_encoder and not ret.model.has_decoder and cap.model.has_decoder and not cap.model.has_encoder
    mine = outputs(wide, tok)
    assert torch.equal(outputs(ret.model, tok)["itm"], mine["itm"]) and torch.equal(outputs(cap.model, tok)["lm"], mine["lm"])


class Payload:
    """Anything that is not a tensor: weights_only loading must refuse to build it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_object_is_refused_in_one_line(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": Payload()}, str(path))
    with pytest.raises(VlkitError, match="refused") as err:
        load_blip(str(path))
    assert "\n" not in str(err.value) and "weights_only=True" in str(err.value) and "getcwd" in str(err.value)


def test_broken_or_foreign_pth_is_one_line(tmp_path):
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(VlkitError, match="cannot be read") as err:
        load_blip(str(tmp_path / "cut.pth"))
    assert "\n" not in str(err.value)
    torch.save({"model": {"visual_encoder.head.weight": torch.zeros(2)}}, str(tmp_path / "other.pth"))
    with pytest.raises(VlkitError, match="not BLIP's"):
        load_blip(str(tmp_path / "other.pth"))
    torch.save([1, 2, 3], str(tmp_path / "list.pth"))
    with pytest.raises(VlkitError, match="no state dict"):
        load_blip(str(tmp_path / "list.pth"))



def test_blip_kind_reads_configs_not_weights(wide, tok, exported, tmp_path, tiny_clip_dir):
    from vlkit.blip.checkpoint import blip_kind

    folder, _ = exported
    assert blip_kind(str(folder)) == "full"
    assert blip_kind(str(folder / "retrieval")) == "retrieval" and blip_kind(folder / "captioning") == "captioning"
    save_blip(wide, tok, blip_preprocess(32), tmp_path / "v")
    assert blip_kind(tmp_path / "v") == "full"
    save_original(wide, tmp_path / "m.pth")
    assert blip_kind(tmp_path / "m.pth") == "full"
    full = torch.load(str(tmp_path / "m.pth"), weights_only=True)["model"]
    legacy = {k: v for k, v in full.items() if not k.startswith("text_decoder.")}
    torch.save({"model": legacy}, str(tmp_path / "old.pth"), _use_new_zipfile_serialization=False)  # cannot be mmapped
    assert blip_kind(tmp_path / "old.pth") == "retrieval"
    with pytest.raises(VlkitError, match="holds a 'clip' checkpoint") as err:
        blip_kind(tiny_clip_dir)
    assert "\n" not in str(err.value)

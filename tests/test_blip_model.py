"""BlipTokenizer, pre_caption and BlipModel: parity with transformers' BLIP forwards on tiny random weights.

Parity means vlkit's ITC similarities, ITM logits and LM loss equal transformers'
`BlipForImageTextRetrieval` / `BlipForConditionalGeneration` forwards on the same
weights within 1e-5, where transformers is given the inputs original BLIP builds
([ENC]-first ids for ITM; [DEC]-first ids and -100 labels for LM), and differ
from transformers' default forwards, which do neither.
"""

from __future__ import annotations

import copy

import pytest
import torch

from blip_tiny import pixels, tiny_configs, tiny_hf_blip, vlkit_from_hf
from vlkit.blip.model import BlipModel
from vlkit.blip.tokenizer import BlipTokenizer, pre_caption
from vlkit.errors import VlkitError

TOL = 1e-5
TEXTS = ["a dog running on the beach", "two cats", "a red heart emoji with a small sparkle"]


@pytest.fixture(scope="module")
def tok() -> BlipTokenizer:
    return BlipTokenizer.from_minilm()


@pytest.fixture(scope="module")
def hf_pair():
    return tiny_hf_blip(seed=0)


@pytest.fixture(scope="module")
def model(hf_pair) -> BlipModel:
    return vlkit_from_hf(*hf_pair)


@pytest.fixture(scope="module")
def batch(tok):
    return tok(TEXTS[:2]), pixels(2)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_are_blips(tok):
    assert (tok.dec_token_id, tok.enc_token_id) == (30522, 30523)
    assert tok.bos_token_id == 30522 and tok.vocab_size == 30524
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) == (101, 102, 0)
    # the ids transformers' BLIP conversion checks for "a picture of" ([CLS] a picture of [SEP])
    assert tok(["a picture of"]).input_ids[0].tolist() == [101, 1037, 3861, 1997, 102]
    assert tok.tokens("[ENC] [DEC]") == [30523, 30522]  # specials stay whole


def test_tokenizer_pads_right_and_truncates_keeping_sep(tok):
    b = tok(["a dog", "a dog on a very long beach"], max_length=5)
    assert b.input_ids.shape == (2, 5)
    assert b.input_ids[0].tolist() == [101, 1037, 3899, 102, 0] and b.attention_mask[0].tolist() == [1, 1, 1, 1, 0]
    assert b.input_ids[1, -1].item() == 102
    fixed = tok(["a dog"], max_length=8, padding="max_length")
    assert fixed.input_ids.shape == (1, 8)


def test_tokenizer_round_trips_through_transformers(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.bos_token == "[DEC]" and hf.convert_tokens_to_ids("[ENC]") == 30523 and len(hf) == 30524
    assert hf("[ENC] a dog")["input_ids"] == [101, 30523, 1037, 3899, 102]
    again = BlipTokenizer.from_pretrained(tmp_path)
    assert (again.dec_token_id, again.enc_token_id) == (30522, 30523)
    assert again(TEXTS).input_ids.tolist() == tok(TEXTS).input_ids.tolist()


@pytest.mark.parametrize(
    "raw, max_words, clean",
    [
        ("A Dog, running!!  on the BEACH.", 50, "a dog, running on the beach"),  # only .!"()*#:;~ become spaces
        ('"Quoted" (text) *with* #tags: ~yes; ok', 50, "quoted text with tags yes ok"),
        ("it's a well-known cat/dog", 50, "it's a well-known cat/dog"),  # apostrophes, hyphens, slashes stay
        ("  leading and trailing  \n", 50, "leading and trailing"),
        ("one two three four", 2, "one two"),
        ("a\tb", 50, "a\tb"),  # a single whitespace character is kept as it is
        ("end.\n", 50, "end"),
    ],
)
def test_pre_caption_follows_blip(raw, max_words, clean):
    assert pre_caption(raw, max_words) == clean


# ---------------------------------------------------------------- structure


def test_decoder_shares_all_but_self_attention(model):
    enc, dec = model.text_encoder, model.text_decoder.bert
    for i in range(len(enc.encoder.layer)):
        le, ld = enc.encoder.layer[i], dec.encoder.layer[i]
        assert ld.crossattention.self.key.weight is le.crossattention.self.key.weight
        assert ld.intermediate.dense.weight is le.intermediate.dense.weight
        assert ld.output.LayerNorm.bias is le.output.LayerNorm.bias
        assert ld.attention.self.query.weight is not le.attention.self.query.weight
    assert dec.embeddings.word_embeddings.weight is enc.embeddings.word_embeddings.weight
    head = model.text_decoder.cls.predictions
    assert head.decoder.weight is enc.embeddings.word_embeddings.weight and head.decoder.bias is head.bias


def test_state_dict_has_no_shared_tensors_and_round_trips(model, tmp_path, batch):
    from safetensors.torch import load_file, save_file

    state = model.state_dict()
    assert not any(k.startswith("text_decoder.bert.embeddings.") or ".crossattention." in k and k.startswith("text_decoder") for k in state)
    assert "text_decoder.cls.predictions.decoder.weight" not in state and "text_decoder.cls.predictions.bias" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))  # refuses shared storage
    fresh = BlipModel(model.vision_config, model.text_config, model.embed_dim)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))  # strict: the tied names are filled in
    fresh.eval()
    assert fresh.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight is fresh.text_encoder.encoder.layer[0].crossattention.self.key.weight
    text, px = batch
    e = model.image_embeds(px)
    with torch.no_grad():
        assert torch.equal(fresh.lm_loss(e, text.input_ids, text.attention_mask), model.lm_loss(e, text.input_ids, text.attention_mask))
        assert torch.equal(fresh.itm_logits(e, text.input_ids, text.attention_mask), model.itm_logits(e, text.input_ids, text.attention_mask))


def test_from_config_initialises_like_blip():
    vision, text = tiny_configs()
    torch.manual_seed(0)
    m = BlipModel.from_config(vision, text, 16)
    assert m.temp.item() == pytest.approx(0.07) and m.temp.shape == ()
    assert torch.all(m.text_decoder.cls.predictions.bias == 0)
    std = m.text_encoder.embeddings.word_embeddings.weight.std().item()
    assert 0.018 < std < 0.022  # BERT's normal(0, 0.02)
    pos = m.vision_model.embeddings.position_embedding
    assert 0.015 < pos.std().item() < 0.025 and pos.abs().max() < 2  # truncated normal 0.02, not transformers' 1e-10
    torch.manual_seed(0)
    again = BlipModel.from_config(vision, text, 16)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    assert m.text_decoder.bert.encoder.layer[1].output.dense.weight is m.text_encoder.encoder.layer[1].output.dense.weight


# ---------------------------------------------------------------- parity with transformers


@torch.no_grad()
def test_itc_equals_transformers_retrieval_forward(model, hf_pair, tok):
    ret, _ = hf_pair
    text, px = tok(TEXTS), pixels(2)
    ours = model.image_feat(model.image_embeds(px)) @ model.text_feat(text.input_ids, text.attention_mask).T
    theirs = ret(input_ids=text.input_ids, pixel_values=px, attention_mask=text.attention_mask, use_itm_head=False).itm_score
    assert ours.shape == (2, 3)
    assert (ours - theirs).abs().max().item() <= TOL


def _with_first(ids: torch.Tensor, token: int) -> torch.Tensor:
    ids = ids.clone()
    ids[:, 0] = token
    return ids


@torch.no_grad()
def test_itm_equals_transformers_with_enc_first(model, hf_pair, batch):
    ret, _ = hf_pair
    text, px = batch
    ours = model.itm_logits(model.image_embeds(px), text.input_ids, text.attention_mask)
    enc_ids = _with_first(text.input_ids, 30523)
    theirs = ret(input_ids=enc_ids, pixel_values=px, attention_mask=text.attention_mask, use_itm_head=True).itm_score
    assert (ours - theirs).abs().max().item() <= TOL
    # transformers' default retrieval forward keeps [CLS] first: vlkit (as original BLIP) does not
    default = ret(input_ids=text.input_ids, pixel_values=px, attention_mask=text.attention_mask, use_itm_head=True).itm_score
    assert (ours - default).abs().max().item() > 1e-3


def _labels(dec_ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    labels = dec_ids.masked_fill(dec_ids == 0, -100)
    labels[:, :prompt_length] = -100
    return labels


@pytest.mark.parametrize("prompt_length", [0, 3])
@pytest.mark.parametrize("smoothing", [0.1, 0.0])
@torch.no_grad()
def test_lm_loss_equals_transformers_with_dec_first_and_masked_labels(model, hf_pair, batch, prompt_length, smoothing):
    _, cap = hf_pair
    cap = copy.copy(cap)
    text, px = batch
    dec_ids = _with_first(text.input_ids, 30522)
    labels = _labels(dec_ids, prompt_length)
    cap.text_decoder.label_smoothing = smoothing
    try:
        ours = model.lm_loss(model.image_embeds(px), text.input_ids, text.attention_mask, prompt_length, smoothing)
        theirs = cap(pixel_values=px, input_ids=dec_ids, attention_mask=text.attention_mask, labels=labels).loss
        per_caption = model.lm_loss(model.image_embeds(px), text.input_ids, text.attention_mask, prompt_length, smoothing, "none")
        theirs_none = cap.text_decoder(
            input_ids=dec_ids, attention_mask=text.attention_mask, encoder_hidden_states=cap.vision_model(px).last_hidden_state,
            labels=labels, reduction="none",
        ).loss
    finally:
        cap.text_decoder.label_smoothing = 0.0
    assert abs(ours.item() - theirs.item()) <= TOL
    assert per_caption.shape == (2,) and (per_caption - theirs_none).abs().max().item() <= TOL * 10  # sums of ~8 tokens
    # transformers' default captioning forward: [CLS] first, pads and prompt in the labels
    cap.text_decoder.label_smoothing = smoothing
    try:
        default = cap(pixel_values=px, input_ids=text.input_ids, attention_mask=text.attention_mask, labels=text.input_ids).loss
    finally:
        cap.text_decoder.label_smoothing = 0.0
    assert abs(ours.item() - default.item()) > 1e-3


@torch.no_grad()
def test_mean_is_token_weighted_over_the_batch(model, batch):
    text, px = batch
    e = model.image_embeds(px)
    mean = model.lm_loss(e, text.input_ids, text.attention_mask)
    sums = model.lm_loss(e, text.input_ids, text.attention_mask, reduction="none")
    n_targets = (text.attention_mask[:, 1:] == 1).sum()
    assert abs(mean.item() - (sums.sum() / n_targets).item()) <= TOL


@torch.no_grad()
def test_decoder_follows_perturbed_encoder_weights(hf_pair, batch):
    """A change to a shared encoder tensor reaches the decoder: the LM loss still equals transformers'
    decoder with that change applied to its own copy (fails when the tie is broken)."""
    ret, cap = hf_pair
    model = vlkit_from_hf(ret, cap)
    cap = copy.deepcopy(cap)
    gen = torch.Generator().manual_seed(5)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.crossattention.self.value.weight",
                 "encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.LayerNorm.weight"):
        delta = torch.randn(model.text_encoder.get_parameter(name).shape, generator=gen) * 0.5
        model.text_encoder.get_parameter(name).add_(delta)
        cap.text_decoder.bert.get_parameter(name).add_(delta)
    text, px = batch
    dec_ids = _with_first(text.input_ids, 30522)
    ours = model.lm_loss(model.image_embeds(px), text.input_ids, text.attention_mask, label_smoothing=0.0)
    theirs = cap(pixel_values=px, input_ids=dec_ids, attention_mask=text.attention_mask, labels=_labels(dec_ids, 0)).loss
    assert abs(ours.item() - theirs.item()) <= TOL


def test_missing_parts_say_so_in_one_line(batch):
    vision, text = tiny_configs()
    text_batch, px = batch
    enc_only = BlipModel(vision, text, 16, with_decoder=False)
    e = enc_only.image_embeds(px)
    with pytest.raises(VlkitError, match="no text decoder") as err:
        enc_only.lm_loss(e, text_batch.input_ids, text_batch.attention_mask)
    assert "\n" not in str(err.value)
    dec_only = BlipModel(vision, text, 16, with_encoder=False)
    with pytest.raises(VlkitError, match="no text encoder"):
        dec_only.itm_logits(e, text_batch.input_ids, text_batch.attention_mask)
    assert "temp" not in dec_only.state_dict() and dec_only.tied_aliases() == {
        "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
    }

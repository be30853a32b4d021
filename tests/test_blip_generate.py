"""Captioning: token-for-token parity with transformers' BlipForConditionalGeneration.generate, the beam
length-normalisation rule vlkit follows, image tokens computed once, seeded nucleus sampling, bad settings."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from blip_tiny import pixels, tiny_hf_blip, vlkit_from_hf
from vlkit.blip.generate import BEAM, BLIP_PROMPT, GREEDY, NUCLEUS, CaptionSettings, caption, generate, settings_for
from vlkit.blip.model import BlipModel
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError

SEP = 102


@pytest.fixture(scope="module")
def tok():
    return BlipTokenizer.from_minilm()


@pytest.fixture(scope="module")
def pair():
    # strong noise: image tokens then change the captions; 4 images
    ret, cap = tiny_hf_blip(seed=0, noise=0.2)
    return vlkit_from_hf(ret, cap), cap


@pytest.fixture(scope="module")
def px():
    return pixels(4)


@contextlib.contextmanager
def sep_bias(bias: float, *models):
    """Raise the [SEP] logit so captions end before max_length (random weights rarely stop by themselves)."""
    heads = [m.text_decoder.cls.predictions.bias for m in models]
    with torch.no_grad():
        for h in heads:
            h[SEP] += bias
    try:
        yield
    finally:
        with torch.no_grad():
            for h in heads:
                h[SEP] -= bias


# bias 0: every caption runs to max_length; 5: lengths differ between images (greedy); 6.5: all stop early
@pytest.mark.parametrize("bias", [0.0, 5.0, 6.5])
@pytest.mark.parametrize("settings", [GREEDY, BEAM, replace(GREEDY, prompt=BLIP_PROMPT), replace(BEAM, prompt=BLIP_PROMPT)],
                         ids=["greedy", "beam", "greedy-prompt", "beam-prompt"])
@torch.no_grad()
def test_captions_equal_transformers_generate(pair, tok, px, bias, settings):
    model, cap = pair
    prompt = tok([settings.prompt] * len(px)).input_ids if settings.prompt else None  # [CLS] ... [SEP], as BlipProcessor gives
    with sep_bias(bias, model, cap):
        ours = generate(model, model.image_embeds(px), tok, settings).sequences
        theirs = cap.generate(px, input_ids=prompt, num_beams=settings.num_beams, max_length=settings.max_length,
                              min_length=settings.min_length)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert ours.shape[1] <= settings.max_length
    if bias == 6.5:
        assert (ours == SEP).any(dim=1).all()  # the stopping path is exercised


@torch.no_grad()
def test_several_captions_per_image_equal_transformers(pair, tok, px):
    model, cap = pair
    settings = replace(BEAM, num_return_sequences=2)
    with sep_bias(5.0, model, cap):
        ours = generate(model, model.image_embeds(px), tok, settings).sequences
        theirs = cap.generate(px, num_beams=3, num_return_sequences=2, max_length=20, min_length=5)
        assert torch.equal(ours, theirs) and ours.shape[0] == 8
        texts = caption(model, tok, px, replace(NUCLEUS, num_return_sequences=3))
    assert len(texts) == 12
    with pytest.raises(VlkitError, match="at most num_beams"):
        replace(BEAM, num_return_sequences=4).validate()


def _teacher_forced_logprob(model: BlipModel, embeds: torch.Tensor, seq: list[int], start: int) -> float:
    """Sum of log p(token) for seq[start:] given everything before it (one decoder pass)."""
    ids = torch.tensor([seq])
    logp = model.lm_logits(embeds, ids, torch.ones_like(ids)).log_softmax(-1)[0]
    return float(sum(logp[i - 1, seq[i]] for i in range(start, len(seq))))


@pytest.mark.parametrize("prompt", ["", BLIP_PROMPT])
@torch.no_grad()
def test_beam_score_is_normalised_by_generated_tokens(pair, tok, px, prompt):
    """vlkit follows transformers: a finished beam's score = sum of generated log-probs / number generated.
    Original BLIP (transformers 4.25) divided by the whole length incl. [DEC] and the prompt: with a prompt
    that is a different number, without one the same."""
    model, _ = pair
    settings = replace(BEAM, prompt=prompt)
    with sep_bias(6.5, model):
        embeds = model.image_embeds(px)
        out = generate(model, embeds, tok, settings, return_scores=True)
        for i in range(len(px)):
            row = out.sequences[i].tolist()
            end = row.index(SEP, out.prompt_length) + 1
            seq, generated = row[:end], end - out.prompt_length
            total = _teacher_forced_logprob(model, embeds[i : i + 1], seq, out.prompt_length)
            new_rule, old_rule = total / generated, total / (end - 1)
            assert abs(out.scores[i].item() - new_rule) <= 1e-4
            if prompt:
                assert abs(out.scores[i].item() - old_rule) > 1e-2
            else:
                assert new_rule == old_rule


@torch.no_grad()
def test_image_tokens_computed_once_per_image(pair, tok, px):
    model, _ = pair
    vision_batches, decoder_batches = [], []
    h1 = model.vision_model.register_forward_hook(lambda m, args, kwargs, out: vision_batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    h2 = model.text_decoder.register_forward_pre_hook(
        lambda m, args, kwargs: decoder_batches.append(kwargs["encoder_hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        captions = caption(model, tok, px, BEAM)
    finally:
        h1.remove()
        h2.remove()
    assert len(captions) == 4 and vision_batches == [4]
    assert decoder_batches and set(decoder_batches) == {4 * 3}  # one copy per beam, not 3 x 3


@torch.no_grad()
def test_prompt_is_stripped(pair, tok, px):
    model, _ = pair
    out = generate(model, model.image_embeds(px), tok, replace(GREEDY, prompt=BLIP_PROMPT))
    assert out.prompt_length == 4 and out.sequences[:, :4].tolist() == [[30522, 1037, 3861, 1997]] * 4
    texts = caption(model, tok, px, replace(GREEDY, prompt=BLIP_PROMPT))
    assert texts == [tok.decode(row[4:]).strip() for row in out.sequences]
    assert not any(t.startswith("a picture of") for t in texts)


@torch.no_grad()
def test_nucleus_sampling_is_seeded_and_leaves_global_rng_alone(pair, tok, px):
    model, _ = pair
    state = torch.get_rng_state()
    a = caption(model, tok, px, NUCLEUS)
    assert torch.equal(torch.get_rng_state(), state)
    assert caption(model, tok, px, NUCLEUS) == a
    assert caption(model, tok, px, replace(NUCLEUS, seed=1)) != a
    assert NUCLEUS.top_p == 0.9 and NUCLEUS.repetition_penalty == 1.1 and (BEAM.num_beams, BEAM.max_length, BEAM.min_length) == (3, 20, 5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(min_length=30), "lengths"),
        (dict(top_p=0.0), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(method="contrastive"), "caption method"),
    ],
)
def test_bad_settings_are_one_line(bad, message):
    with pytest.raises(VlkitError, match=message) as err:
        CaptionSettings(**bad).validate()
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_caption_images_batches_pil_images(pair, tok):
    from PIL import Image

    from vlkit.blip.checkpoint import LoadedBlip, blip_preprocess
    from vlkit.blip.generate import caption_images
    from vlkit.models.preprocess import PilImagePreprocess

    model, _ = pair
    loaded = LoadedBlip(model, tok, PilImagePreprocess(blip_preprocess(32)), "tiny", "test")
    images = [Image.new("RGB", (40 + 7 * i, 30), (40 * i, 255 - 50 * i, 90)) for i in range(5)]
    stacked = torch.stack([loaded.preprocess(im) for im in images])
    with sep_bias(5.0, model):
        assert caption_images(loaded, images, GREEDY, batch_size=2) == caption(model, tok, stacked, GREEDY)
        sampled = caption_images(loaded, images, NUCLEUS, batch_size=2)
        assert caption_images(loaded, images, NUCLEUS, batch_size=2) == sampled and len(sampled) == 5
    with pytest.raises(VlkitError, match="batch size"):
        caption_images(loaded, images, GREEDY, batch_size=0)


def test_retrieval_only_model_cannot_caption(tok, px):
    from blip_tiny import tiny_configs

    vision, text = tiny_configs()
    retrieval_only = BlipModel(vision, text, 16, with_decoder=False)
    with pytest.raises(VlkitError, match="has no text decoder for captioning") as err:
        caption(retrieval_only, tok, px[:1])
    assert "\n" not in str(err.value)


def test_settings_for_and_too_long_prompt(pair, tok, px):
    assert settings_for("nucleus", prompt=BLIP_PROMPT) == replace(NUCLEUS, prompt=BLIP_PROMPT)
    with pytest.raises(VlkitError, match="unknown"):
        settings_for("beam", beams=4)
    model, _ = pair
    with pytest.raises(VlkitError, match="leave nothing to generate"):
        caption(model, tok, px[:1], replace(BEAM, prompt="one two three four five", max_length=6))

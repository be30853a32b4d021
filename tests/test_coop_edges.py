"""CoOp's edges against the official code (issue #14): class names ending in punctuation,
CLIP's text cleaning, the 50-epoch rule of the many-class task, and the warnings where a
user's `ctx_init` reads differently in CoOp's code."""

from __future__ import annotations

import warnings

import pytest
import torch

from coop_fakes import FakeVLModel
from vlkit import zeroshot
from vlkit.adapt.coop import epochs_for_shots, run_epochs
from vlkit.adapt.prompt_learner import PromptLearner, PromptOptions
from vlkit.models.tokenizer import clip_clean

PUNCTUATED = ["tench (fish)", "rock 'n' roll!", "cat", "st. bernard"]


def _zeroshot_gap(model, classes) -> float:
    learner = PromptLearner(model, classes, PromptOptions(ctx_init="a photo of a"))
    img = torch.nn.functional.normalize(torch.randn(5, model.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        coop = model.logit_scale * img @ learner.text_features(model).t()
    zs = zeroshot.logits(model, img, zeroshot.zeroshot_classifier(model, classes, ["a photo of a {}."], cache=False))
    return float((coop - zs).abs().max())


@pytest.mark.parametrize("backend", ["tiny_clip_model", "tiny_dual_model"])
def test_names_ending_in_punctuation_keep_the_zero_shot_anchor(request, backend):
    """As CoOp's code ("name." tokenised in one piece), the prompt's tokens are exactly the
    zero-shot prompt's, so the "a photo of a" context still gives zero-shot CLIP."""
    model = request.getfixturevalue(backend)
    learner = PromptLearner(model, PUNCTUATED, PromptOptions(ctx_init="a photo of a"))
    ref = model.tokenize([f"a photo of a {c}." for c in PUNCTUATED])
    for row in range(len(PUNCTUATED)):
        n = int(ref.attention_mask[row].sum())
        assert learner.token_ids[row, :n].tolist() == ref.input_ids[row, :n].tolist()
    assert _zeroshot_gap(model, PUNCTUATED) <= 1e-5


def test_clip_bpe_merges_a_final_bracket_with_the_period(tiny_clip_model):
    """The case the joint tokenisation exists for: apart, ")" and "." are other tokens."""
    tok = tiny_clip_model.tokenizer
    assert tok.tokens("tench (fish).") != tok.tokens("tench (fish)") + tok.tokens(".")
    assert tok.tokens("cat.") == tok.tokens("cat") + tok.tokens(".")  # plain names are unchanged


def test_middle_position_slices_the_class_as_coops_name_lens(tiny_clip_model):
    """CoOp's middle layout takes the first len(encode(name)) tokens of "name." as the class."""
    tok = tiny_clip_model.tokenizer
    learner = PromptLearner(tiny_clip_model, ["tench (fish)"], PromptOptions(n_ctx=4, position="middle"))
    joint = tok.tokens("tench (fish).")
    n = len(tok.tokens("tench (fish)"))
    ids = learner.token_ids[0][learner.attention_mask[0].bool()].tolist()
    start = len(ids) - len(joint) - 4 - 1  # [SOS] ctx ctx name ctx ctx tail [EOT]
    assert ids[start + 2 : start + 2 + n] == joint[:n]
    assert ids[start + 4 + n : -1] == joint[n:]


def test_clip_tokenizer_cleans_text_as_clips_own_tokenizer(tiny_clip_model, tiny_dual_model):
    """ftfy + HTML unescape (twice) + whitespace collapse, as CLIP's basic_clean/whitespace_clean."""
    assert clip_clean("  caf&amp;eacute;\n\tdon\u2019t  ") == "café don't"
    assert clip_clean("cafÃ©") == "café"  # mojibake repaired by ftfy
    tok = tiny_clip_model.tokenizer
    raw = tok.hf("café don't", add_special_tokens=False)["input_ids"]
    assert tok.tokens("caf&eacute; don\u2019t") == raw
    batch = tok(["caf&eacute;   don\u2019t"])
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist()[1:-1] == raw
    assert "clean" in tok.describe()
    # BERT's WordPiece gets the text as given, and its fingerprint description is unchanged
    bert = tiny_dual_model.tokenizer
    assert bert.clean is None and "clean" not in bert.describe()
    assert bert.tokens("caf&eacute;") == bert.hf("caf&eacute;", add_special_tokens=False)["input_ids"]


def test_imagenet_sized_tasks_train_50_epochs_at_every_shot_count():
    """CoOp's scripts run ImageNet with the *_ep50 configs in every setting."""
    assert [epochs_for_shots(k, 1906) for k in (1, 2, 4, 8, 16)] == [50] * 5
    assert [epochs_for_shots(k, 1000) for k in (1, 16)] == [50, 50]
    assert [epochs_for_shots(k, 999) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert run_epochs(None, 16, 16 * 1906, 1906) == 50 and run_epochs(None, 16, 16 * 48, 48) == 200
    assert run_epochs(7, 16, 16 * 1906, 1906) == 7  # an explicit budget still wins


def _caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


def test_warns_where_ctx_init_reads_differently_in_coops_code(tiny_clip_model):
    fake = FakeVLModel(causal=True)
    assert _caught(lambda: PromptLearner(fake, ["cat"], PromptOptions(ctx_init="a photo of a"))) == []
    csc = _caught(lambda: PromptLearner(fake, ["cat", "dog"], PromptOptions(ctx_init="a photo of a", csc=True)))
    assert len(csc) == 1 and "learns one shared context" in csc[0]
    tok = tiny_clip_model.tokenizer
    n = len(tok.tokens("a zqxv of a"))
    assert n != 4  # BPE splits "zqxv": CoOp's code would count 4 context words
    msgs = _caught(lambda: PromptLearner(tiny_clip_model, ["cat"], PromptOptions(ctx_init="a zqxv of a")))
    assert len(msgs) == 1 and f"4 words but {n} tokens" in msgs[0]
    assert PromptLearner(tiny_clip_model, ["cat"], PromptOptions(ctx_init="a zqxv of a")).n_ctx == n  # vlkit's count stays

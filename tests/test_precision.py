"""Inference precision modes (`vlkit.precision`): bf16 autocast and int8 dynamic quantisation.

The promise: vlkit-tiny's zero-shot top-1 on the bundled sample stays within 1 point of
fp32 in every mode, the caller's fp32 model is never modified, fp32 keeps the cache keys
it had before the modes existed, and the other modes never share an fp32 cache entry.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlkit import precision as precisions
from vlkit import zeroshot
from vlkit.errors import VlkitError


def test_unknown_precision_and_int8_off_the_cpu_are_one_line_errors():
    with pytest.raises(VlkitError, match=r"--precision 'fp16': unknown; use fp32 \(default\), bf16 .* or int8"):
        precisions.check("fp16")
    with pytest.raises(VlkitError, match="--precision int8: .*CPU only, not on cuda:0"):
        precisions.check_device("int8", "cuda:0")
    precisions.check_device("bf16", "cuda:0")  # bf16 runs anywhere


def test_fp32_and_the_int8_text_tower_keep_the_old_cache_keys():
    assert precisions.describe("fp32", "image") is None and precisions.describe("fp32", "text") is None
    assert precisions.describe("int8", "text") is None  # int8 quantises the image forward only
    assert precisions.describe("bf16", "text") == {"precision": "bf16", "autocast": "bfloat16"}
    assert precisions.describe("int8", "image")["engine"] == torch.backends.quantized.engine


def test_autocast_is_bf16_only_for_bf16():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    for mode in ("fp32", "int8"):
        with precisions.autocast(mode, "cpu"):
            assert (x @ w).dtype == torch.float32
    with precisions.autocast("bf16", torch.device("cpu")):
        assert (x @ w).dtype == torch.bfloat16


def test_int8_quantises_a_copy_of_the_image_linears_only_and_caches_it(tiny_clip_model):
    model = tiny_clip_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = precisions.image_linear_layers(model)
    assert names and all(n.startswith(("vision_model.", "visual_projection")) for n in names), names

    q = precisions.prepare(model, "int8")
    assert q is not model and precisions.prepare(model, "int8") is q  # one copy per model and weights
    assert precisions.prepare(q, "int8") is q
    assert precisions.prepare(model, "int8", "text") is model and precisions.prepare(model, "bf16") is model
    quantised = {n for n, m in q.named_modules() if type(m).__name__ == "Linear" and type(m) is not nn.Linear}
    assert quantised == set(names)  # every image Linear, and nothing of the text tower
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model untouched
    assert q.fingerprint() != model.fingerprint()

    pixels = torch.rand(3, 3, model.preprocess.image_size, model.preprocess.image_size)
    with torch.no_grad():
        exact, approx = model.encode_image(pixels), q.encode_image(pixels)
    assert not torch.equal(exact, approx)  # the int8 path really ran
    assert torch.nn.functional.cosine_similarity(exact, approx).min() > 0.98


def test_a_model_whose_weights_changed_gets_a_fresh_int8_copy(tiny_clip_dir):
    from vlkit.models import load_model

    model = load_model(str(tiny_clip_dir))
    first = precisions.prepare(model, "int8")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "vision_model" in n).add_(0.5)
    assert precisions.prepare(model, "int8") is not first


@pytest.fixture(scope="module")
def sample_zero_shot(tmp_path_factory):
    """vlkit-tiny's zero-shot run on the bundled sample's test split (the demo task) in each mode."""
    from vlkit.demo import DEMO_TASK
    from vlkit.models import load_model
    from vlkit.data.tasks import load_task

    model = load_model("vlkit-tiny")
    task = load_task(DEMO_TASK, "sample")
    data = [(str(task.root / p), y) for p, y in task.splits["test"]]
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for mode in precisions.PRECISIONS:
        zeroshot.clear_memory_cache()
        r = zeroshot.classify(model, data, task.classnames, task.templates[:1], cache_dir=cache, progress=False, precision=mode)
        out[mode] = r
    zeroshot.clear_memory_cache()
    return out, cache


def _top1(result) -> float:
    return 100.0 * float((result.logits.argmax(1) == torch.tensor(result.labels)).float().mean())


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_vlkit_tiny_zero_shot_top1_stays_within_a_point_of_fp32(sample_zero_shot, mode):
    runs, _ = sample_zero_shot
    fp32, other = runs["fp32"], runs[mode]
    assert other.paths == fp32.paths and len(fp32.paths) > 100
    assert _top1(fp32) > 3 * 100 / len(fp32.classnames)  # the comparison is about a model that works
    assert abs(_top1(other) - _top1(fp32)) <= 1.0
    assert not torch.equal(other.logits, fp32.logits)  # the mode changed the computation
    assert torch.nn.functional.cosine_similarity(other.logits, fp32.logits).min() > 0.99


def test_each_mode_has_its_own_cache_entries_and_fp32_keeps_its_key(sample_zero_shot):
    from vlkit.data.cache import FeatureCache

    runs, cache = sample_zero_shot
    ref = runs["fp32"]
    entries = list((cache / "zeroshot-text").glob("*.safetensors"))
    assert len(entries) == 2  # fp32 (shared by int8, whose text tower is fp32) and bf16
    assert {e.stem for e in entries} == {
        zeroshot._cache_key(ref.model_fingerprint, ref.classnames, ref.templates),  # the key fp32 always had
        zeroshot._cache_key(ref.model_fingerprint, ref.classnames, ref.templates, precisions.describe("bf16", "text")),
    }
    from vlkit.models import load_model

    model = load_model("vlkit-tiny")
    shards = {m: FeatureCache(cache / "features").shard(model.fingerprint(), model.preprocess.describe(), precisions.describe(m))
              for m in precisions.PRECISIONS}
    assert len({s.path for s in shards.values()}) == 3 and all(len(s) == len(ref.paths) for s in shards.values())

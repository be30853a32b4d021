"""Zero-shot classifier: templates, ensemble maths, batching, caching.

A lookup-table model stands in for a VLModel here so every text feature is a
number we chose; end-to-end runs on a real tiny CLIP live in test_zeroshot_e2e.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlkit import zeroshot
from vlkit.errors import VlkitError
from vlkit.models.base import TextBatch, VLModel


class _Tok:
    context_length = 1

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def __call__(self, texts):
        ids = torch.tensor([[self.vocab.index(t)] for t in texts])
        return TextBatch(ids, torch.ones_like(ids))

    def tokens(self, text):
        return [self.vocab.index(text)]

    def id_to_token(self, i):
        return self.vocab[i]

    @property
    def vocab_size(self):
        return len(self.vocab)


class TableModel(VLModel):
    """encode_text looks each prompt up in a table of raw (unnormalised) vectors."""

    def __init__(self, table: dict[str, list[float]], scale: float = 100.0, fp: str = "table-v1"):
        super().__init__()
        self.vocab = list(table)
        self.tokenizer = _Tok(self.vocab)
        self.raw = torch.nn.Parameter(torch.tensor([table[k] for k in self.vocab]), requires_grad=False)
        self.embed_dim = self.raw.shape[1]
        self._scale = scale
        self._fp = fp
        self.batches: list[int] = []  # sizes of encode_text calls

    @property
    def logit_scale(self):
        return torch.tensor(self._scale)

    def encode_image(self, pixel_values, normalize=True):
        raise NotImplementedError

    def encode_text(self, input_ids, attention_mask, normalize=True):
        self.batches.append(input_ids.shape[0])
        x = self.raw[input_ids[:, 0]]
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def token_embedding(self, input_ids):
        return self.raw[input_ids]

    def encode_text_embeddings(self, inputs_embeds, attention_mask, normalize=True):
        x = inputs_embeds[:, 0]
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def fingerprint(self):
        return self._fp


@pytest.fixture(autouse=True)
def _fresh_cache():
    zeroshot.clear_memory_cache()
    yield
    zeroshot.clear_memory_cache()


TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
TABLE = {
    "a photo of a cat.": [3.0, 4.0, 0.0],
    "a drawing of a cat.": [0.0, 2.0, 0.0],
    "a photo of a dog.": [0.0, 0.0, 5.0],
    "a drawing of a dog.": [1.0, 0.0, 0.0],
    "a photo of a golden retriever.": [1.0, 1.0, 1.0],
    "a drawing of a golden retriever.": [1.0, 1.0, 1.0],
}


def test_ensemble_normalises_each_template_then_averages_then_renormalises():
    # cat: [3,4,0]/5 = [.6,.8,0]; [0,2,0]/2 = [0,1,0]; mean [.3,.9,0]; / sqrt(.9)
    # dog: [0,0,1] and [1,0,0]; mean [.5,0,.5]; / sqrt(.5)
    w = zeroshot.zeroshot_classifier(TableModel(TABLE), ["cat", "dog"], TEMPLATES)
    n = math.sqrt(0.9)
    expected = torch.tensor([[0.3 / n, 0.9 / n, 0.0], [0.5 / math.sqrt(0.5), 0.0, 0.5 / math.sqrt(0.5)]])
    assert torch.allclose(w, expected, atol=1e-6)
    # averaging raw vectors first would give [3,6,0]/|.| = [.447,.894,0]: a different answer
    assert not torch.allclose(w[0], torch.nn.functional.normalize(torch.tensor([3.0, 6.0, 0.0]), dim=0), atol=1e-3)


def test_ensemble_function_on_raw_features():
    raw = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])
    assert torch.allclose(zeroshot.ensemble(raw), torch.tensor([[0.3, 0.9]]) / math.sqrt(0.9), atol=1e-6)


def test_single_template_is_the_normalised_prompt_feature():
    w = zeroshot.zeroshot_classifier(TableModel(TABLE), ["cat", "dog"], ["a photo of a {}."])
    assert torch.allclose(w, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]), atol=1e-6)


def test_underscores_in_class_names_become_spaces():
    assert zeroshot.format_prompts(["golden_retriever"], TEMPLATES) == [
        "a photo of a golden retriever.",
        "a drawing of a golden retriever.",
    ]
    w = zeroshot.zeroshot_classifier(TableModel(TABLE), ["golden_retriever"], TEMPLATES)
    assert torch.allclose(w, torch.full((1, 3), 1 / math.sqrt(3)), atol=1e-6)


def test_prompts_are_batched_across_classes_and_chunked():
    table = {t.replace("{}", f"c{i}"): [float(i + 1), float(j + 1)] for i in range(7) for j, t in enumerate(TEMPLATES)}
    classes = [f"c{i}" for i in range(7)]
    big = TableModel(table)
    w_big = zeroshot.zeroshot_classifier(big, classes, TEMPLATES, batch_size=256, cache=False)
    assert big.batches == [14]  # all 7 classes x 2 templates in one call
    small = TableModel(table)
    w_small = zeroshot.zeroshot_classifier(small, classes, TEMPLATES, batch_size=4, cache=False)
    assert max(small.batches) <= 4 and sum(small.batches) == 14
    tiny = TableModel(table)  # batch smaller than one class's templates still works
    w_tiny = zeroshot.zeroshot_classifier(tiny, classes, TEMPLATES, batch_size=1, cache=False)
    assert tiny.batches == [1] * 14
    assert torch.allclose(w_big, w_small) and torch.allclose(w_big, w_tiny)


def test_memory_cache_keyed_by_model_classes_and_templates():
    m = TableModel(TABLE)
    a = zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES)
    calls = len(m.batches)
    b = zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES)
    assert len(m.batches) == calls and torch.equal(a, b)  # reused, no text encoded
    zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES[:1])
    assert len(m.batches) == calls + 1  # other templates: recomputed
    zeroshot.zeroshot_classifier(m, ["dog", "cat"], TEMPLATES)
    assert len(m.batches) == calls + 2  # other class order: recomputed
    other = TableModel(TABLE, fp="table-v2")
    zeroshot.zeroshot_classifier(other, ["cat", "dog"], TEMPLATES)
    assert len(other.batches) == 1  # other fingerprint: recomputed
    zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES, cache=False)
    assert len(m.batches) == calls + 3  # cache=False always encodes


def test_disk_cache_survives_a_new_process_and_tracks_the_model(tmp_path):
    m = TableModel(TABLE)
    a = zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES, cache_dir=tmp_path)
    files = list((tmp_path / "zeroshot-text").glob("*.safetensors"))
    assert len(files) == 1
    zeroshot.clear_memory_cache()  # as if a new process
    fresh = TableModel(TABLE)
    b = zeroshot.zeroshot_classifier(fresh, ["cat", "dog"], TEMPLATES, cache_dir=tmp_path)
    assert fresh.batches == [] and torch.equal(a, b)
    zeroshot.clear_memory_cache()
    changed = TableModel({k: [v[1], v[0], v[2]] for k, v in TABLE.items()}, fp="table-v2")
    c = zeroshot.zeroshot_classifier(changed, ["cat", "dog"], TEMPLATES, cache_dir=tmp_path)
    assert changed.batches and not torch.allclose(a, c)
    assert len(list((tmp_path / "zeroshot-text").glob("*.safetensors"))) == 2


def test_damaged_disk_cache_entry_is_recomputed(tmp_path):
    m = TableModel(TABLE)
    a = zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES, cache_dir=tmp_path)
    (f,) = (tmp_path / "zeroshot-text").glob("*.safetensors")
    f.write_bytes(b"not a safetensors file")
    zeroshot.clear_memory_cache()
    b = zeroshot.zeroshot_classifier(TableModel(TABLE), ["cat", "dog"], TEMPLATES, cache_dir=tmp_path)
    assert torch.equal(a, b)


def test_logits_are_scale_times_cosine():
    m = TableModel(TABLE, scale=50.0)
    w = zeroshot.zeroshot_classifier(m, ["cat", "dog"], ["a photo of a {}."])
    img = torch.tensor([[6.0, 8.0, 0.0], [0.0, 0.0, -2.0]])  # unnormalised on purpose
    out = zeroshot.logits(m, img, w)
    assert torch.allclose(out, torch.tensor([[50.0, 0.0], [0.0, -50.0]]), atol=1e-5)


def test_openai_templates_are_the_80_imagenet_prompts():
    t = zeroshot.resolve_templates("ensemble")
    assert len(t) == 80 and len(set(t)) == 80
    assert t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."
    assert "itap of my {}." in t and all("{}" in x for x in t)
    assert zeroshot.resolve_templates("photo") == ["a photo of a {}."]


def test_templates_from_file_and_list(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my prompts\n\na sketch of a {}.\n  an emoji of {}.  \n")
    assert zeroshot.resolve_templates(f) == ["a sketch of a {}.", "an emoji of {}."]
    assert zeroshot.resolve_templates(str(f)) == ["a sketch of a {}.", "an emoji of {}."]
    assert zeroshot.resolve_templates(["x {}"]) == ["x {}"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope.txt", "templates 'nope.txt': not one of photo, ensemble, task-first, task or an existing file"),
        (["a photo"], "template 'a photo' has no '{}' placeholder"),
        ([], "templates: the list is empty"),
    ],
)
def test_bad_templates_raise_one_clear_error(spec, message):
    with pytest.raises(VlkitError, match="^" + message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        zeroshot.resolve_templates(spec)


def test_class_files_and_bad_class_lists(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("cat\n\n# comment\ndog\n")
    assert zeroshot.load_classnames(f) == ["cat", "dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(VlkitError, match="is empty"):
        zeroshot.load_classnames(empty)
    with pytest.raises(VlkitError, match="does not exist"):
        zeroshot.load_classnames(tmp_path / "missing.txt")
    with pytest.raises(VlkitError, match="'cat' more than once"):
        zeroshot.check_classnames(["cat", "dog", "cat"])
    with pytest.raises(VlkitError, match="is empty"):
        zeroshot.zeroshot_classifier(TableModel(TABLE), [], TEMPLATES)


def test_classifier_is_a_normal_tensor_usable_with_autograd():
    # few-shot methods start from the zero-shot weights and train on top of them
    reference = zeroshot.zeroshot_classifier(TableModel(TABLE), ["cat", "dog"], TEMPLATES, cache=False)
    for cache in (True, True, False):  # the second cached call comes from the memory cache
        w = zeroshot.zeroshot_classifier(TableModel(TABLE), ["cat", "dog"], TEMPLATES, cache=cache)
        assert not w.is_inference() and not w.requires_grad
        x = torch.ones(1, 3, requires_grad=True)
        (x @ w.T).sum().backward()
        torch.testing.assert_close(x.grad, reference.sum(0, keepdim=True))  # d/dx of sum(x @ w.T): w's column sums


def test_editing_a_returned_classifier_does_not_corrupt_the_cache():
    m = TableModel(TABLE)
    a = zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES)
    expected = a.clone()
    a.mul_(0)
    b = zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES)
    assert torch.equal(b, expected)
    b.add_(1)
    assert torch.equal(zeroshot.zeroshot_classifier(m, ["cat", "dog"], TEMPLATES), expected)


def _result(labels):
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    return zeroshot.ZeroShotResult(
        classnames=["cat", "dog", "fox"],
        templates=["a photo of a {}."],
        paths=["a.png", "b.png", "c.png"],
        logits=logits,
        labels=labels,
        skipped=[("bad.png", "not an image")],
    )


def test_predictions_csv_and_metrics_contents(tmp_path):
    import csv
    import json

    r = _result([0, 2, 2])
    m = r.save(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv", newline="")))
    assert [(x["path"], x["label"], x["prediction"], x["correct"]) for x in rows] == [
        ("a.png", "cat", "cat", "1"),
        ("b.png", "fox", "dog", "0"),
        ("c.png", "fox", "fox", "1"),
    ]
    # probability = softmax of the logits at the prediction; top3 = ranking
    assert float(rows[1]["probability"]) == pytest.approx(torch.softmax(torch.tensor([0.0, 3.0, 1.0]), 0)[1].item(), abs=1e-6)
    assert rows[1]["top3"] == "dog|fox|cat"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == m
    assert saved["top1"] == pytest.approx(2 / 3) and saved["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert saved["per_class_accuracy"] == {"cat": 1.0, "dog": None, "fox": 0.5}
    assert saved["skipped"] == [{"path": "bad.png", "reason": "not an image"}] and saved["num_skipped"] == 1


def test_unlabelled_data_gets_predictions_but_no_accuracy(tmp_path):
    import csv

    m = _result(None).save(tmp_path)
    assert "top1" not in m and m["n"] == 3
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv", newline="")))
    assert [(x["label"], x["prediction"], x["correct"]) for x in rows] == [("", "cat", ""), ("", "dog", ""), ("", "fox", "")]


def test_all_images_skipped_writes_null_metrics_not_nan(tmp_path):
    r = zeroshot.ZeroShotResult(["cat", "dog"], ["{}"], [], torch.zeros(0, 2), [], [("x.png", "empty file")])
    m = r.save(tmp_path)
    assert m["top1"] is None and m["mean_per_class_recall"] is None
    assert "NaN" not in (tmp_path / "metrics.json").read_text()


class _DS:
    """The dataset protocol classify relies on: paths, labels, classnames."""

    def __init__(self, labels, classnames, n=4):
        self.paths = [f"{i}.png" for i in range(n)]
        self.labels = labels
        self.classnames = classnames
        self.root = "ds"


def test_dataset_labels_map_into_a_user_class_list():
    ds = _DS([0, 1, 2, 1], ["cat", "dog", "fox"])
    assert zeroshot.as_labeled_images(ds).labels == [0, 1, 2, 1]
    by_name = zeroshot.as_labeled_images(ds, ["fox", "owl", "cat", "dog"])  # superset, reordered
    assert by_name.labels == [2, 3, 0, 3] and by_name.classnames == ["fox", "owl", "cat", "dog"]
    by_position = zeroshot.as_labeled_images(ds, ["Cat", "Dog", "Fox"])
    assert by_position.labels == [0, 1, 2, 1]
    with pytest.raises(VlkitError, match="dataset 'ds' has 3 classes but the class list has 2 and lacks 'fox'"):
        zeroshot.as_labeled_images(ds, ["cat", "dog"])
    unlabelled = zeroshot.as_labeled_images(_DS(None, None), ["a", "b"])
    assert unlabelled.labels is None and unlabelled.classnames == ["a", "b"]


def test_lists_of_paths_or_pairs():
    pairs = zeroshot.as_labeled_images([("x.png", "dog"), ("y.png", 0)], ["cat", "dog"])
    assert pairs.paths == ["x.png", "y.png"] and pairs.labels == [1, 0]
    with pytest.raises(VlkitError, match="x.png: label 'owl' is not in the class list"):
        zeroshot.as_labeled_images([("x.png", "owl")], ["cat", "dog"])
    plain = zeroshot.as_labeled_images(["x.png", "y.png"], ["cat", "dog"])
    assert plain.labels is None and plain.paths == ["x.png", "y.png"]

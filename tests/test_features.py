"""extract_image_features: bad files skipped and listed, order kept, cache exact and never stale."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit.features as features_mod
from vlkit.data.cache import FeatureCache
from vlkit.data.images import load_image
from vlkit.features import FeatureResult, extract_image_features
from vlkit.models.base import VLModel

from test_images import make_huge_png, make_truncated_jpeg


class FakePreprocess:
    """Resize to size x size, scale to [0, 1], CHW: enough to make features depend on pixels."""

    def __init__(self, size: int = 8, tag: str = "v1") -> None:
        self.image_size, self.tag = size, tag

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.resize((self.image_size, self.image_size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def describe(self) -> dict:
        return {"kind": "fake", "size": self.image_size, "tag": self.tag}


class FakeModel(VLModel):
    """A linear image tower; counts encode_image calls so tests can see cache hits."""

    def __init__(self, fingerprint: str = "fake-1", dim: int = 6, seed: int = 0, size: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(3 * size * size, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 3 * size * size, generator=gen))
        self.preprocess = FakePreprocess(size)
        self.embed_dim, self.spec, self._fp, self.encoded = dim, "fake", fingerprint, 0

    @property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(100.0)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self.encoded += pixel_values.shape[0]
        out = self.proj(pixel_values.flatten(1))
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, input_ids, attention_mask, normalize=True):
        raise NotImplementedError

    def token_embedding(self, input_ids):
        raise NotImplementedError

    def encode_text_embeddings(self, inputs_embeds, attention_mask, normalize=True):
        raise NotImplementedError

    def fingerprint(self) -> str:
        return self._fp


def _expected(model: VLModel, paths) -> torch.Tensor:
    """Reference: the same model on the same images, one at a time, no pipeline."""
    with torch.no_grad():
        x = torch.stack([model.preprocess(load_image(p)) for p in paths])
        return torch.nn.functional.normalize(model.encode_image(x), dim=-1)


def _good_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        p = folder / f"good{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (12 + i, 10, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """Good images mixed with every kind of bad file; returns (all paths, bad name -> reason fragment)."""
    folder = tmp_path_factory.mktemp("messy")
    good = _good_images(folder, 5)
    Image.new("RGB", (1, 1), (200, 100, 0)).save(folder / "tiny.png")
    Image.new("RGBA", (6, 6), (0, 0, 255, 0)).save(folder / "clear.png")
    make_truncated_jpeg(folder / "corrupt.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("meeting notes, not a picture")
    make_huge_png(folder / "huge.png")
    order = [good[0], folder / "corrupt.jpg", good[1], folder / "empty.jpg", folder / "tiny.png", good[2],
             folder / "notes.png", folder / "huge.png", good[3], folder / "missing.jpg", folder / "clear.png", good[4]]
    bad = {
        "corrupt.jpg": "truncated",
        "empty.jpg": "empty file",
        "notes.png": "not an image",
        "huge.png": "too large: 32768x20000",
        "missing.jpg": "file not found",
    }
    return [str(p) for p in order], bad


@pytest.mark.parametrize("num_workers", [0, 3])
def test_bad_files_are_skipped_and_listed_good_ones_embedded(messy_folder, num_workers, tmp_path):
    paths, bad = messy_folder
    model = FakeModel()
    res = extract_image_features(
        model, paths, batch_size=2, cache=FeatureCache(tmp_path), num_workers=num_workers, progress=False
    )
    good = [p for p in paths if Path(p).name not in bad]
    assert res.paths == good  # input order, as given
    assert [Path(p).name for p, _ in res.skipped] == [Path(p).name for p in paths if Path(p).name in bad]
    for p, reason in res.skipped:
        assert bad[Path(p).name] in reason
    assert res.features.shape == (len(good), 6) and res.features.dtype == torch.float32
    torch.testing.assert_close(res.features.norm(dim=1), torch.ones(len(good)))
    assert res.encoded == len(good) and res.cache_hits == 0 and model.encoded == len(good)
    torch.testing.assert_close(res.features, _expected(model, good), atol=1e-6, rtol=0)


def test_warm_cache_skips_decoding_and_encoding(messy_folder, tmp_path, monkeypatch):
    paths, bad = messy_folder
    store = FeatureCache(tmp_path)
    cold = extract_image_features(FakeModel(), paths, batch_size=4, cache=store, progress=False)
    decoded: list[str] = []
    real_load = features_mod.load_image
    monkeypatch.setattr(features_mod, "load_image", lambda p, **kw: (decoded.append(Path(p).name), real_load(p, **kw))[1])
    model = FakeModel()
    warm = extract_image_features(model, paths, batch_size=4, cache=store, progress=False)
    assert model.encoded == 0 and warm.encoded == 0 and warm.cache_hits == len(cold.paths)
    assert sorted(decoded) == sorted(bad)  # only the bad files are tried again
    assert warm.paths == cold.paths and torch.equal(warm.features, cold.features)
    assert warm.skipped == cold.skipped


def test_stale_entries_are_never_reused(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = [str(p) for p in _good_images(folder, 3)]
    store = FeatureCache(tmp_path / "cache")
    base = extract_image_features(FakeModel(), paths, cache=store, progress=False)

    other_model = FakeModel(fingerprint="fake-2", seed=5)  # other weights, other fingerprint
    res = extract_image_features(other_model, paths, cache=store, progress=False)
    assert other_model.encoded == 3 and res.cache_hits == 0
    torch.testing.assert_close(res.features, _expected(other_model, paths), atol=1e-6, rtol=0)

    new_pre = FakeModel()
    new_pre.preprocess = FakePreprocess(8, tag="v2")  # same weights, different preprocessing
    assert extract_image_features(new_pre, paths, cache=store, progress=False).cache_hits == 0

    # rewrite one image with other pixels but restore its old mtime: size changes -> miss
    Image.new("RGB", (30, 30), (0, 255, 0)).save(paths[1])
    st = os.stat(paths[0])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer mtime -> miss
    model = FakeModel()
    res = extract_image_features(model, paths, cache=store, progress=False)
    assert res.cache_hits == 1 and model.encoded == 2
    torch.testing.assert_close(res.features, _expected(model, paths), atol=1e-6, rtol=0)
    assert not torch.allclose(res.features[1], base.features[1])


def test_no_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "vc"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = _good_images(folder, 2)
    res = extract_image_features(FakeModel(), paths, cache=False, progress=False)
    assert len(res) == 2 and not (tmp_path / "vc").exists()
    extract_image_features(FakeModel(), paths, cache=True, progress=False)  # default location follows the env
    assert len(list((tmp_path / "vc" / "features").glob("*.safetensors"))) == 1
    assert extract_image_features(FakeModel(), paths, progress=False).cache_hits == 2


def test_order_and_values_independent_of_batching_and_workers(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = [str(p) for p in _good_images(folder, 11)]
    runs = [
        extract_image_features(FakeModel(), paths, batch_size=bs, cache=False, num_workers=w, progress=False)
        for bs, w in [(1, 0), (3, 2), (64, 4)]
    ]
    for r in runs:
        assert r.paths == paths
        torch.testing.assert_close(r.features, runs[0].features, atol=1e-6, rtol=0)


def test_features_are_ordinary_tensors_usable_for_training(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    model = FakeModel()
    res = extract_image_features(model, _good_images(folder, 2), cache=False, progress=False)
    assert not res.features.is_inference() and not res.features.requires_grad
    head = torch.nn.Linear(6, 2)
    head(res.features).sum().backward()  # a linear probe trains on these
    # d(sum of outputs)/d(weight row) is the sum of the features; nothing flows back into the encoder
    torch.testing.assert_close(head.weight.grad, res.features.sum(0).expand(2, -1), atol=1e-6, rtol=0)
    assert model.proj.weight.grad is None


def test_preprocess_failure_is_a_skip_not_a_crash(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = _good_images(folder, 2)
    Image.new("RGB", (1, 1)).save(folder / "one.png")
    model = FakeModel()
    inner = model.preprocess

    class Picky(FakePreprocess):
        def __call__(self, image):
            if image.size == (1, 1):
                raise ValueError("Unable to infer channel dimension format")
            return inner(image)

    model.preprocess = Picky()
    res = extract_image_features(model, [paths[0], folder / "one.png", paths[1]], cache=False, progress=False)
    assert res.paths == [str(paths[0]), str(paths[1])]
    assert res.skipped == [(str(folder / "one.png"), "preprocessing failed: Unable to infer channel dimension format")]


def test_interrupted_run_keeps_finished_batches(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = _good_images(folder, 6)
    store = FeatureCache(tmp_path / "cache")
    model = FakeModel()
    real = model.encode_image

    def dies_on_second_batch(x, normalize=True):
        if model.encoded >= 2:
            raise KeyboardInterrupt
        return real(x, normalize)

    model.encode_image = dies_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        extract_image_features(model, paths, batch_size=2, cache=store, num_workers=2, progress=False)
    resumed = FakeModel()
    res = extract_image_features(resumed, paths, batch_size=2, cache=store, progress=False)
    assert res.cache_hits == 2 and resumed.encoded == 4 and res.paths == [str(p) for p in paths]
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"] == []


def test_all_bad_and_empty_inputs(tmp_path):
    (tmp_path / "x.png").write_text("no")
    res = extract_image_features(FakeModel(), [tmp_path / "x.png"], cache=False, progress=False)
    assert isinstance(res, FeatureResult) and res.features.shape == (0, 6) and res.paths == []
    assert res.skipped == [(str(tmp_path / "x.png"), "not an image (unrecognised format)")]
    assert extract_image_features(FakeModel(), [], cache=False, progress=False).features.shape == (0, 6)


def test_progress_bar_runs_on_stderr(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    extract_image_features(FakeModel(), _good_images(folder, 3), batch_size=2, cache=False, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "3/3" in captured.err


def test_real_tiny_clip_model_end_to_end(tiny_clip_model, messy_folder, tmp_path):
    """The loaded HF CLIP adapter through the same path: features equal its own encode_image,
    the cache keys on its real fingerprint and preprocessing description."""
    paths, bad = messy_folder
    store = FeatureCache(tmp_path)
    cold = extract_image_features(tiny_clip_model, paths, batch_size=3, cache=store, num_workers=2, progress=False)
    good = [p for p in paths if Path(p).name not in bad]
    assert cold.paths == good and sorted(Path(p).name for p, _ in cold.skipped) == sorted(bad)
    assert cold.features.shape == (len(good), tiny_clip_model.embed_dim)
    with torch.inference_mode():
        x = torch.stack([tiny_clip_model.preprocess(load_image(p)) for p in good])
        ref = tiny_clip_model.encode_image(x)
    torch.testing.assert_close(cold.features, ref.float(), atol=1e-5, rtol=0)
    warm = extract_image_features(tiny_clip_model, paths, batch_size=3, cache=store, progress=False)
    assert warm.cache_hits == len(good) and warm.encoded == 0 and torch.equal(warm.features, cold.features)
    shard = store.shard(tiny_clip_model.fingerprint(), tiny_clip_model.preprocess.describe())
    assert shard.path.exists() and len(shard) == len(good)


def test_image_folder_with_bad_files_completes(messy_folder, tmp_path):
    """The issue's bad-input case end to end: a class folder holding a corrupt JPEG, a
    zero-byte file, a text file named .png and a 655 MP PNG lists exactly those as skipped."""
    from vlkit.data.datasets import ImageFolderDataset

    paths, bad = messy_folder
    src = {Path(p).name: Path(p) for p in paths}
    for cls, names in {"good": ["good00.jpg", "good01.png", "tiny.png"], "mixed": ["good02.jpg", *[n for n in bad if n != "missing.jpg"]]}.items():
        (tmp_path / "root" / cls).mkdir(parents=True)
        for n in names:
            (tmp_path / "root" / cls / n).symlink_to(src[n])
    ds = ImageFolderDataset(tmp_path / "root")
    assert len(ds) == 8  # a dataset lists by extension; it never opens a file
    res = extract_image_features(FakeModel(), ds.paths, batch_size=4, cache=False, progress=False)
    assert sorted(Path(p).name for p, _ in res.skipped) == ["corrupt.jpg", "empty.jpg", "huge.png", "notes.png"]
    assert [Path(p).name for p in res.paths] == ["good00.jpg", "good01.png", "tiny.png", "good02.jpg"]
    assert res.features.shape == (4, 6)


def test_alpha_policy_follows_the_preprocessing(tmp_path):
    """open_clip-style preprocessing (alpha="drop": resize, then convert("RGB")) sees the
    pixels under the alpha, as open_clip's own pipeline would; the default composites on white."""
    from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig

    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black, like emoji corners
    img.putpixel((3, 3), (255, 0, 0, 255))
    img.save(tmp_path / "t.png")
    cfg = dict(resize="exact", size=(8, 8), crop_size=None, mean=None, std=None)
    results = {}
    for alpha in ("white", "drop"):
        model = FakeModel()
        model.preprocess = PilImagePreprocess(PreprocessConfig(alpha=alpha, **cfg))
        res = extract_image_features(model, [tmp_path / "t.png"], cache=False, progress=False)
        with torch.no_grad():
            reference = model.encode_image(model.preprocess(Image.open(tmp_path / "t.png"))[None])
        torch.testing.assert_close(res.features, reference, atol=1e-6, rtol=0)
        results[alpha] = res.features
    assert not torch.allclose(results["white"], results["drop"])

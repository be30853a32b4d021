"""Ray Data embedding (the `ray` extra) gives the single-process embeddings, in input order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'vlkit[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from vlkit.retrieval.embed_ray import init_ray

    init_ray("local", num_workers=2)
    yield
    ray.shutdown()


def test_ray_two_workers_match_single_process(local_ray, tiny_clip_model, tmp_path):
    from vlkit.retrieval.embed_ray import embed_images_ray
    from vlkit.retrieval.index import embed_images_local

    rng = np.random.default_rng(0)
    paths = []
    for i in range(21):
        p = tmp_path / f"im{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, size=(24 + i, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths.insert(7, str(bad))

    want, want_ok, want_skipped = embed_images_local(tiny_clip_model, paths, batch_size=4)
    got, got_ok, got_skipped = embed_images_ray(tiny_clip_model, paths, num_workers=2, batch_size=4)
    assert got_ok == want_ok and len(got_ok) == 21
    assert [p for p, _ in got_skipped] == [p for p, _ in want_skipped] == [str(bad)]
    assert got.shape == want.shape == (21, tiny_clip_model.embed_dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

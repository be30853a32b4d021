"""load_model: spec resolution, offline folders, and one clear error per bad spec."""

import pytest

from vlkit.errors import VlkitError
from vlkit.models import DualEncoderModel, VLModel, load_model


def test_fixtures_load_as_vlmodels(tiny_clip_model, tiny_dual_model):
    assert isinstance(tiny_clip_model, VLModel) and isinstance(tiny_dual_model, VLModel)
    assert tiny_clip_model.text_pooling == "eot"
    assert tiny_dual_model.text_pooling == "pooler"
    assert tiny_clip_model.embed_dim == tiny_dual_model.embed_dim == 16
    assert not tiny_clip_model.training


def test_missing_path_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(VlkitError, match="does not exist") as exc:
        load_model(str(missing))
    assert str(missing) in str(exc.value) and "\n" not in str(exc.value)

"""Import the real open_clip package on a machine without torchvision.

open_clip (3.x) imports torchvision at module level in two places only:
`open_clip/transform.py` (its torchvision transforms, used by
`create_model_and_transforms` / `image_transform`) and `open_clip/utils.py`
(`FrozenBatchNorm2d`, used only to freeze a ResNet image tower's batch norms).
Building a ViT CLIP with `create_model`, its tokenizer and its encoders touch
neither. The torchvision wheels the package index carries are built against the
CUDA torch and fail to import beside vlkit's CPU torch ("operator torchvision::nms
does not exist"), so where torchvision is missing this puts stand-in modules under
those names for the duration of the import: every name is a class that raises when
used, so a test that reached open_clip's torchvision code would fail, never pass.
The stand-ins leave `sys.modules` right after the import; `forget()` also drops
open_clip, so later tests see the machine as it is.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# What open_clip imports from torchvision at module level.
TORCHVISION_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops", "torchvision.ops.misc")


class _MissingMeta(type):
    def __getattr__(cls, name: str) -> str:  # InterpolationMode.BICUBIC in default arguments
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _Missing(metaclass=_MissingMeta):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{type(self).__name__}: torchvision is not installed; this path needs open_clip's torchvision code")


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: _MissingMeta(attr, (_Missing,), {})  # type: ignore[method-assign]
    return module


def _real_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):  # absent, or a CUDA build beside the CPU torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def import_open_clip() -> tuple[types.ModuleType, bool]:
    """(open_clip, whether its torchvision code is real); skips the caller when open_clip is not installed."""
    import pytest

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (make setup installs it with --no-deps)")
    if _real_torchvision():
        return importlib.import_module("open_clip"), True
    stand_ins = {name: _module(name) for name in TORCHVISION_MODULES}
    stand_ins["torchvision"].transforms = stand_ins["torchvision.transforms"]  # type: ignore[attr-defined]
    stand_ins["torchvision"].ops = stand_ins["torchvision.ops"]  # type: ignore[attr-defined]
    stand_ins["torchvision.transforms"].functional = stand_ins["torchvision.transforms.functional"]  # type: ignore[attr-defined]
    stand_ins["torchvision.ops"].misc = stand_ins["torchvision.ops.misc"]  # type: ignore[attr-defined]
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        del sys.modules[name]  # half-imported leftovers of an earlier failed `import open_clip`
    importlib.import_module("transformers")  # open_clip imports it; it must see torchvision as absent
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("open_clip"), False
    finally:
        for name in stand_ins:
            del sys.modules[name]


def forget() -> None:
    """Drop open_clip from `sys.modules` (the stand-ins left it at the end of the import)."""
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        del sys.modules[name]

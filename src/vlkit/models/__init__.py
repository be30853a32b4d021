"""Vision-language backbones behind one interface (`VLModel`), loaded by spec.

`load_model(spec)` resolves, through a registry (see `registry.py`):
a local folder or cached Hugging Face id of a `CLIPModel` or a
`VisionTextDualEncoderModel`, vlkit's own `vlkit-dual-encoder` folders,
`open_clip:ARCH[:PRETRAINED_OR_FILE]` (extra), and the embedded `vlkit-tiny`.
"""

from vlkit.models.base import ImagePreprocess, TextBatch, TextPooling, Tokenizer, VLModel
from vlkit.models.dual_encoder import DualEncoderModel
from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig
from vlkit.models.registry import EMBEDDED, load_model, register_folder_kind, register_resolver
from vlkit.models.vlkit_format import build_vlkit_dual_encoder, load_vlkit_dual_encoder, save_vlkit_dual_encoder

__all__ = [
    "DualEncoderModel",
    "EMBEDDED",
    "ImagePreprocess",
    "PilImagePreprocess",
    "PreprocessConfig",
    "TextBatch",
    "TextPooling",
    "Tokenizer",
    "VLModel",
    "build_vlkit_dual_encoder",
    "load_model",
    "load_vlkit_dual_encoder",
    "register_folder_kind",
    "register_resolver",
    "save_vlkit_dual_encoder",
]

"""Loading Hugging Face checkpoint folders: `CLIPModel` and `VisionTextDualEncoderModel`.

Everything is read with `local_files_only=True` in float32: a folder works with no
network, and nothing is executed from the checkpoint (no `trust_remote_code`).
The tokenizer and image processor must sit in the same folder, as `save_pretrained`
of a model plus its processor leaves them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from vlkit.errors import VlkitError
from vlkit.models.dual_encoder import DualEncoderModel
from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig
from vlkit.models.tokenizer import HFTokenizer, context_length_for


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars and backend notices (e.g. the PIL fallback notice)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(folder: Path, max_positions: int | None, what: str, vocab_rows: int | None = None) -> HFTokenizer:
    """The folder's tokenizer, wrapped; one clear error when it is missing or does not fit the embedding table."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would silently build an empty default tokenizer from config.json alone.
        raise VlkitError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}) for this {what}; "
            "save the tokenizer into the checkpoint folder (tokenizer.save_pretrained(folder))"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise VlkitError(
            f"{folder}: no usable tokenizer for this {what} ({type(exc).__name__}); "
            "save the tokenizer into the checkpoint folder (tokenizer.save_pretrained(folder))"
        ) from None
    if vocab_rows is not None and len(tok) > vocab_rows:
        raise VlkitError(
            f"{folder}: the tokenizer has {len(tok)} tokens but the text tower only {vocab_rows} embeddings; "
            "the tokenizer does not belong to this checkpoint"
        )
    return HFTokenizer(tok, context_length_for(tok, max_positions))


def load_image_preprocess(folder: Path, what: str) -> PilImagePreprocess:
    """Settings of the folder's image processor, executed by vlkit's PIL pipeline."""
    from transformers import AutoImageProcessor

    if not (folder / "preprocessor_config.json").is_file():
        raise VlkitError(
            f"{folder}: no preprocessor_config.json for this {what}; "
            "save the image processor into the checkpoint folder (image_processor.save_pretrained(folder))"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise VlkitError(f"{folder}/preprocessor_config.json: cannot be read ({exc}); fix or re-save the image processor") from None
    return PilImagePreprocess(PreprocessConfig.from_hf(processor, source=f"{folder}/preprocessor_config.json"))


def load_weights_strictly(cls: Any, folder: Path, what: str):
    """Load weights strictly: transformers only warns about missing weights and fills them randomly."""
    from safetensors import SafetensorError

    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise VlkitError(f"{folder}: cannot load the {what} weights ({type(exc).__name__}: {reason}); check the folder is complete") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        bad = (missing + mismatched)[:3]
        raise VlkitError(
            f"{folder}: the weights do not fit its {what} config ({len(missing)} missing, {len(mismatched)} of the wrong shape, "
            f"e.g. {', '.join(bad)}); the weights file belongs to another checkpoint"
        )
    return model


def load_hf_clip(folder: Path, spec: str) -> DualEncoderModel:
    """A `CLIPModel` folder (openai/clip-*, laion CLIP in HF format, any CLIP-architecture checkpoint)."""
    from transformers import CLIPModel

    model = load_weights_strictly(CLIPModel, folder, "CLIPModel")
    text_cfg = model.config.text_config
    tokenizer = load_tokenizer(folder, text_cfg.max_position_embeddings, "CLIPModel", text_cfg.vocab_size)
    return DualEncoderModel(
        spec=spec,
        kind="hf-clip",
        vision_model=model.vision_model,
        text_model=model.text_model,
        visual_projection=model.visual_projection,
        text_projection=model.text_projection,
        log_logit_scale=model.logit_scale,
        tokenizer=tokenizer,
        preprocess=load_image_preprocess(folder, "CLIPModel"),
        text_pooling="eot",
        description={"class": "CLIPModel", "config": model.config.to_diff_dict()},
    )


def load_hf_vision_text_dual_encoder(folder: Path, spec: str) -> DualEncoderModel:
    """A `VisionTextDualEncoderModel` folder: any vision tower, any text tower, pooler outputs projected."""
    from transformers import CLIPTextModel, VisionTextDualEncoderModel

    model = load_weights_strictly(VisionTextDualEncoderModel, folder, "VisionTextDualEncoderModel")
    text_model = model.text_model
    causal = isinstance(text_model, CLIPTextModel)
    if not causal and not hasattr(text_model, "pooler"):
        raise VlkitError(
            f"{folder}: the {type(text_model).__name__} text tower has no pooler, which VisionTextDualEncoderModel needs"
        )
    max_positions = getattr(model.config.text_config, "max_position_embeddings", None)
    return DualEncoderModel(
        spec=spec,
        kind="hf-vision-text-dual-encoder",
        vision_model=model.vision_model,
        text_model=text_model,
        visual_projection=model.visual_projection,
        text_projection=model.text_projection,
        log_logit_scale=model.logit_scale,
        tokenizer=load_tokenizer(
            folder, max_positions, "VisionTextDualEncoderModel", getattr(model.config.text_config, "vocab_size", None)
        ),
        preprocess=load_image_preprocess(folder, "VisionTextDualEncoderModel"),
        text_pooling="eot" if causal else "pooler",
        description={"class": "VisionTextDualEncoderModel", "config": model.config.to_diff_dict()},
    )

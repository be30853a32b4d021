"""Original BLIP checkpoints (salesforce/BLIP `.pth`) <-> `BlipModel`.

The original code saves `{"model": state_dict}` of its modules (`models/blip*.py`):
a timm-style ViT `visual_encoder` (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`), BERT
stacks from `models/med.py` whose names transformers' BLIP text classes kept
(`text_encoder.*`, `text_decoder.bert.*`, `text_decoder.cls.*`), and `vision_proj`,
`text_proj`, `itm_head`, `temp`. Retrieval (`model_base_retrieval_*`), captioning
(`model_base_caption*`) and pretraining (`model_base*`) checkpoints differ only in
which parts they hold; the pretraining ones also hold momentum encoders
(`*_m.*`) and feature queues, which a trained model does not need and vlkit
skips (listed in `LoadedBlip.notes`).

Files are read with `torch.load(weights_only=True)` only: a file that pickles
anything but tensors and plain containers is refused, never executed.

Shapes give every size but the number of attention heads; BLIP's ViTs and BERTs
use 64-wide heads (base 768/12, large 1024/16), which is the default.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from vlkit import io
from vlkit.blip.checkpoint import LoadedBlip, blip_preprocess
from vlkit.blip.model import BlipModel
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError
from vlkit.models.preprocess import PilImagePreprocess

HEAD_WIDTH = 64
# (original name under visual_encoder., transformers name under vision_model.); {i} a layer, {p} weight|bias
_VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]
_SAME_NAMES = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")
# Parts of pretraining/retrieval checkpoints a trained model does not use: momentum encoders, queues.
_SKIPPED = re.compile(r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.|^(image_queue|text_queue|idx_queue|queue_ptr|ptr_queue)$")
_POSITION_IDS = re.compile(r"(^|\.)position_ids$")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$")


_TO_HF = [(_pattern(orig), hf) for orig, hf in _VISION_NAMES]
_TO_ORIGINAL = [(_pattern(hf), orig) for orig, hf in _VISION_NAMES]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def original_to_hf_name(name: str) -> str | None:
    """vlkit/transformers name of an original BLIP tensor; None for one vlkit skips."""
    if _SKIPPED.search(name) or _POSITION_IDS.search(name):
        return None
    if name == "temp" or name.startswith(_SAME_NAMES):
        return name
    if name.startswith("visual_encoder."):
        renamed = _rename(name[len("visual_encoder."):], _TO_HF)
        if renamed is not None:
            return "vision_model." + renamed
    raise KeyError(name)


def hf_to_original_name(name: str) -> str:
    """Original BLIP name of a vlkit/transformers BlipModel tensor."""
    if name.startswith("vision_model."):
        renamed = _rename(name[len("vision_model."):], _TO_ORIGINAL)
        if renamed is None:
            raise KeyError(name)
        return "visual_encoder." + renamed
    return name


# ---------------------------------------------------------------- reading


def read_state(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in an original BLIP file (`{"model": ...}` or a bare state dict), tensors only.

    `mmap=True` maps the tensors instead of reading them (enough to look at names and shapes).
    """
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        what = f" (it pickles {found.group(1)})" if found else ""
        raise VlkitError(
            f"{path}: refused: not a plain tensor checkpoint{what}; vlkit loads .pth files with "
            "torch.load(weights_only=True) and never unpickles code: re-save its state dict alone"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        if mmap and "mmap" in str(exc):  # a legacy (pre-zip) torch file cannot be mapped: read it
            return read_state(path)
        reason = re.split(r"(?<=\.)\s", str(exc).strip(), maxsplit=1)[0][:160] if str(exc).strip() else type(exc).__name__
        raise VlkitError(f"{path}: cannot be read as a torch checkpoint ({reason}); check the file is complete") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise VlkitError(f"{path}: holds no state dict (expected {{'model': state_dict}} as BLIP saves, or a state dict)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise VlkitError(f"{path}: entries that are not tensors ({', '.join(map(str, bad[:3]))}); not a BLIP state dict")
    return state


def _layers(state: dict[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if not found or found != set(range(len(found))):
        raise VlkitError(f"layers {sorted(found)} matching {pattern!r}: not a complete BLIP stack")
    return len(found)


def _heads(width: int, heads: int | None, what: str) -> int:
    heads = heads or max(width // HEAD_WIDTH, 1)
    if width % heads:
        raise VlkitError(f"{what}: width {width} is not divisible by {heads} heads; pass the number of heads")
    return heads


def configs_from_state(
    state: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None
) -> tuple[Any, Any, int]:
    """(BlipVisionConfig, BlipTextConfig, embed_dim) read from the tensors' shapes (renamed state)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    pos = state["vision_model.embeddings.position_embedding"]
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    width, grid = int(pos.shape[-1]), int(pos.shape[1]) - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise VlkitError(f"vision position embeddings for {grid} patches: not a square grid")
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=_layers(state, r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.weight$"),
        num_attention_heads=_heads(width, vision_heads, "vision"),
        image_size=side * int(patch.shape[-1]),
        patch_size=int(patch.shape[-1]),
        layer_norm_eps=1e-6,  # BLIP's ViT (partial(nn.LayerNorm, eps=1e-6))
        hidden_act="gelu",
    )
    prefix = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state else "text_decoder.bert."
    words = state[prefix + "embeddings.word_embeddings.weight"]
    hidden = int(words.shape[1])
    text = BlipTextConfig(
        vocab_size=int(words.shape[0]),
        hidden_size=hidden,
        encoder_hidden_size=int(state[prefix + "encoder.layer.0.crossattention.self.key.weight"].shape[1]),
        intermediate_size=int(state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        num_hidden_layers=_layers(state, "^" + re.escape(prefix) + r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight$"),
        num_attention_heads=_heads(hidden, text_heads, "text"),
        max_position_embeddings=int(state[prefix + "embeddings.position_embeddings.weight"].shape[0]),
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    embed_dim = int(state["vision_proj.weight"].shape[0]) if "vision_proj.weight" in state else 256
    return vision, text, embed_dim


def load_original(
    path: str | Path, *, spec: str | None = None, vision_heads: int | None = None, text_heads: int | None = None
) -> LoadedBlip:
    """A BlipModel from an original BLIP `.pth` (retrieval, captioning or pretraining checkpoint).

    Preprocessing is BLIP's: resize to the checkpoint's image size (bicubic),
    OpenAI CLIP mean/std; the tokenizer BERT uncased + [DEC]/[ENC] (ids 30522/30523).
    """
    path = Path(path)
    raw = read_state(path)
    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    for name, tensor in raw.items():
        try:
            new = original_to_hf_name(name)
        except KeyError:
            unknown.append(name)
            continue
        if new is None:
            skipped.append(name)
        else:
            state[new] = tensor
    if unknown:
        raise VlkitError(
            f"{path}: {len(unknown)} tensors that are not BLIP's ({', '.join(unknown[:3])}); "
            "vlkit converts BLIP retrieval, captioning and pretraining checkpoints"
        )
    has_encoder = "text_encoder.embeddings.word_embeddings.weight" in state
    has_decoder = "text_decoder.bert.embeddings.word_embeddings.weight" in state
    if "vision_model.embeddings.position_embedding" not in state or not (has_encoder or has_decoder):
        raise VlkitError(f"{path}: no BLIP vision encoder and text encoder/decoder in it; not a BLIP checkpoint")
    vision, text, embed_dim = configs_from_state(state, vision_heads, text_heads)
    model = BlipModel(vision, text, embed_dim, with_encoder=has_encoder, with_decoder=has_decoder)
    for alias, source in model.tied_aliases().items():
        if alias in state and source in state and not torch.equal(state[alias], state[source]):
            raise VlkitError(f"{path}: {alias} differs from {source}, which BLIP ties to it; not a BLIP model vlkit can hold")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VlkitError(
            f"{path}: does not fit a BLIP model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"e.g. {', '.join((missing + unexpected)[:3])}); the checkpoint is incomplete"
        )
    tokenizer = BlipTokenizer.from_minilm(context_length=min(512, text.max_position_embeddings))
    if tokenizer.vocab_size != text.vocab_size:
        raise VlkitError(f"{path}: {text.vocab_size} word embeddings, but BLIP's tokenizer has {tokenizer.vocab_size} tokens")
    notes = [f"skipped {len(skipped)} momentum-encoder/queue tensors"] if skipped else []
    preprocess = PilImagePreprocess(blip_preprocess(vision.image_size))
    return LoadedBlip(model.eval(), tokenizer, preprocess, spec or str(path), "blip-original", notes)


# ---------------------------------------------------------------- writing


@torch.no_grad()
def save_original(model: BlipModel, path: str | Path) -> None:
    """Write `{"model": state_dict}` in the original BLIP names (tied tensors under every name, as BLIP saves)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.full_state_dict().items():
        state[hf_to_original_name(name)] = tensor.detach().cpu().clone()
    positions = model.text_config.max_position_embeddings
    for prefix, present in (("text_encoder.", model.has_encoder), ("text_decoder.bert.", model.has_decoder)):
        if present:  # med.py's BertEmbeddings registers position_ids as a persistent buffer
            state[prefix + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    with io.atomic_path(path) as tmp:
        torch.save({"model": state}, str(tmp))

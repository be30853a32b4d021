"""open_clip models behind `VLModel` (the optional `open_clip` extra).

Spec: `open_clip:ARCH` (random init), `open_clip:ARCH:FILE` (a local checkpoint
file), `open_clip:ARCH:TAG` (a pretrained tag, only if its weights are already in
the local cache: vlkit never downloads), or `open_clip:hf-hub:ORG/NAME` /
`open_clip:local-dir:FOLDER` (open_clip's own schemes, resolved offline).

Features come from open_clip's own `encode_image` / `encode_text`, so they are
open_clip's by construction. `encode_text_embeddings` runs that same
`encode_text` with the word-embedding lookup swapped for the given embeddings and
with stand-in token ids that make open_clip pool, and mask padding, at exactly the
positions the attention mask marks. That keeps it equal to `encode_text` across
open_clip versions without copying their forward code.

Image preprocessing reproduces open_clip's eval transform (Resize shortest edge +
CenterCrop, or squash; torchvision's rounded crop offset; RGB conversion after
resizing; ToTensor; Normalize) with PIL and numpy, since vlkit has no torchvision.
SigLIP-style `logit_bias` is ignored: it does not change rankings.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.errors import VlkitError
from vlkit.models.base import TextBatch, VLModel
from vlkit.models.fingerprint import fingerprint
from vlkit.models.preprocess import PilImagePreprocess, PreprocessConfig

INSTALL_HINT = "the open_clip extra is not installed; pip install 'vlkit[open_clip]' (it needs torchvision)"


def import_open_clip():
    """open_clip, or one clear `VlkitError` saying how to install it."""
    try:
        import open_clip
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "torchvision":
            raise VlkitError(f"open_clip models: {INSTALL_HINT}") from None
        raise VlkitError(
            "open_clip models: open_clip is installed but torchvision, which it imports, is not; "
            "pip install 'vlkit[open_clip]' with a torchvision built for this torch"
        ) from None
    return open_clip


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'open_clip:ARCH[:PRETRAINED]' -> (ARCH, PRETRAINED or None); hf-hub:/local-dir: names stay whole."""
    rest = spec[len("open_clip:") :]
    if not rest:
        raise VlkitError(f"model {spec!r}: give an architecture, e.g. open_clip:ViT-B-32 or open_clip:ViT-B-32:/path/weights.safetensors")
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    arch, _, pretrained = rest.partition(":")
    return arch, (pretrained or None)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Make Hugging Face Hub lookups inside open_clip use the local cache only."""
    import huggingface_hub.constants as hf_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _resolve_pretrained(open_clip: Any, arch: str, pretrained: str | None, spec: str) -> str | None:
    """A local file stays as is; a tag must be cached already (its URL weights in open_clip's cache folder)."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.exists():
        return str(path)
    if pretrained.startswith((".", "/", "~")) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise VlkitError(f"model {spec!r}: checkpoint file {pretrained} does not exist")
    try:
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    except Exception:  # noqa: BLE001 - open_clip raises various errors for unknown names
        cfg = None
    if not cfg:
        raise VlkitError(f"model {spec!r}: {pretrained!r} is neither a file nor a pretrained tag open_clip knows for {arch}")
    if cfg.get("hf_hub"):
        from huggingface_hub import snapshot_download

        repo_id = cfg["hf_hub"].strip("/").split("/")
        try:
            snapshot_download(repo_id="/".join(repo_id[:2]), local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            raise VlkitError(
                f"model {spec!r}: weights for tag {pretrained!r} are not in the local Hugging Face cache "
                "(vlkit never downloads); pass a checkpoint file"
            ) from None
        return pretrained  # open_clip finds them in the cache (offline)
    url = cfg.get("url")
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url or "")
    if url and cached.is_file():
        return str(cached)
    raise VlkitError(f"model {spec!r}: weights for tag {pretrained!r} are not cached locally (vlkit never downloads); pass a checkpoint file")


def preprocess_from_open_clip(cfg: dict[str, Any]) -> PreprocessConfig:
    """open_clip's eval-transform settings as a vlkit `PreprocessConfig`."""
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest" and h == w:
        resize, rsize, crop = "shortest_edge", h, (h, w)
    elif mode == "squash":
        resize, rsize, crop = "exact", (h, w), None
    else:
        raise VlkitError(f"open_clip preprocessing resize_mode={mode!r} with size {size} is not supported by vlkit's PIL pipeline")
    interpolation = cfg.get("interpolation", "bicubic")
    return PreprocessConfig(
        resize=resize,  # type: ignore[arg-type]
        size=rsize,
        resample=interpolation,
        crop_size=crop,
        rescale_factor=1 / 255,
        mean=tuple(float(x) for x in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(float(x) for x in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        crop_rounding="round",
        alpha="drop",
    )


class OpenClipTokenizer:
    """open_clip's tokenizer (SimpleTokenizer or its HF wrapper) behind vlkit's `Tokenizer`.

    Batches have open_clip's fixed context length (its positional embedding needs
    it); the mask marks everything up to the EOT token (or the non-pad tokens).
    """

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.oc = tokenizer
        self.context_length = int(context_length)
        self.hf = getattr(tokenizer, "tokenizer", None)  # open_clip.tokenizer.HFTokenizer wraps a HF tokenizer

    def mask_for(self, ids: torch.Tensor) -> torch.Tensor:
        eot = getattr(self.oc, "eot_token_id", None)
        if eot is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            last = (ids == eot).int().argmax(dim=-1, keepdim=True)
            return (positions <= last).long()
        return (ids != self.hf.pad_token_id).long()

    def __call__(self, texts: Sequence[str]) -> TextBatch:
        texts = list(texts)
        if not texts:
            empty = torch.zeros((0, self.context_length), dtype=torch.long)
            return TextBatch(empty, empty.clone())
        ids = self.oc(texts, context_length=self.context_length).long()
        return TextBatch(ids, self.mask_for(ids))

    def tokens(self, text: str) -> list[int]:
        if self.hf is not None:
            return list(self.hf(text, add_special_tokens=False)["input_ids"])
        return list(self.oc.encode(text))

    def id_to_token(self, token_id: int) -> str:
        if self.hf is not None:
            return str(self.hf.convert_ids_to_tokens(int(token_id)))
        return self.oc.decoder[int(token_id)]

    @property
    def vocab_size(self) -> int:
        return len(self.hf) if self.hf is not None else len(self.oc.encoder)

    def describe(self) -> dict:
        return {"class": type(self.oc).__name__, "vocab_size": self.vocab_size, "context_length": self.context_length}


class _GivenEmbeddings(nn.Module):
    """Stands in for a word-embedding table and returns embeddings handed to it."""

    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__()
        self.embeds = embeds

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeds


class OpenClipModel(VLModel):
    """An open_clip CLIP / CustomTextCLIP behind `VLModel`."""

    def __init__(self, model: nn.Module, tokenizer: OpenClipTokenizer, preprocess: PilImagePreprocess, spec: str, arch: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.spec = spec
        self.arch = arch
        self.text_pooling = "eot"
        text = getattr(model, "text", model)
        self._hf_text = hasattr(text, "transformer") and hasattr(text.transformer, "get_input_embeddings") and hasattr(text, "pooler")
        if self._hf_text:
            pooler = type(text.pooler).__name__.lower()
            self.text_pooling = "mean" if "mean" in pooler else "cls"
        with torch.no_grad():
            probe = self.tokenizer(["a"])
            self.embed_dim = int(self.model.encode_text(probe.input_ids).shape[-1])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.model.encode_image(pixel_values)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.model.encode_text(input_ids)
        return F.normalize(features, dim=-1) if normalize else features

    def _embedding_owner(self) -> tuple[nn.Module, str]:
        """The module and attribute holding the word-embedding table open_clip's encode_text uses."""
        text = getattr(self.model, "text", self.model)
        if self._hf_text:
            hf = text.transformer
            emb = hf.get_input_embeddings()
            for owner in hf.modules():
                for name, child in owner.named_children():
                    if child is emb:
                        return owner, name
        return text, "token_embedding"

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        owner, name = self._embedding_owner()
        return getattr(owner, name)(input_ids)

    def _stand_in_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids that make open_clip pool and mask exactly where `attention_mask` says."""
        mask = attention_mask.long()
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * (positions + 1)).argmax(dim=-1, keepdim=True)
        text = getattr(self.model, "text", self.model)
        if self._hf_text:
            pad = int(text.config.pad_token_id)
            return torch.where(mask.bool(), torch.full_like(mask, pad + 1), torch.full_like(mask, pad))
        pool = getattr(self.model, "text_pool_type", getattr(text, "pool_type", "argmax"))
        pad = int(getattr(text, "pad_id", 0))
        if pool == "eos":
            eos = int(getattr(self.model, "text_eos_id", getattr(text, "eos_id", 0)))
            filler = torch.where(mask.bool(), torch.full_like(mask, pad + 1 if pad + 1 != eos else pad + 2), torch.full_like(mask, pad))
            return filler.scatter(1, last, eos)
        # argmax pooling: ids grow along real tokens, so the largest sits on the last real one; pads stay pad.
        return torch.where(mask.bool(), pad + 1 + positions.expand_as(mask), torch.full_like(mask, pad))

    def encode_text_embeddings(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        owner, name = self._embedding_owner()
        table = getattr(owner, name)
        short = self.tokenizer.context_length - inputs_embeds.shape[1]
        if short > 0 and not self._hf_text:
            # open_clip's CLIP adds its whole position table (and causal mask), so a
            # truncated prompt is padded back to the context length; in a causal tower
            # the padding after EOT cannot change the pooled EOT state.
            inputs_embeds = F.pad(inputs_embeds, (0, 0, 0, short))
            attention_mask = F.pad(attention_mask, (0, short))
        setattr(owner, name, _GivenEmbeddings(inputs_embeds))
        try:
            features = self.model.encode_text(self._stand_in_ids(attention_mask))
        finally:
            setattr(owner, name, table)
        return F.normalize(features, dim=-1) if normalize else features

    def shared_prefix_encoder(self):
        if self._hf_text:
            return None
        from vlkit.models.shared_prefix import open_clip_text_encoder

        return open_clip_text_encoder(self.model)

    def fingerprint(self) -> str:
        return fingerprint(
            self,
            {"kind": "open_clip", "arch": self.arch, "preprocess": self.preprocess.describe(), "tokenizer": self.tokenizer.describe()},
        )


def load_open_clip(spec: str) -> OpenClipModel:
    """Build an open_clip model from `spec`, offline, on CPU in float32."""
    open_clip = import_open_clip()
    arch, pretrained = parse_spec(spec)
    pretrained = _resolve_pretrained(open_clip, arch, pretrained, spec)
    try:
        with _offline():
            model = open_clip.create_model(arch, pretrained=pretrained, device="cpu", precision="fp32")
            tokenizer = open_clip.get_tokenizer(arch)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0].split(". Available")[0][:200]
        raise VlkitError(f"model {spec!r}: open_clip could not build it offline ({reason})") from None
    context_length = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
    preprocess = PilImagePreprocess(preprocess_from_open_clip(dict(preprocess_cfg)))
    return OpenClipModel(model.eval(), OpenClipTokenizer(tokenizer, context_length), preprocess, spec, arch)

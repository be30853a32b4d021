"""The one interface every vision-language backbone in vlkit implements.

Methods (zero-shot, CoOp and its neighbours, retrieval, pretraining) talk only to
`VLModel`; adapters in this package wrap Hugging Face CLIP, Hugging Face
vision+text dual encoders, open_clip and vlkit's own models behind it.

Conventions every adapter keeps:
- `encode_image`, `encode_text` and `encode_text_embeddings` return L2-normalised
  features by default (`normalize=False` gives the raw projections).
- Text batches are right-padded; `attention_mask` marks real tokens. For causal
  (CLIP-style) towers the pooled token is the last real token (EOT), so
  `encode_text_embeddings` can find it from the mask alone.
- `token_embedding(ids)` is the word-embedding lookup only (no positions): prompt
  learning replaces some of its rows and hands the result to
  `encode_text_embeddings`, which adds positions and runs the tower.
- `shared_prefix_encoder()` is the exact shortcut for prompts that share a prefix
  in a causal tower (`vlkit.models.shared_prefix`); None where it does not apply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Sequence

import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from vlkit.models.shared_prefix import SharedPrefixEncoder

TextPooling = Literal["eot", "cls", "mean", "pooler"]


@dataclass
class TextBatch:
    """Right-padded token ids and their attention mask, both [batch, length]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "TextBatch":
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device))


class Tokenizer(Protocol):
    """Turns strings into a `TextBatch`; knows its vocabulary for reading prompts back."""

    context_length: int

    def __call__(self, texts: Sequence[str]) -> TextBatch: ...

    def tokens(self, text: str) -> list[int]:
        """Token ids of `text` alone, without start/end/special tokens."""
        ...

    def id_to_token(self, token_id: int) -> str: ...

    @property
    def vocab_size(self) -> int: ...


class ImagePreprocess(Protocol):
    """PIL image -> float tensor [3, H, W], as the checkpoint was trained."""

    image_size: int

    def __call__(self, image: Image.Image) -> torch.Tensor: ...

    def describe(self) -> dict:
        """Every setting that changes the output; part of feature-cache keys."""
        ...


class VLModel(nn.Module, ABC):
    """A dual encoder: image tower, text tower, shared embedding space."""

    spec: str
    tokenizer: Tokenizer
    preprocess: ImagePreprocess
    text_pooling: TextPooling
    embed_dim: int

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """exp(learned log temperature): multiplies cosine similarities into logits."""

    @abstractmethod
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, embed_dim] features."""

    @abstractmethod
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, L] token ids -> [B, embed_dim] features."""

    @abstractmethod
    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, width] word embeddings (no positions)."""

    @abstractmethod
    def encode_text_embeddings(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """[B, L, width] word embeddings -> [B, embed_dim] features; equals `encode_text`
        when `inputs_embeds == token_embedding(input_ids)`."""

    def shared_prefix_encoder(self) -> "SharedPrefixEncoder | None":
        """The exact shared-prefix path of a causal text tower, or None (the default:
        BERT-style towers, and any tower an adapter does not describe)."""
        return None

    @abstractmethod
    def fingerprint(self) -> str:
        """A short stable hash of weights, config and preprocessing: changes when the model does."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised features for a list of strings, batched, on the model's device."""
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[i : i + batch_size]).to(self.device)
            out.append(self.encode_text(batch.input_ids, batch.attention_mask))
        if not out:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.cat(out)

"""A tiny VLModel with a word-level tokenizer, for CoOp tests that need a fast,
fully controlled backbone (causal EOT pooling or bidirectional CLS pooling).

The real backends (tiny HF CLIP, tiny ViT+BERT dual encoder) are tested through
the conftest fixtures; this one exists so that training tests can run hundreds of
steps in a second and so the learner is checked against a tokenizer whose
special tokens differ from both.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlkit.models.base import TextBatch, VLModel

WORDS = "a photo of an the x cat dog bird fish car tree red blue green heart face flag . , small big".split()


class WordTokenizer:
    """Whitespace tokenizer; '.' and ',' are their own tokens; unknown words map to <unk>."""

    def __init__(self, start: str, end: str, context_length: int = 24) -> None:
        self.vocab = ["<pad>", "<unk>", start, end, *WORDS]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.start, self.end = self.index[start], self.index[end]
        self.context_length = context_length

    def tokens(self, text: str) -> list[int]:
        words = text.lower().replace(".", " . ").replace(",", " , ").split()
        return [self.index.get(w, 1) for w in words]

    def __call__(self, texts: Sequence[str]) -> TextBatch:
        rows = [[self.start, *self.tokens(t), self.end][: self.context_length] for t in texts]
        length = max(map(len, rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return TextBatch(ids, mask)

    def id_to_token(self, token_id: int) -> str:
        return self.vocab[token_id]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


class Preprocess:
    image_size = 8

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    def describe(self) -> dict:
        return {"size": 8, "resample": "bicubic"}


class FakeVLModel(VLModel):
    """2-layer transformer text tower (causal + EOT pooling, or bidirectional + CLS pooling)."""

    def __init__(self, causal: bool = True, width: int = 16, embed_dim: int = 8, seed: int = 0, log_scale: float = 2.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.causal = causal
        self.spec = f"fake-{'causal' if causal else 'bidir'}-{seed}-{log_scale}"
        self.tokenizer = WordTokenizer("<sos>", "<eot>") if causal else WordTokenizer("[cls]", "[sep]")
        self.preprocess = Preprocess()
        self.text_pooling = "eot" if causal else "cls"
        self.embed_dim = embed_dim
        self.embed = nn.Embedding(self.tokenizer.vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)  # CLIP's initialisation scale: CoOp's lr assumes it
        self.pos = nn.Parameter(torch.randn(self.tokenizer.context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.tower = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.text_proj = nn.Linear(width, embed_dim, bias=False)
        self.image_proj = nn.Linear(3 * 8 * 8, embed_dim)
        self._log_scale = nn.Parameter(torch.tensor(float(log_scale)))
        self.eval()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._log_scale.exp()

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.image_proj(pixel_values.flatten(1))
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def encode_text_embeddings(self, inputs_embeds, attention_mask, normalize: bool = True) -> torch.Tensor:
        length = inputs_embeds.shape[1]
        x = inputs_embeds + self.pos[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1) if self.causal else None
        x = self.tower(x, mask=causal, src_key_padding_mask=attention_mask == 0)
        if self.causal:
            pooled = x[torch.arange(x.shape[0]), attention_mask.sum(1) - 1]
        else:
            pooled = x[:, 0]
        f = self.text_proj(pooled)
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, input_ids, attention_mask, normalize: bool = True) -> torch.Tensor:
        return self.encode_text_embeddings(self.token_embedding(input_ids), attention_mask, normalize)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.spec.encode())
        for p in self.parameters():
            h.update(p.detach().numpy().tobytes())
        return h.hexdigest()[:16]

"""A transparent VLModel for retrieval tests, and a small coloured-square collection.

`ColorModel` embeds an image as its mean colour and a text as the sum of the colour
words it contains, so the right answer of every search is known in advance: "red"
must find the red square, the red square must find "a red square". Random tiny
checkpoints cannot give such checks; the HF-backed tests elsewhere cover real models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlkit.models.base import TextBatch, VLModel

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
VOCAB = ["<pad>", *COLORS, "a", "square", "of"]
DIM = 8


class _Tokenizer:
    context_length = 8

    def __call__(self, texts: Sequence[str]) -> TextBatch:
        ids = [[VOCAB.index(w) if w in VOCAB else 0 for w in t.lower().split()][: self.context_length] or [0] for t in texts]
        width = max(len(r) for r in ids)
        input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
        return TextBatch(input_ids, mask)

    def tokens(self, text: str) -> list[int]:
        return self([text]).input_ids[0].tolist()

    def id_to_token(self, token_id: int) -> str:
        return VOCAB[token_id]

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)


class _Preprocess:
    image_size = 4

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def describe(self) -> dict:
        return {"size": 4, "kind": "color-test"}


class ColorModel(VLModel):
    """Image = mean RGB, text = sum of its colour words' RGB; `variant` changes the fingerprint only."""

    text_pooling = "mean"
    embed_dim = DIM

    def __init__(self, variant: str = "a"):
        super().__init__()
        self.spec = f"color-test-{variant}"
        self.variant = variant
        self.tokenizer = _Tokenizer()
        self.preprocess = _Preprocess()
        table = torch.zeros(len(VOCAB), DIM)
        for i, name in enumerate(COLORS, start=1):
            table[i, :3] = torch.tensor(COLORS[name], dtype=torch.float32) / 255.0
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.eps = torch.nn.Parameter(torch.full((DIM,), 1e-3), requires_grad=False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(100.0)

    def _out(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        x = x + self.eps
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        rgb = pixel_values.float().mean(dim=(2, 3))
        return self._out(torch.cat([rgb, torch.zeros(rgb.shape[0], DIM - 3)], dim=1), normalize)

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]

    def encode_text_embeddings(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._out((inputs_embeds * attention_mask[..., None]).sum(1), normalize)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode_text_embeddings(self.token_embedding(input_ids), attention_mask, normalize)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"color-test:{self.variant}".encode()).hexdigest()[:16]


def make_squares(folder: Path, names: Sequence[str] = tuple(COLORS), size: int = 12) -> list[Path]:
    """One solid square per colour name, as PNG files `<name>.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        p = folder / f"{name}.png"
        Image.new("RGB", (size, size), COLORS[name]).save(p)
        paths.append(p)
    return paths


def make_caption_table(folder: Path) -> Path:
    """JSONL rows {image, label, caption} for the colour squares, two captions per image."""
    make_squares(folder / "img")
    table = folder / "captions.jsonl"
    rows = []
    for name in COLORS:
        rows.append({"image": f"img/{name}.png", "label": name, "caption": f"a {name} square"})
        rows.append({"image": f"img/{name}.png", "label": name, "caption": f"{name}"})
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table

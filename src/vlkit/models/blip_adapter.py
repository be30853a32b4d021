"""A BLIP model as a `VLModel`: its ITC features make it a dual encoder.

Image features are `vision_proj` of the ViT's [CLS] token, text features
`text_proj` of the unimodal text encoder's [CLS] (BLIP's ITC), and the logit
scale is 1 / temp. So zero-shot classification, retrieval, the few-shot
benchmark and CoOp run on a BLIP text encoder unchanged; `blip` gives the
underlying `BlipModel` (ITM, captioning) and `loaded` its tokenizer and
preprocessing as one `LoadedBlip`.

Loaded by `vlkit.models.load_model` from Hugging Face BLIP retrieval folders
(model_type "blip"), vlkit-blip folders and original BLIP `.pth` files. A
captioning-only checkpoint has no ITC heads and is refused with one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.models.base import VLModel
from vlkit.models.fingerprint import fingerprint


class BlipVLModel(VLModel):
    """BLIP's ITC half behind the `VLModel` interface ([CLS] pooling, 1/temp logit scale)."""

    def __init__(self, loaded) -> None:
        super().__init__()
        model = loaded.model
        if not model.has_encoder:
            raise VlkitError(
                f"{loaded.spec}: a BLIP captioning checkpoint has no text encoder or ITC projections, which a "
                "dual-encoder use needs; load a BLIP retrieval checkpoint, or use it for captioning (vlkit.blip)"
            )
        self.blip: nn.Module = model
        self.spec = loaded.spec
        self.kind = loaded.kind
        self.notes = list(loaded.notes)
        self.tokenizer = loaded.tokenizer
        self.preprocess = loaded.preprocess
        self.text_pooling = "cls"
        self.embed_dim = int(model.embed_dim)

    @property
    def loaded(self):
        from vlkit.blip.checkpoint import LoadedBlip

        return LoadedBlip(self.blip, self.tokenizer, self.preprocess, self.spec, self.kind, list(self.notes))

    @property
    def logit_scale(self) -> torch.Tensor:
        return 1.0 / self.blip.temp

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.blip.image_feat(self.blip.image_embeds(pixel_values), normalize=normalize)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.blip.text_feat(input_ids, attention_mask, normalize=normalize)

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.blip.text_encoder.get_input_embeddings()(input_ids)

    def encode_text_embeddings(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        return self.blip.text_feat(None, attention_mask, normalize=normalize, inputs_embeds=inputs_embeds)

    def fingerprint(self) -> str:
        return fingerprint(
            self,
            {
                "kind": self.kind,
                "model": {"vision": self.blip.vision_config.to_diff_dict(), "text": self.blip.text_config.to_diff_dict(),
                          "embed_dim": self.embed_dim, "enc_token_id": self.blip.enc_token_id},
                "text_pooling": self.text_pooling,
                "preprocess": self.preprocess.describe(),
                "tokenizer": self.tokenizer.describe(),
            },
        )

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, kind={self.kind}, embed_dim={self.embed_dim}"


def load_blip_vlmodel(path: Path, spec: str) -> BlipVLModel:
    """Registry loader for BLIP folders and `.pth` files."""
    from vlkit.blip.checkpoint import load_blip

    loaded = load_blip(str(path))
    loaded.spec = spec
    return BlipVLModel(loaded)

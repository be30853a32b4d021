"""Exact shared-prefix text encoding for causal (CLIP-style) text towers.

In a causal tower a token's hidden states depend only on the tokens before it.
CoOp's prompts with unified context and the class token at the end all begin with
the same [SOS] + M context vectors; the prompts of one zero-shot template begin
with the same "[SOS] a photo of a". So the prefix is run through the tower once
(per step, per context), each layer's keys and values of the prefix are kept, and
only the remaining tokens of every class ("tench . [EOT]") are run, attending to
the cached prefix keys/values and causally to each other. The pooled EOT feature
is the same as the full pass's, up to float rounding; autograd sums the prefix's
gradient over the classes that read it.

Both supported towers are pre-LayerNorm transformers (x += attn(ln1(x));
x += mlp(ln2(x))), so one implementation serves both; an adapter only says where
each part lives (`CausalBlock`). A model that cannot take this path (BERT-style
towers, open_clip towers with a class embedding, no causal mask or first-token
pooling, attention dropout in training) returns None from
`VLModel.shared_prefix_encoder`, and callers run the full pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.models.towers import last_real_index

QKV = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class CausalBlock:
    """Where the parts of one pre-LN block live: x += scale1(out(attn(norm1 x))); x += scale2(mlp(norm2 x))."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    qkv: QKV  # normed hidden [..., W] -> queries, keys, values, each [..., W]
    out: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    scale1: Callable[[torch.Tensor], torch.Tensor] = _identity
    scale2: Callable[[torch.Tensor], torch.Tensor] = _identity


class SharedPrefixEncoder:
    """Text features of prompts that share a prefix, with the prefix run once."""

    def __init__(
        self,
        positions: torch.Tensor,
        blocks: list[CausalBlock],
        final_norm: Callable[[torch.Tensor], torch.Tensor],
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.positions = positions  # [max_positions, W] position embedding table
        self.blocks = blocks
        self.final_norm = final_norm
        self.project = project

    def encode(
        self,
        prefix_embeds: torch.Tensor,
        suffix_embeds: torch.Tensor,
        suffix_mask: torch.Tensor,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Features [G, C, D] of G prefixes [G, P, W] each followed by C right-padded
        suffixes [C, S, W] (`suffix_mask` [C, S] marks real tokens; every suffix holds
        at least its EOT). Word embeddings only: positions are added here."""
        g, p, width = prefix_embeds.shape
        c, s, _ = suffix_embeds.shape
        if p + s > self.positions.shape[0]:
            raise ValueError(f"prefix {p} + suffix {s} tokens exceed the tower's {self.positions.shape[0]} positions")
        if int(suffix_mask.sum(dim=1).min()) < 1:
            raise ValueError("every suffix needs at least one real token (its EOT)")
        x_p = prefix_embeds + self.positions[:p]
        x_s = (suffix_embeds + self.positions[p : p + s]).unsqueeze(0).expand(g, c, s, width)
        causal = torch.ones(s, s, dtype=torch.bool, device=x_s.device).tril()
        for block in self.blocks:
            x_p, x_s = _block(block, x_p, x_s, causal)
        hidden = self.final_norm(x_s)  # [G, C, S, W]
        eot = last_real_index(suffix_mask).to(hidden.device)
        pooled = hidden[:, torch.arange(c, device=hidden.device), eot]  # [G, C, W]
        features = self.project(pooled)
        return F.normalize(features, dim=-1) if normalize else features


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., T, W] -> [..., H, T, d]."""
    *lead, t, w = x.shape
    return x.view(*lead, t, heads, w // heads).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[..., H, T, d] -> [..., T, W]."""
    *lead, h, t, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, t, h * d)


def _block(block: CausalBlock, x_p: torch.Tensor, x_s: torch.Tensor, causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on the prefix [G, P, W] and the suffixes [G, C, S, W]."""
    g, c, s, _ = x_s.shape
    p = x_p.shape[1]
    q_p, k_p, v_p = (_heads(t, block.heads) for t in block.qkv(block.norm1(x_p)))  # [G, H, P, d]
    scale = q_p.shape[-1] ** -0.5
    attn_p = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=True, scale=scale)
    x_p = x_p + block.scale1(block.out(_merge(attn_p)))
    x_p = x_p + block.scale2(block.mlp(block.norm2(x_p)))

    q, k, v = (_heads(t, block.heads) for t in block.qkv(block.norm1(x_s)))  # [G, C, H, S, d]
    h, d = q.shape[2], q.shape[-1]
    q = q * scale
    # Scores against the prefix: every suffix token of every class reads the same
    # prefix keys, so the classes fold into one GEMM per (G, H) with no copy of them.
    q_rows = q.permute(0, 2, 1, 3, 4).reshape(g, h, c * s, d)
    to_prefix = (q_rows @ k_p.transpose(-1, -2)).view(g, h, c, s, p).permute(0, 2, 1, 3, 4)  # [G, C, H, S, P]
    to_suffix = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))  # [G, C, H, S, S]
    scores = torch.cat([to_prefix, to_suffix], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    probs_p, probs_s = probs[..., :p], probs[..., p:]
    rows_p = probs_p.permute(0, 2, 1, 3, 4).reshape(g, h, c * s, p)
    from_prefix = (rows_p @ v_p.to(rows_p.dtype)).view(g, h, c, s, d).permute(0, 2, 1, 3, 4)
    attn = from_prefix + probs_s @ v
    x_s = x_s + block.scale1(block.out(_merge(attn)))
    x_s = x_s + block.scale2(block.mlp(block.norm2(x_s)))
    return x_p, x_s


# -- the towers --------------------------------------------------------------------


def hf_clip_text_encoder(text_model: nn.Module, text_projection: nn.Module) -> SharedPrefixEncoder | None:
    """A transformers `CLIPTextModel` (the pooled EOT state, then `text_projection`)."""
    layers = text_model.encoder.layers
    if text_model.training and any(layer.self_attn.dropout > 0 for layer in layers):
        return None

    def qkv(attn: nn.Module) -> QKV:
        return lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

    blocks = [
        CausalBlock(
            norm1=layer.layer_norm1,
            qkv=qkv(layer.self_attn),
            out=layer.self_attn.out_proj,
            norm2=layer.layer_norm2,
            mlp=layer.mlp,
            heads=layer.self_attn.num_heads,
        )
        for layer in layers
    ]
    return SharedPrefixEncoder(text_model.embeddings.position_embedding.weight, blocks, text_model.final_layer_norm, text_projection)


def open_clip_text_encoder(model: nn.Module) -> SharedPrefixEncoder | None:
    """An open_clip `CLIP` (text parts on the model) or `CustomTextCLIP` with a
    `TextTransformer`, pooled at the EOT ("argmax"/"eos") under a causal mask."""
    text = getattr(model, "text", model)
    transformer = getattr(text, "transformer", None)
    blocks_in = getattr(transformer, "resblocks", None)
    pool = getattr(model, "text_pool_type", None) or getattr(text, "pool_type", None)
    if (
        blocks_in is None
        or getattr(text, "attn_mask", None) is None
        or getattr(text, "cls_emb", None) is not None
        or pool not in ("argmax", "eos")
        or not hasattr(text, "positional_embedding")
    ):
        return None
    blocks = []
    for block in blocks_in:
        attn = getattr(block, "attn", None)
        if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(attn, nn.MultiheadAttention):
            return None
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or (text.training and attn.dropout > 0):
            return None
        blocks.append(
            CausalBlock(
                norm1=block.ln_1,
                qkv=_packed_qkv(attn),
                out=attn.out_proj,
                norm2=block.ln_2,
                mlp=block.mlp,
                heads=attn.num_heads,
                scale1=block.ls_1,
                scale2=block.ls_2,
            )
        )
    projection = text.text_projection
    if projection is None:
        project = _identity
    elif isinstance(projection, nn.Linear):
        project = projection
    else:
        project = lambda x: x @ projection  # noqa: E731
    return SharedPrefixEncoder(text.positional_embedding, blocks, text.ln_final, project)


def _packed_qkv(attn: nn.MultiheadAttention) -> QKV:
    """nn.MultiheadAttention's packed input projection, split into q, k, v."""
    return lambda x: tuple(F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))  # type: ignore[return-value]

"""Forward passes over transformers towers that vlkit needs beyond their own `forward`.

`CLIPTextModel.forward` accepts only token ids, but prompt learning feeds word
embeddings. `clip_text_pooled_from_embeddings` repeats that forward step by step
(transformers 5.x, `modeling_clip.CLIPTextModel.forward`): add position embeddings,
build the causal + padding mask with `create_causal_mask`, run the encoder with
`is_causal=True`, apply the final layer norm, and pool. CLIP pools the first EOT
token; with right padding that is the last real token, which the attention mask
locates without looking at ids (prompt embeddings have no ids).
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.models.base import TextPooling


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row ([B, L] -> [B])."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=-1)


def clip_text_pooled_from_embeddings(
    text_model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """CLIPTextModel's pooled output for word embeddings instead of ids ([B, L, W] -> [B, W])."""
    from transformers.masking_utils import create_causal_mask

    embeddings = text_model.embeddings
    seq_length = inputs_embeds.shape[-2]
    max_positions = embeddings.position_embedding.weight.shape[0]
    if seq_length > max_positions:
        raise ValueError(f"sequence length {seq_length} exceeds the tower's {max_positions} positions")
    position_ids = embeddings.position_ids[:, :seq_length]
    hidden_states = inputs_embeds + embeddings.position_embedding(position_ids)
    # No cache; passed by position because transformers renamed it (past_key_values -> cache) within 5.x.
    mask = create_causal_mask(text_model.config, hidden_states, attention_mask, None)
    hidden_states = text_model.encoder(inputs_embeds=hidden_states, attention_mask=mask, is_causal=True).last_hidden_state
    hidden_states = text_model.final_layer_norm(hidden_states)
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, last_real_index(attention_mask).to(hidden_states.device)]


def pool_text(output, attention_mask: torch.Tensor, pooling: TextPooling) -> torch.Tensor:
    """Pool a BERT-style tower's output as the checkpoint defines it.

    - "pooler": the tower's own pooler (what `VisionTextDualEncoderModel` uses);
    - "cls": the first token's last hidden state;
    - "mean": masked mean over real tokens, sentence-transformers' formula
      (sum(h * m) / clamp(sum(m), 1e-9));
    - "eot": the last real token (for causal towers run through their own forward).
    """
    hidden = output.last_hidden_state
    if pooling == "pooler":
        if output.pooler_output is None:
            raise ValueError("text tower has no pooler layer; use 'cls' or 'mean' pooling")
        return output.pooler_output
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
    if pooling == "eot":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_real_index(attention_mask).to(hidden.device)]
    raise ValueError(f"unknown text pooling {pooling!r}")


def vision_pooled(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """A vision tower's pooled output ([B, 3, H, W] -> [B, width]).

    The tower's `pooler_output` when it has one (CLIP: post-LN CLS; ViT: dense+tanh
    on CLS; ResNet/ConvNeXt: global average pool, flattened); otherwise the CLS state.
    """
    out = vision_model(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out.last_hidden_state[:, 0]
    return pooled.flatten(1) if pooled.ndim > 2 else pooled

"""Gradient caching (Gao et al., 2021): a large contrastive batch in small memory.

The contrastive loss couples every pair in the batch, so it cannot be split into
independent micro-batches. GradCache splits the work instead:

1. embed every micro-batch without autograd (activations freed at once);
2. compute the loss over the whole batch from those embeddings and take its
   gradient with respect to the embeddings only (cheap: [B, D] tensors);
3. re-run each micro-batch with autograd and backpropagate the cached embedding
   gradients through it.

Step 3 replays the RNG state recorded in step 1, so dropout (and anything else
random inside the model) draws the same masks and the result is the full-batch
gradient. Step 1 does not update normalisation buffers (they are restored), so
each micro-batch updates them exactly once, in step 3.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def split_text(text, sizes: Sequence[int]):
    """Split a text input (pooled tensor or (ids, mask) pair) into micro-batches."""
    if torch.is_tensor(text):
        return list(torch.split(text, list(sizes)))
    ids, mask = text
    return list(zip(torch.split(ids, list(sizes)), torch.split(mask, list(sizes))))


def gradcache_backward(
    model: nn.Module,
    pixel_values: torch.Tensor,
    text,
    loss_fn: LossFn,
    micro_batch: int,
    *,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """Accumulate into `.grad` the gradient of `loss_fn` over the whole batch; return the loss.

    `model(pixels, text) -> (image_features, text_features, logit_scale)`. `no_sync`
    is DDP's context that defers the gradient all-reduce: every micro-batch but
    the last runs under it. `loss_scale` multiplies the gradients (fp16 scaler).
    """
    n = pixel_values.shape[0]
    sizes = [min(micro_batch, n - i) for i in range(0, n, micro_batch)]
    pixel_chunks = list(torch.split(pixel_values, sizes))
    text_chunks = split_text(text, sizes)
    device = pixel_values.device

    # 1. Embed without autograd; remember the RNG state each micro-batch started from.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng_states, img_parts, txt_parts = [], [], []
    scale = None
    with torch.no_grad():
        for px, tx in zip(pixel_chunks, text_chunks):
            rng_states.append(_rng_state(device))
            with autocast():
                img, txt, scale = model(px, tx)
            img_parts.append(img.float())
            txt_parts.append(txt.float())
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])

    # 2. Loss over the whole batch; gradients w.r.t. the embeddings and the scale only.
    img_all = torch.cat(img_parts).requires_grad_(True)
    txt_all = torch.cat(txt_parts).requires_grad_(True)
    scale_leaf = scale.detach().float().requires_grad_(True)
    loss = loss_fn(img_all, txt_all, scale_leaf)
    g_img, g_txt, g_scale = torch.autograd.grad(loss * loss_scale, [img_all, txt_all, scale_leaf])
    g_img_parts = torch.split(g_img, sizes)
    g_txt_parts = torch.split(g_txt, sizes)

    # 3. Re-run each micro-batch with autograd, replaying its RNG; backprop the cached grads.
    after = _rng_state(device)
    last = len(sizes) - 1
    for i, (px, tx) in enumerate(zip(pixel_chunks, text_chunks)):
        _set_rng_state(rng_states[i], device)
        ctx = no_sync() if i < last else contextlib.nullcontext()
        with ctx:
            with autocast():
                img, txt, sc = model(px, tx)
            outs, grads = [img, txt], [g_img_parts[i].to(img.dtype), g_txt_parts[i].to(txt.dtype)]
            if i == last:  # the scale is shared: its gradient is fed once
                outs.append(sc)
                grads.append(g_scale.to(sc.dtype))
            outs_g = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
            if outs_g:
                torch.autograd.backward([o for o, _ in outs_g], [g for _, g in outs_g])
    _set_rng_state(after, device)
    return loss.detach()

"""Model fingerprints: a short hash of configuration, preprocessing and every weight.

Feature caches and run configs key on it, so it must change whenever the model
does, yet stay cheap to ask for repeatedly. Weights are hashed once and the digest
is memoised under a key made of each tensor's storage pointer, shape and
autograd version counter; any in-place update (an optimizer step, `p.add_(...)`,
`load_state_dict`) bumps a version counter and so invalidates the memo.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def _tensor_key(name: str, t: torch.Tensor) -> tuple:
    return (name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))


def weights_digest(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of the state dict in name order, memoised on `module`."""
    state = module.state_dict()
    key = tuple(_tensor_key(name, t) for name, t in sorted(state.items()))
    memo = getattr(module, "_vlkit_weights_memo", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.detach().contiguous().cpu().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    digest = h.hexdigest()
    object.__setattr__(module, "_vlkit_weights_memo", (key, digest))
    return digest


def fingerprint(module: nn.Module, description: dict[str, Any]) -> str:
    """16 hex chars from the weights digest plus a JSON description (config, preprocessing, tokenizer)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(f"{weights_digest(module)}\n{text}".encode()).hexdigest()[:16]

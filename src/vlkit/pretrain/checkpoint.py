"""Training checkpoints: one safetensors file holds everything a resume needs.

Model weights, AdamW moments, scheduler and scaler state, the RNG states of
torch, numpy and python, and the data position (epoch, step) go into a single
file, written to a temporary name and renamed (vlkit.io), so a kill -9 at any
moment leaves either the previous checkpoint or the new one, never a torn one.
Non-tensor state travels as JSON in the safetensors metadata; nothing is
unpickled on load.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit import io
from vlkit.errors import VlkitError

FORMAT = "vlkit-pretrain-checkpoint-v1"


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def _set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    progress: dict[str, Any],
    config: dict[str, Any],
) -> None:
    """Write the full training state atomically."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model_state.items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value
    opt_scalars = {str(pid): {k: v for k, v in st.items() if not torch.is_tensor(v)} for pid, st in opt["state"].items()}
    rng_t, rng_meta = _rng_tensors()
    tensors.update(rng_t)
    meta = {
        "format": FORMAT,
        "progress": json.dumps(progress),
        "config": json.dumps(config),
        "opt_groups": json.dumps(opt["param_groups"]),
        "opt_scalars": json.dumps(opt_scalars),
        "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else None, default=_no_callables),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None and scaler.is_enabled() else None),
        "rng": json.dumps(rng_meta),
    }
    io.save_safetensors(path, tensors, metadata=meta)


def _no_callables(obj: Any) -> None:
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint: (tensors, metadata parsed from JSON)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise VlkitError(f"{path}: no checkpoint to resume from; start the run without --resume")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a corrupt or foreign file: one clear line
        raise VlkitError(f"{path}: not a readable safetensors checkpoint ({e}); delete it to restart") from None
    if meta.get("format") != FORMAT:
        raise VlkitError(f"{path}: not a vlkit pretraining checkpoint (format {meta.get('format')!r})")
    parsed = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    return tensors, parsed


def restore(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> dict[str, Any]:
    """Load the state into live objects; returns the saved progress."""
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if unexpected:
        raise VlkitError(f"checkpoint: weights {unexpected[:3]} do not fit this model; resume with the run's own config")
    state: dict[Any, dict[str, Any]] = {}
    for pid, scalars in meta["opt_scalars"].items():
        state[int(pid)] = dict(scalars)
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["opt_groups"]})
    if scheduler is not None and meta.get("scheduler") is not None:
        sched_state = dict(meta["scheduler"])
        sched_state.pop("lr_lambdas", None)
        scheduler.load_state_dict({**scheduler.state_dict(), **sched_state})
    if scaler is not None and meta.get("scaler") is not None:
        scaler.load_state_dict(meta["scaler"])
    _set_rng(tensors, meta["rng"])
    return meta["progress"]

"""Run folders: every command writes `config.json`, `metrics.json` and artefacts.

`config.json` records every setting, the seed, the model fingerprint and the
library versions, so a result can be traced to exactly what produced it.
"""

from __future__ import annotations

import datetime as _dt
import platform
import random
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from vlkit import io


def library_versions() -> dict[str, str]:
    """Versions of the libraries that can change a result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("vlkit", "torch", "transformers", "numpy", "pillow", "scikit-learn", "safetensors", "faiss-cpu"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a rerun gives the same numbers."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def new_run_dir(root: str | Path, command: str) -> Path:
    """A fresh, timestamped folder under `root` (e.g. runs/zeroshot-20261123-054500)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{command}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_config(run_dir: str | Path, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Write config.json: the settings plus versions and a timestamp."""
    config = {
        "settings": _plain(settings),
        **_plain(extra),
        "versions": library_versions(),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    io.write_json(Path(run_dir) / "config.json", config)
    return config


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    io.write_json(Path(run_dir) / "metrics.json", _plain(metrics))

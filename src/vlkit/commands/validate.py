"""Argument checks every command runs before it loads a model or creates an output.

Each check raises `VlkitError("<flag> <value>: what is wrong; what to do")`, which
the CLI prints as one `error:` line with exit code 2. Checks are cheap (no torch
import except for `device`), so a typo fails in a moment, not after a model has
loaded or a run folder has been made. Commands call these first, then do work.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from vlkit.errors import VlkitError


def at_least(flag: str, value: int | None, minimum: int = 1) -> None:
    """An integer option that must be >= `minimum` (None = not given, allowed)."""
    if value is not None and value < minimum:
        raise VlkitError(f"{flag} {value}: must be at least {minimum}")


def in_range(flag: str, value: int, low: int, high: int, hint: str = "") -> None:
    if not low <= value <= high:
        raise VlkitError(f"{flag} {value}: must be between {low} and {high}{'; ' + hint if hint else ''}")


def positive(flag: str, value: float | None, *, allow_zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with `allow_zero`); NaN and infinities are refused."""
    if value is None:
        return
    if not math.isfinite(value):
        raise VlkitError(f"{flag} {value}: must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise VlkitError(f"{flag} {value}: must be {'zero or more' if allow_zero else 'greater than 0'}")


def port(flag: str, value: int) -> None:
    in_range(flag, value, 1, 65535, "pick a free TCP port such as 8000")


def listen(host: str, port_number: int) -> None:
    """`host:port` can be bound now (so a busy port or a bad address fails before a model loads)."""
    import socket

    port("--port", port_number)
    try:
        infos = socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise VlkitError(f"--host {host!r}: not an address of this machine ({e}); use e.g. 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise VlkitError(f"--port {port_number}: cannot listen on {host}:{port_number} ({e.strerror or e}); pick another --port or --host") from None


def choice(flag: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise VlkitError(f"{flag} {value!r}: unknown; use one of {', '.join(choices)}")


def existing(flag: str, path: Path | None, kind: str = "any") -> None:
    """`path` must exist (as a file with kind='file', a folder with kind='folder')."""
    if path is None:
        return
    no_broken_link(flag, path)
    if not path.exists():
        raise VlkitError(f"{flag} {path}: does not exist; check the path")
    if kind == "file" and not path.is_file():
        raise VlkitError(f"{flag} {path}: is not a file")
    if kind == "folder" and not path.is_dir():
        raise VlkitError(f"{flag} {path}: is not a folder")


def out_folder(flag: str, path: Path) -> None:
    """A folder this command will create or write into: not a file, and creatable."""
    if path.exists() and not path.is_dir():
        raise VlkitError(f"{flag} {path}: is an existing file; give a folder (it is created if missing)")
    _creatable(flag, path)


def out_file(flag: str, path: Path) -> None:
    """A file this command will write: not a folder, its folder creatable."""
    if path.is_dir():
        raise VlkitError(f"{flag} {path}: is a folder; give a file path")
    _creatable(flag, path.parent)


def _creatable(flag: str, folder: Path) -> None:
    """The nearest existing ancestor of `folder` must be a writable folder."""
    probe = folder.absolute()
    while not probe.exists():
        no_broken_link(flag, probe)
        probe = probe.parent
    if not probe.is_dir():
        raise VlkitError(f"{flag} {folder}: {probe} is a file, so no folder can be made there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise VlkitError(f"{flag} {folder}: {probe} is not writable; pick another place")


def no_broken_link(flag: str, path: Path) -> None:
    """A symlink loop or a dangling link reads as 'missing', but nothing can be made or read through it: say which."""
    from vlkit.data.paths import check_path

    if os.path.islink(path) and not path.exists():
        raise VlkitError(f"{flag} {path}: {check_path(path)}; remove the link or give another path")


_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def device(flag: str, value: str) -> str:
    """A torch device this build can use: cpu, cuda, cuda:N (N < device count), mps."""
    m = _DEVICE.match(value.strip())
    if not m or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise VlkitError(f"{flag} {value!r}: not a device; use cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return "cpu"
    import torch

    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise VlkitError(f"{flag} {value}: MPS is not available here; use --device cpu")
        return value
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
        raise VlkitError(f"{flag} {value}: CUDA is not available (torch {torch.__version__}, {build}); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise VlkitError(f"{flag} {value}: this machine has {count} CUDA device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return value


def caption_template(flag: str, template: str | None) -> None:
    """Only plain {field} placeholders; never evaluated (see `vlkit.data.datasets.caption_fields`)."""
    if template is None:
        return
    from vlkit.data.datasets import caption_fields

    try:
        caption_fields(template)
    except VlkitError as e:
        raise VlkitError(f"{flag}: {e}") from None


def nonempty(flag: str, values: Iterable[object] | None) -> None:
    if values is not None and not list(values):
        raise VlkitError(f"{flag}: give at least one value")

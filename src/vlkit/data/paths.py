"""Where image paths from folders and tables are checked: one rule for every command.

A listed path can be a symlink loop, a dangling link, a folder, or (for an index,
whose files are served from one root) a link that leaves that root. None of these
may abort a run or raise `RuntimeError` from `Path.resolve`; each is skipped with
a reason and listed, exactly as an undecodable image is. `check_path` gives the
reason (or None for a usable path); `split_paths` applies it to a list.

The rule about roots: a folder or table given to classification or training may
link to files anywhere (data folders are often assembled from links); only an
index confines its files to its image root, because `vlkit serve` serves them.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence


def real_path(path: str | os.PathLike) -> Path | None:
    """The fully resolved path, or None when it cannot be resolved (loop, dangling link, missing)."""
    try:
        return Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        return None


def check_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str | None:
    """Why `path` cannot be used as an image file (a few words), or None when it can.

    With `root` (an already resolved folder) the file must also lie under it once
    every link is followed.
    """
    p = Path(path)
    try:
        real = p.resolve(strict=True)
    except RuntimeError:
        return "symlink loop (the link points back at itself)"
    except FileNotFoundError:
        if os.path.islink(p):
            return f"dangling symlink (its target {os.readlink(p)} does not exist)"
        return "dangling symlink in its folder path" if _dangling_parent(p) else "file not found"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link points back at itself)"
        return f"cannot read ({e.strerror or e})"
    if real.is_dir():
        return "is a folder, not an image file"
    if root is not None and not real.is_relative_to(root):
        if os.path.normpath(os.path.abspath(p)).startswith(os.path.join(os.fspath(root), "")):
            return f"symlink to {real}, outside the image root {root}"
        return f"outside the image root {root} (pass --image-root to a folder holding every image)"
    return None


def _dangling_parent(p: Path) -> bool:
    return any(os.path.islink(a) and not a.exists() for a in Path(os.path.abspath(p)).parents)


def split_paths(
    paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None
) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of usable `paths` and (path, reason) for the others, both in input order."""
    ok: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, p in enumerate(paths):
        reason = check_path(p, root)
        if reason is None:
            ok.append(i)
        else:
            skipped.append((os.fspath(p), reason))
    return ok, skipped

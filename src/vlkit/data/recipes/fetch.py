"""Download pinned source packages through their ordinary clients and verify them.

Recipes never speak HTTP themselves: `npm pack` and `apt-get download` know the
user's registry, proxy and mirror settings. What we add is the part those tools
leave to the caller here: a checksum pinned in the recipe, checked on every file
before it is used, and a download that lands under its final name only once it
is verified (so an interrupted fetch is simply redone).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vlkit.errors import VlkitError


@dataclass(frozen=True)
class NpmPackage:
    """One npm tarball pinned by version and npm's `dist.integrity` (sha512, base64)."""

    name: str
    version: str
    integrity: str
    licence: str

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tgz"


@dataclass(frozen=True)
class DebPackage:
    """One Debian package pinned by version and the archive's SHA256."""

    name: str
    version: str
    sha256: str
    licence: str

    @property
    def filename(self) -> str:
        # apt-get download escapes the epoch colon as %3a in the file name.
        return f"{self.name}_{self.version.replace(':', '%3a')}_all.deb"


def require_tool(tool: str, install_hint: str, folder_hint: str) -> str:
    """Path of `tool`, or a VlkitError saying what to install or where to put the files instead."""
    path = shutil.which(tool)
    if path is None:
        raise VlkitError(f"{tool}: not found on PATH; {install_hint}, or {folder_hint}")
    return path


def sri_sha512(path: Path) -> str:
    """npm-style subresource integrity string (`sha512-<base64>`) of a file."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def sha256_hex(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, expected: str, actual: str) -> None:
    if actual != expected:
        raise VlkitError(
            f"{path}: checksum mismatch (expected {expected}, got {actual}); "
            "delete the file and fetch again, or check your registry mirror"
        )


def verify_npm(path: Path, pkg: NpmPackage) -> None:
    _check(path, pkg.integrity, sri_sha512(path))


def verify_deb(path: Path, pkg: DebPackage) -> None:
    _check(path, pkg.sha256, sha256_hex(path))


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "warn" not in ln.lower()]
        detail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise VlkitError(f"{what}: `{' '.join(cmd)}` failed ({detail})")
    return proc


def fetch_npm(pkg: NpmPackage, dest: Path) -> tuple[Path, bool]:
    """Ensure the verified tarball is at `dest/<name>-<version>.tgz`; return (path, downloaded)."""
    target = dest / pkg.filename
    if target.exists():
        verify_npm(target, pkg)
        return target, False
    npm = require_tool(
        "npm",
        "install Node.js with npm (e.g. `apt-get install npm`)",
        f"put {pkg.filename} (from `npm pack {pkg.name}@{pkg.version}` elsewhere) into {dest}",
    )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".npm-") as tmp:
        _run([npm, "pack", f"{pkg.name}@{pkg.version}", "--silent"], Path(tmp), pkg.name)
        got = Path(tmp) / pkg.filename
        if not got.exists():
            raise VlkitError(f"{pkg.name}: npm pack wrote no {pkg.filename}; check the npm registry setting")
        verify_npm(got, pkg)
        got.replace(target)
    return target, True


def fetch_deb(pkg: DebPackage, dest: Path) -> tuple[Path, bool]:
    """Ensure the verified .deb is at `dest/`; return (path, downloaded)."""
    target = dest / pkg.filename
    if target.exists():
        verify_deb(target, pkg)
        return target, False
    folder_hint = f"put {pkg.filename} into {dest}"
    apt = require_tool("apt-get", "run on a Debian/Ubuntu system", folder_hint)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".apt-") as tmp:
        try:
            _run([apt, "download", f"{pkg.name}={pkg.version}"], Path(tmp), pkg.name)
        except VlkitError as e:
            raise VlkitError(f"{e}; run `apt-get update` first if the package lists are empty, or {folder_hint}") from None
        got = Path(tmp) / pkg.filename
        if not got.exists():
            raise VlkitError(f"{pkg.name}: apt-get download wrote no {pkg.filename}; {folder_hint}")
        verify_deb(got, pkg)
        got.replace(target)
    return target, True


def unpack_tgz(archive: Path, dest: Path) -> Path:
    """Extract an npm tarball into `dest` (once; a `.done` marker makes it resumable)."""
    marker = dest / ".done"
    if marker.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp, filter="data")
    tmp.replace(dest)
    marker.touch()
    return dest


def unpack_deb(archive: Path, dest: Path) -> Path:
    """Extract a .deb's files with `dpkg-deb -x` (nothing is installed); resumable like `unpack_tgz`."""
    marker = dest / ".done"
    if marker.exists():
        return dest
    dpkg = require_tool(
        "dpkg-deb",
        "install dpkg (`apt-get install dpkg`)",
        f"extract {archive.name} yourself into {dest} and create {marker}",
    )
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _run([dpkg, "-x", str(archive), str(tmp)], tmp.parent, archive.name)
    tmp.replace(dest)
    marker.touch()
    return dest

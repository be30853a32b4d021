"""Atomic writes, run folders and the CLI's one-line error contract."""

import json
import subprocess
import sys

import pytest

from vlkit import io, runs
from vlkit.errors import VlkitError


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "m.json"
    io.write_json(target, {"a": 1})
    io.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]
    assert target.stat().st_mode & 0o044, "outputs are readable by others, as with a plain open()"


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "m.txt"
    io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.txt"]


def test_run_config_records_settings_and_versions(tmp_path):
    run = runs.new_run_dir(tmp_path, "zeroshot")
    run2 = runs.new_run_dir(tmp_path, "zeroshot")
    assert run != run2
    cfg = runs.write_config(run, {"seed": 3, "path": tmp_path}, model_fingerprint="abc")
    saved = json.loads((run / "config.json").read_text())
    assert saved["settings"] == {"seed": 3, "path": str(tmp_path)}
    assert saved["model_fingerprint"] == "abc"
    assert "torch" in saved["versions"] and cfg == saved


def test_cli_user_error_is_one_line(tmp_path):
    script = tmp_path / "t.py"
    script.write_text(
        "from vlkit.cli import app, main\n"
        "from vlkit.errors import VlkitError\n"
        "@app.command()\n"
        "def boom():\n"
        "    raise VlkitError(\"data path 'x' does not exist\")\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, str(script), "boom"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: data path 'x' does not exist"]
    assert VlkitError.__mro__[1] is Exception

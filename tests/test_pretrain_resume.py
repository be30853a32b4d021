"""Exact resume: a run killed with SIGKILL and resumed ends with exactly the weights,
optimizer moments and history of the same run left alone.

The tiny config trains a ResNet (batch norm) image tower and an unlocked BERT text
tower with dropout from scratch, so model weights, AdamW state, the LR schedule,
the torch RNG (dropout masks) and the data position must all come back exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlkit.errors import VlkitError
from vlkit.pretrain.config import config_from_dict, load_config
from vlkit.pretrain.trainer import CRASH_ENV

from pretrain_fakes import make_dataset, tiny_config


def run_cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vlkit.cli", "pretrain", *args], capture_output=True, text=True, env=env, timeout=300)


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("rng.")}, f.metadata()


# A stand-in for `vlkit pretrain` whose second checkpoint write is cut off: half of the new
# file's bytes reach the disk, then the process gets SIGKILL before anything is renamed.
KILL_MID_CHECKPOINT_WRITE = """
import os, signal, sys
import safetensors.torch as st
real, calls = st.save_file, []
def torn(tensors, filename, metadata=None):
    if "last.safetensors" in os.path.basename(str(filename)):
        calls.append(filename)
        if len(calls) == 2:
            data = st.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, filename, metadata=metadata)
st.save_file = torn
from vlkit.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run folder) of the tiny run left alone: 2 epochs x 4 steps."""
    from vlkit.pretrain.run import pretrain

    tmp = tmp_path_factory.mktemp("resume")
    cfg_path = tmp / "tiny.json"
    cfg_path.write_text(json.dumps(tiny_config(make_dataset(tmp / "data"), tmp / "runs")))
    ref = pretrain(load_config(cfg_path), run_dir=tmp / "ref", progress=False, export=False)
    assert ref["train"]["global_step"] == 8
    return cfg_path, tmp / "ref"


def _progress(run: Path) -> dict:
    return json.loads(read(run / "checkpoints" / "last.safetensors")[1]["progress"])


def _resume_and_compare(cfg_path: Path, ref_dir: Path, run: Path) -> None:
    """Resume `run` to the end; its final state must equal the reference's bit for bit."""
    from vlkit.pretrain.run import pretrain

    resumed = pretrain(load_config(cfg_path), run_dir=run, resume=True, progress=False, export=False)
    assert resumed["train"]["global_step"] == 8
    t_ref, m_ref = read(ref_dir / "checkpoints" / "last.safetensors")
    t_b, m_b = read(run / "checkpoints" / "last.safetensors")
    assert t_ref.keys() == t_b.keys()
    assert any(k.startswith("model.text_model.") for k in t_ref) and any(k.startswith("opt.") for k in t_ref)
    for k in t_ref:
        assert torch.equal(t_ref[k], t_b[k]), k
    timing = {"pairs_per_s"}  # the only logged value that may differ
    hist_ref, hist_b = (
        [{k: v for k, v in r.items() if k not in timing} for r in json.loads(m["progress"])["history"]] for m in (m_ref, m_b)
    )
    assert hist_ref == hist_b and len(hist_ref) == 8  # same loss, temperature, lr, grad norm at every step
    assert m_ref["scheduler"] == m_b["scheduler"]


@pytest.mark.parametrize(
    "crash_after, saved",
    [(5, {"global_step": 4, "epoch": 1, "step_in_epoch": 0}),  # last checkpoint at an epoch boundary
     (3, {"global_step": 2, "epoch": 0, "step_in_epoch": 2})],  # last checkpoint mid-epoch
    ids=["epoch-boundary", "mid-epoch"],
)
def test_run_killed_after_a_step_resumes_to_the_uninterrupted_state_bitwise(reference, tmp_path, crash_after, saved):
    cfg_path, ref_dir = reference
    crashed = run_cli(["--config", str(cfg_path), "--run-dir", str(tmp_path / "b"), "--no-progress"], {CRASH_ENV: str(crash_after)})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    progress = _progress(tmp_path / "b")
    assert {k: progress[k] for k in saved} == saved  # the steps after it are lost and must be redone
    _resume_and_compare(cfg_path, ref_dir, tmp_path / "b")


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint_loadable(reference, tmp_path):
    from vlkit.pretrain.checkpoint import load_checkpoint

    cfg_path, ref_dir = reference
    run = tmp_path / "b"
    args = ["pretrain", "--config", str(cfg_path), "--run-dir", str(run), "--no-progress"]
    crashed = subprocess.run([sys.executable, "-c", KILL_MID_CHECKPOINT_WRITE, *args], capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    ckpt = run / "checkpoints"
    _, meta = load_checkpoint(ckpt / "last.safetensors")  # the first checkpoint, whole
    assert meta["progress"]["global_step"] == 2
    assert [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")], "the kill must have hit a write in progress"
    _resume_and_compare(cfg_path, ref_dir, run)


def test_resume_refuses_a_changed_config(tmp_path):
    from vlkit.pretrain.run import pretrain

    meta = make_dataset(tmp_path / "data")
    d = tiny_config(meta, tmp_path / "runs")
    d["train"]["max_steps"] = 2
    pretrain(config_from_dict(d), run_dir=tmp_path / "r", progress=False, export=False)
    d["train"]["lr"] = 0.5
    with pytest.raises(VlkitError, match="different config"):
        pretrain(config_from_dict(d), run_dir=tmp_path / "r", resume=True, progress=False, export=False)


def test_config_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"batchsize": 8}}))
    with pytest.raises(VlkitError, match=r"unknown key\(s\) batchsize"):
        load_config(bad)
    with pytest.raises(VlkitError, match="facebook"):
        config_from_dict({"data": {"styles": ["twitter", "facebook"]}})
    proc = run_cli(["--config", str(tmp_path / "missing.json")])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.json'}: config file not found; pass a JSON file such as configs/vlkit-tiny.json"]

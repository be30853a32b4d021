"""CapFilt's fine-tuning step and its Ray path: `vlkit capfilt finetune`, the passes using the fine-tuned
filter and captioner, resumption of an interrupted fine-tune, `--ray` = the single process byte for byte,
and one-line errors for bad arguments.

The tiny random BLIP of blip_tiny (32 px, width 32) is fine-tuned on 24 emoji of the bundled sample with
a budget of a few steps: the point is which weights move and which model each pass uses, not quality.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlkit.pretrain.trainer import CRASH_ENV

SAMPLE_EMOJI = Path(__file__).resolve().parents[1] / "src" / "vlkit" / "assets" / "sample" / "built" / "emoji"
BUDGET = ["--max-steps", "2", "--train-batch-size", "8", "--lr", "0.001", "--no-progress"]
# a weight each stage trains and the other never touches (the decoder's LM head transform; the ITM head)
LM_ONLY = "text_decoder.cls.predictions.transform.dense.weight"
ITM_ONLY = "itm_head.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny full BLIP; human.jsonl: 24 training-style sample emoji by name and one unreadable image;
    web.jsonl: 10 other emoji, every other one named as another emoji."""
    from blip_tiny import save_tiny_hf_blip

    root = tmp_path_factory.mktemp("capfilt-finetune")
    save_tiny_hf_blip(root / "blip")
    rows = [json.loads(line) for line in (SAMPLE_EMOJI / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["style"] in ("twitter", "google", "openmoji")][::17]
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    human = [{"image": str(SAMPLE_EMOJI / r["image"]), "caption": f"an emoji of {r['base_label']}."} for r in rows[:24]]
    human.append({"image": str(root / "broken.png"), "caption": "an emoji that never loads."})
    web_rows = rows[24:34]
    web = [{"image": str(SAMPLE_EMOJI / r["image"]), "caption": f"an emoji of {web_rows[(i + 3 * (i % 2)) % 10]['base_label']}."}
           for i, r in enumerate(web_rows)]
    for name, table in (("human", human), ("web", web)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")
    return {"root": root, "blip": root / "blip", "human": root / "human.jsonl", "web": root / "web.jsonl"}


def state(out: Path) -> dict:
    return json.loads((out / "capfilt.json").read_text())


def weights(spec: Path) -> dict[str, torch.Tensor]:
    from vlkit.blip.checkpoint import load_blip

    return load_blip(str(spec)).model.state_dict()


def model_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for stage in ("filter", "captioner") for p in (out / stage).rglob("*")}


def test_finetune_writes_a_filter_and_a_captioner_from_one_model_and_the_passes_use_them(world, tmp_path, capsys):
    from test_blip_cli import cli, one_error_line

    from vlkit.blip.checkpoint import load_blip
    from vlkit.blip.match import match_pairs, read_pairs

    out = tmp_path / "capfilt"
    code, stdout, err = cli(["capfilt", "finetune", "--human", world["human"], "--out", out, "--model", world["blip"], *BUDGET], capsys)
    assert code == 0, err
    assert "filter: fine-tuned from" in stdout and "captioner: fine-tuned from" in stdout
    record = state(out)
    base = load_blip(str(world["blip"]))
    assert record["finetune"]["model_fingerprint"] == base.fingerprint()
    assert record["finetuned"]["human_images"] == 24
    assert [s["path"] for s in record["finetuned"]["human_skipped"]] == [str(world["root"] / "broken.png")]
    before = base.model.state_dict()
    filt, capt = weights(out / "filter" / "model"), weights(out / "captioner" / "model")
    # decoupled, each from the pretrained model: the filter trained ITM and not the LM head, the captioner the reverse
    assert not torch.equal(filt[ITM_ONLY], before[ITM_ONLY]) and torch.equal(filt[LM_ONLY], before[LM_ONLY])
    assert torch.equal(capt[ITM_ONLY], before[ITM_ONLY]) and not torch.equal(capt[LM_ONLY], before[LM_ONLY])
    for stage in ("filter", "captioner"):
        assert record["finetuned"][stage]["fingerprint"] == load_blip(str(out / stage / "model")).fingerprint()
        assert record["finetuned"][stage]["steps"] == 2

    # run in the same folder: nothing is fine-tuned again, and the passes use the fine-tuned models
    files = model_files(out)
    code, stdout, err = cli(["capfilt", "run", "--human", world["human"], "--web", world["web"], "--out", out, "--model", world["blip"],
                             *BUDGET, "--shard-size", "4", "--max-length", "8", "--min-length", "3"], capsys)
    assert code == 0, err
    assert "filter: fine-tuned before" in stdout and "captioner: fine-tuned before" in stdout and model_files(out) == files
    record = state(out)
    assert record["caption"]["captioner"] == "finetuned:captioner" and record["filter"]["filter"] == "finetuned:filter"
    assert record["caption"]["captioner_fingerprint"] == record["finetuned"]["captioner"]["fingerprint"]
    assert record["filter"]["filter_fingerprint"] == record["finetuned"]["filter"]["fingerprint"]
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    got = [r["itm_probability"] for r in prov if r["source"] == "web"]
    pairs = read_pairs(world["web"])
    tuned = [r["itm_probability"] for r in match_pairs(*_parts(load_blip(str(out / "filter" / "model"))), pairs).rows]
    pretrained = [r["itm_probability"] for r in match_pairs(*_parts(base), pairs).rows]
    assert got == pytest.approx(tuned, abs=1e-6) and max(abs(a - b) for a, b in zip(got, pretrained)) > 1e-3

    # the folder refuses another model or other fine-tuning settings
    code, _, err = cli(["capfilt", "caption", "--web", world["web"], "--out", out, "--captioner", world["blip"], "--shard-size", "4",
                        "--max-length", "8", "--min-length", "3"], capsys)
    assert "its caption step ran with other settings (captioner)" in one_error_line(code, err)
    code, _, err = cli(["capfilt", "finetune", "--human", world["human"], "--out", out, "--model", world["blip"], *BUDGET[:-3],
                        "--lr", "0.01"], capsys)
    assert "its finetune step ran with other settings (lr)" in one_error_line(code, err)


def _parts(loaded):
    return loaded.model, loaded.tokenizer, loaded.preprocess


def test_an_interrupted_finetune_resumes_to_the_same_models_and_a_finished_one_is_not_redone(world, tmp_path, capsys):
    """A SIGKILL after step 3 of the filter's 4 (checkpoints every 2 steps): the rerun resumes the filter from
    step 2 and then trains the captioner, and both equal an uninterrupted run's; a third run trains nothing."""
    from test_blip_cli import cli

    budget = ["--max-steps", "4", "--checkpoint-every", "2", *BUDGET[2:]]
    args = ["capfilt", "finetune", "--human", world["human"], "--model", world["blip"], *budget]
    code, _, err = cli([*args, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    resumed = tmp_path / "resumed"
    # the killed half runs in a subprocess: give it this process's thread count (1 and 2 threads round apart)
    env = {**os.environ, CRASH_ENV: "3", "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-m", "vlkit.cli", *map(str, args), "--out", str(resumed)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (resumed / "filter" / "checkpoints" / "last.safetensors").exists() and not (resumed / "filter" / "model").exists()
    assert not (resumed / "captioner").exists()
    code, stdout, err = cli([*args, "--out", resumed], capsys)
    assert code == 0, err
    assert json.loads((resumed / "filter" / "config.json").read_text())["resumed_from_step"] == 2
    assert json.loads((resumed / "captioner" / "config.json").read_text())["resumed_from_step"] == 0
    for stage in ("filter", "captioner"):
        assert state(resumed)["finetuned"][stage]["fingerprint"] == state(tmp_path / "whole")["finetuned"][stage]["fingerprint"], stage
    files = model_files(resumed)
    code, stdout, err = cli([*args, "--out", resumed], capsys)
    assert code == 0, err
    assert stdout.count("fine-tuned before") == 2 and model_files(resumed) == files


def test_ray_passes_write_what_the_single_process_writes(world, tmp_path, capsys):
    """`run --ray local` with 2 workers, resuming a folder whose first shard one process captioned, writes the
    single process's shard files, collection, provenance and summary byte for byte."""
    pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'vlkit[ray]')")
    import ray

    from test_blip_cli import cli

    from vlkit.blip import capfilt
    from vlkit.blip.checkpoint import load_blip
    from vlkit.blip.generate import settings_for
    from vlkit.blip.match import read_pairs

    args = ["capfilt", "run", "--human", world["human"], "--web", world["web"], "--no-finetune", "--model", world["blip"],
            "--shard-size", "3", "--max-length", "8", "--min-length", "3", "--num-captions", "2", "--seed", "5", "--no-progress"]
    code, _, err = cli([*args, "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    todo = capfilt.shards(read_pairs(world["web"]), tmp_path / "ray", 3)
    settings = settings_for("nucleus", max_length=8, min_length=3, num_return_sequences=2, seed=5)
    capfilt.caption_pass(load_blip(str(world["blip"])), todo[:1], settings)
    try:
        code, _, err = cli([*args, "--out", tmp_path / "ray", "--ray", "local", "--ray-workers", "2"], capsys)
    finally:
        ray.shutdown()
    assert code == 0, err
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file() and p.name != "capfilt.json")
    assert one == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file() and p.name != "capfilt.json")
    assert len([p for p in one if p.parent.name == "shards"]) == 2 * len(todo) == 8
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "ray" / rel).read_bytes(), rel


def test_bad_arguments_are_one_line_before_any_model_or_output(world, tmp_path, capsys, monkeypatch):
    from test_blip_cli import cli, one_error_line

    from vlkit.commands.capfilt import _check_ray
    from vlkit.errors import VlkitError

    out = tmp_path / "capfilt"
    ft = ["capfilt", "finetune", "--human", world["human"], "--out", out, "--model", world["blip"]]
    run = ["capfilt", "run", "--human", world["human"], "--web", world["web"], "--out", out, "--model", world["blip"]]
    cases = {
        "--epochs 0: must be at least 1": [*ft, "--epochs", "0"],
        "--max-steps 0: must be at least 1": [*run, "--max-steps", "0"],
        "--train-batch-size 1: must be at least 2": [*ft, "--train-batch-size", "1"],
        "--train-batch-size 64: exceeds the 25 images of --human": [*run, "--train-batch-size", "64"],
        "--lr -0.1: must be greater than 0": [*ft, "--lr", "-0.1"],
        "--lr nan: must be a finite number": [*run, "--lr", "nan"],
        "--precision 'fp16': unknown; use one of auto, fp32, bf16": [*ft, "--precision", "fp16"],
        "--checkpoint-every 0: must be at least 1": [*ft, "--checkpoint-every", "0"],
        "this BLIP retrieval checkpoint has no text decoder; the filter and the captioner are fine-tuned from one full BLIP":
            [*ft[:-1], world["blip"] / "retrieval"],
        "--human": [*ft[:3], tmp_path / "missing.jsonl", *ft[4:]],
        "--captioner: not given, and --out": ["capfilt", "caption", "--web", world["web"], "--out", out],
        "--filter: not given, and --out": ["capfilt", "filter", "--web", world["web"], "--out", out],
        "--ray '': give 'local'": [*run, "--ray", ""],
        "--ray-workers 0: must be at least 1": [*run, "--ray", "local", "--ray-workers", "0"],
    }
    for start, argv in cases.items():
        code, _, err = cli(argv, capsys)
        assert start in one_error_line(code, err), (argv, err)
        assert not out.exists(), argv
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code, _, err = cli(["capfilt", "filter", "--web", world["web"], "--out", out, "--filter", world["blip"], "--ray", "local"], capsys)
    assert "--ray: Ray is not installed; install the extra with `pip install 'vlkit[ray]'`" in one_error_line(code, err)
    with pytest.raises(VlkitError, match="--ray: the Ray passes run on CPU workers; drop --device cuda:0 or --ray"):
        _check_ray("local", 2, "cuda:0")
    # an unfinished fine-tune is named as such, not as missing
    (out / "filter" / "checkpoints").mkdir(parents=True)
    (out / "filter" / "checkpoints" / "last.safetensors").write_bytes(b"")
    code, _, err = cli(["capfilt", "filter", "--web", world["web"], "--out", out], capsys)
    assert "its filter fine-tune has not finished; run `vlkit capfilt finetune`" in one_error_line(code, err)
    shutil.rmtree(out)

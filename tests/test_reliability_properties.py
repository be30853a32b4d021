"""Generated hostile inputs for every `vlkit` command and every server endpoint (issue 12).

Hypothesis draws broken arguments, images and tables from `reliability_corpus` and
checks vlkit's promises on each:

- a user mistake is exit code 2 with exactly one `error:` line and no traceback,
  found before any model loads (a guard makes every model load a failure) and before
  any output exists (the working folder is compared file by file);
- an unreadable image inside a folder is skipped and listed, never fatal;
- every run finishes within a bound (an in-process hang would stall the suite, so the
  bound catches the slow cases: decompression, quadratic parsing);
- the server answers every request below 500, with a JSON reason for each 4xx.

`CASES` names a valid base command line and its hostile slots for each command;
`test_every_command_and_endpoint_is_covered` fails as soon as `vlkit --help` lists a
command, or the app a route, that has no entry here. Examples are derandomised and
capped (`SCALE` below), so CI sees the same cases every run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reliability_corpus import leaf_commands, make_class_folder, memoise_model_loading, run_cli, strategies
from test_retrieval_fakes import ColorModel, make_caption_table

CORPUS = strategies()
SECONDS = 20.0  # per in-process command: generous for a shared CI core, far below a hang or a bomb's decode


# CI draws `n * SCALE` examples per property (SCALE 1: a few minutes' budget on a CI core); a deeper run
# outside CI: `VLKIT_PROPERTY_SCALE=10 .venv/bin/python -m pytest tests/test_reliability_properties.py`.
SCALE = float(os.environ.get("VLKIT_PROPERTY_SCALE", "1"))


def _settings(n: int):
    # no shrinking phase: a failure is reported as drawn, so a broken promise costs seconds, not minutes
    return settings(max_examples=max(1, round(n * SCALE)), deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------- hostile values by kind

NOT_INT = st.sampled_from(["abc", "1.5", "", "1e3", "0x10", "--", "١"])
COUNT = st.one_of(st.integers(max_value=0).map(str), NOT_INT)  # an option that must be >= 1
NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN"])
RATE = st.one_of(st.floats(max_value=0, allow_nan=False).map(repr), NON_FINITE, st.just("fast"))  # must be > 0
UNIT = st.one_of(st.floats(min_value=1, exclude_min=True, allow_infinity=False).map(repr),
                 st.floats(max_value=0, allow_nan=False).map(repr), NON_FINITE)  # must lie in (0, 1]
THRESHOLD = st.one_of(st.floats(min_value=1, allow_infinity=False).map(repr), st.floats(max_value=0, exclude_max=True).map(repr),
                      NON_FINITE)  # must lie in [0, 1)
PORT = st.one_of(st.integers(max_value=0), st.integers(min_value=65536)).map(str)
DEVICE = st.sampled_from(["banana", "cuda:7", "cpu:1", "", "gpu", "cuda:-1", "CUDA", "cuda:0:1", " mps x"])
SPLITS = st.sampled_from(["", "nope", "TRAIN", "../train", "train,test"])
NAME = st.sampled_from(["no-such-name", "", "../emoji", "emoji/../../etc", "EMOJI-GROUP ", "\u00e9moji"])


def choice_outside(*allowed: str):
    return st.text(min_size=0, max_size=8).filter(lambda s: s not in allowed)


def bad_template():
    """Caption templates that are not a plain '{field}' template over the table's columns."""
    return CORPUS["template"].filter(lambda t: t not in ("{label}", "{caption}", "{image}"))


@dataclass
class World:
    """Inputs that are fine except for the slot under test (paths here, built once per module)."""

    root: Path
    model: str
    blip: str
    data: Path
    table: Path
    index: Path
    prompt: Path
    config: Path
    afile: Path
    bad_paths: dict[str, Path] = field(default_factory=dict)


def in_path(w: World, want: str = "any"):
    """A path option given something that is not there or not the wanted kind."""
    names = ["missing", "dangling", "loop", "under-file"] + (["folder"] if want == "file" else []) + (["afile"] if want == "folder" else [])
    return st.sampled_from(names).map(lambda n: str(w.bad_paths[n]))


def out_path(w: World):
    """An output folder option given an existing file, or a path below a file."""
    return st.sampled_from([str(w.afile), str(w.afile / "sub"), str(w.bad_paths["loop"])])


def bad_json_file(w: World):
    contents = st.one_of(st.sampled_from(["", "{", "[1, 2]", "null", '"text"', "{\"model\": 3}", "\x00", "{}"]),
                         st.text(max_size=30))

    def write(text: str) -> str:
        p = w.root / "hostile" / "config.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        return str(p)

    return contents.map(write)


def cases(w: World) -> dict[tuple[str, ...], tuple[list[str], dict[str, st.SearchStrategy]]]:
    """command path -> (a valid base argv, {option: strategy of hostile values for it})."""
    new, m, b, d, t, i, p = str(w.root / "NEW"), w.model, w.blip, str(w.data), str(w.table), str(w.index), str(w.prompt)
    bench = ["--tasks", "emoji-group", "--methods", "zeroshot", "--shots", "1", "--seeds", "1", "--data-dir", "sample", "--out", new]
    bench_slots = {"--shots": COUNT, "--seeds": NOT_INT, "--epochs": COUNT, "--views": COUNT, "--out": out_path(w),
                   "--tasks": NAME, "--methods": choice_outside("zeroshot", "linear-probe"),
                   "--options": st.sampled_from(["{", "[]", "3", '{"coop": 3}', "null", "'x'"]), "--data-dir": in_path(w, "folder")}
    capfilt_web = {"--web": in_path(w, "file"), "--out": out_path(w), "--shard-size": COUNT,
                   "--text-column": choice_outside("caption", "label", "image"), "--image-column": choice_outside("image")}
    return {
        ("version",): ([], {}),
        ("zeroshot",): (["--model", m, "--data", d, "--out", new],
                        {"--batch-size": COUNT, "--out": out_path(w), "--data": in_path(w), "--classes": in_path(w, "file"),
                         "--templates": choice_outside("photo", "openai", "task-first", "task")}),
        ("search",): ([i, "--text", "red", "--model", m],
                      {"-k": COUNT, "--target": choice_outside("images", "captions"), "--text": st.sampled_from(["", " ", "\t\n"]),
                       "--image": in_path(w, "file"), "--rerank": choice_outside("itm", "none"), "--rerank-k": COUNT}),
        ("serve",): ([i, "--model", m],
                     {"--port": PORT, "--max-k": COUNT, "--max-query-chars": COUNT, "--max-upload-mb": RATE,
                      "--max-image-mp": RATE}),  # (--host: a bad name costs a resolver timeout; tested in test_reliability_args)
        ("pretrain",): (["--config", str(w.config)],
                        {"--config": st.one_of(in_path(w, "file"), bad_json_file(w)), "--run-dir": out_path(w),
                         "--export-to": out_path(w)}),
        ("predict",): (["--prompt", p, "--images", d, "--out", new],
                       {"--top-k": COUNT, "--out": out_path(w), "--device": DEVICE, "--images": in_path(w),
                        "--prompt": in_path(w, "folder")}),
        ("demo",): (["--out", new, "--epochs", "1"], {"--out": out_path(w), "--epochs": COUNT}),
        ("capfilt", "caption"): (["--web", t, "--captioner", b, "--out", new, "--text-column", "caption"],
                                 {**capfilt_web, "--captioner": in_path(w, "folder"), "--beam": COUNT, "--num-captions": COUNT,
                                  "--batch-size": COUNT, "--top-p": UNIT, "--max-length": st.integers(max_value=1).map(str),
                                  "--min-length": st.integers(max_value=-1).map(str), "--device": DEVICE}),
        ("capfilt", "filter"): (["--web", t, "--filter", b, "--out", new, "--text-column", "caption"],
                                {**capfilt_web, "--filter": in_path(w, "folder"), "--threshold": THRESHOLD, "--batch-size": COUNT,
                                 "--device": DEVICE}),
        ("capfilt", "write"): (["--human", t, "--web", t, "--out", new, "--text-column", "caption"],
                               {**capfilt_web, "--human": in_path(w, "file")}),
        ("capfilt", "run"): (["--human", t, "--web", t, "--captioner", b, "--filter", b, "--out", new, "--text-column", "caption"],
                             {**capfilt_web, "--human": in_path(w, "file"), "--captioner": in_path(w, "folder"),
                              "--filter": in_path(w, "folder"), "--threshold": THRESHOLD, "--top-p": UNIT, "--beam": COUNT,
                              "--batch-size": COUNT, "--device": DEVICE, "--epochs": COUNT, "--train-batch-size": COUNT,
                              "--lr": RATE, "--ray-workers": COUNT}),
        ("capfilt", "finetune"): (["--human", t, "--model", b, "--out", new, "--text-column", "caption"],
                                  {"--human": in_path(w, "file"), "--model": in_path(w, "folder"), "--out": out_path(w),
                                   "--epochs": COUNT, "--max-steps": COUNT, "--train-batch-size": COUNT, "--lr": RATE,
                                   "--checkpoint-every": COUNT, "--precision": choice_outside("auto", "fp32", "bf16"),
                                   "--device": DEVICE, "--text-column": choice_outside("caption", "label", "image"),
                                   "--image-column": choice_outside("image")}),
        ("caption",): ([d, "--model", b, "--out", new],
                       {"--beam": COUNT, "--batch-size": COUNT, "--max-length": st.integers(max_value=1).map(str),
                        "--num-captions": COUNT, "--repetition-penalty": RATE, "--device": DEVICE, "--out": out_path(w),
                        "--model": in_path(w, "folder"), "--min-length": st.integers(max_value=-1).map(str)}),
        ("match",): (["--model", b, "--data", t, "--text-column", "caption", "--out", new],
                     {"--batch-size": COUNT, "--device": DEVICE, "--out": out_path(w), "--data": in_path(w, "file"),
                      "--model": in_path(w, "folder"), "--image-column": choice_outside("image"),
                      "--text-column": choice_outside("caption", "label", "image")}),
        ("data", "build"): (["emoji", "--data-dir", new],
                            {"--size": st.one_of(st.integers(max_value=7), st.integers(min_value=1025)).map(str),
                             "--data-dir": out_path(w), "recipe": NAME}),
        ("data", "fetch"): (["no-such-recipe", "--data-dir", new], {"recipe": NAME, "--data-dir": out_path(w)}),
        ("data", "info"): (["emoji-group", "--data-dir", "sample"], {"--top": COUNT, "name": NAME, "--data-dir": in_path(w, "folder")}),
        ("data", "splits"): (["emoji-group", "--data-dir", "sample", "--shots", "1", "--seeds", "1"],
                             {"--shots": st.sampled_from(["0", "-1", "a", "", "1,,2", "1;2", "nan"]),
                              "--seeds": st.sampled_from(["a", "", "1.5", "x,y"]), "task": NAME}),
        ("eval", "caption"): (["--pred", t, "--refs", t, "--out", new],
                              {"--pred": in_path(w, "file"), "--refs": in_path(w, "file"),
                               "--tokenizer": choice_outside("auto", "ptb", "python"), "--meteor": choice_outside("auto", "on", "off"),
                               "--image-column": choice_outside("image"), "--caption-column": choice_outside("caption", "label"),
                               "--out": out_path(w)}),
        ("eval", "retrieval"): (["--data", t, "--model", m, "--runs-dir", new],
                                {"--batch-size": COUNT, "--caption-template": bad_template(), "--runs-dir": out_path(w),
                                 "--data": in_path(w, "file"), "--rerank": choice_outside("itm", "none"), "--rerank-k": COUNT,
                                 "--caption-field": choice_outside("caption", "label", "image"),
                                 "--image-field": choice_outside("image")}),
        ("index", "build"): (["--images", t, "--out", new, "--model", m],
                             {"--batch-size": COUNT, "--chunk-size": COUNT, "--ray-workers": COUNT,
                              "--caption-template": bad_template(), "--out": out_path(w), "--images": in_path(w),
                              "--image-root": in_path(w, "folder"), "--index-type": choice_outside("flat", "hnsw", "ivf", "auto")}),
        ("index", "add"): ([i, "--images", t],
                           {"--batch-size": COUNT, "--chunk-size": COUNT, "--ray-workers": COUNT,
                            "--caption-template": bad_template(), "--images": in_path(w), "index": in_path(w, "folder")}),
        ("coop", "train"): (["--model", m, "--data", d, "--out", new, "--epochs", "1", "--views", "1"],
                            {"--lr": RATE, "--device": DEVICE, "--batch-size": COUNT, "--epochs": COUNT, "--views": COUNT,
                             "--n-ctx": COUNT, "--class-chunk": COUNT, "--words": COUNT, "--out": out_path(w), "--data": in_path(w),
                             "--position": choice_outside("end", "middle", "front"), "--precision": choice_outside("fp32", "bf16", "amp"),
                             "--ctx-init": st.sampled_from(["", " ", "\t"])}),
        ("coop", "words"): (["--prompt", p, "--model", m], {"--k": COUNT, "--prompt": in_path(w, "folder")}),
        ("bench", "fewshot"): (bench, bench_slots),
        ("bench", "base-to-new"): (bench, bench_slots),
        ("bench", "domain"): (bench, bench_slots),
        ("bench", "report"): (["--from", d, "--out", new],
                              {"--from": in_path(w), "--out": out_path(w),
                               "--average": st.sampled_from(["", "=", "Average", "A=", "=x", "A=,,"])}),
    }


# ---------------------------------------------------------------- the world and the guards


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_dir) -> World:
    from blip_tiny import save_tiny_hf_blip

    root = tmp_path_factory.mktemp("rel-props")
    data = make_class_folder(root / "data", ("cat", "dog"), per_class=2)
    table = make_caption_table(root / "cap")
    res = run_cli(["index", "build", "--images", table, "--out", root / "index", "--model", tiny_clip_dir, "--no-progress"])
    assert res.code == 0, res.describe()
    res = run_cli(["coop", "train", "--model", tiny_clip_dir, "--data", data, "--epochs", "1", "--n-ctx", "2", "--views", "1",
                   "--out", root / "runs"])
    assert res.code == 0, res.describe()
    (run,) = (root / "runs").iterdir()
    blip, _ = save_tiny_hf_blip(root / "blip")
    config = root / "pretrain.json"
    config.write_text(Path(__file__).parents[1].joinpath("configs", "vlkit-tiny.json").read_text())
    afile = root / "afile.txt"
    afile.write_text("I am a file")
    bad = root / "bad"
    bad.mkdir()
    os.symlink(bad / "nowhere", bad / "dangling")
    os.symlink(bad / "loop", bad / "loop")
    (bad / "folder").mkdir()
    paths = {"missing": bad / "missing", "dangling": bad / "dangling", "loop": bad / "loop", "folder": bad / "folder",
             "under-file": afile / "x.png", "afile": afile}
    return World(root, str(tiny_clip_dir), str(blip.parent), data, table, root / "index", run / "prompt", config, afile, paths)


class ModelLoadReached(Exception):
    """Raised by the guards: the command accepted its arguments and went on to load a model or train."""


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """Every model load and training run refused; work in an empty folder with its own cache."""
    import vlkit.blip.checkpoint
    import vlkit.models
    import vlkit.pretrain.run

    def refuse(*args, **kwargs):
        raise ModelLoadReached()

    for module, name in ((vlkit.models, "load_model"), (vlkit.blip.checkpoint, "load_blip"), (vlkit.pretrain.run, "pretrain")):
        monkeypatch.setattr(module, name, refuse)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VLKIT_DATA", str(tmp_path / "data"))
    return work


def snapshot(*folders: Path) -> set[str]:
    """Every path (files and folders, links unfollowed) under `folders`."""
    out = set()
    for folder in folders:
        for top, dirs, files in os.walk(folder):
            out.update(os.path.join(top, n) for n in dirs + files)
    return out


def run_timed(argv: list[str]):
    start = time.monotonic()
    res = run_cli(argv)
    return res, time.monotonic() - start


def replace_option(base: list[str], flag: str, value: str, positional: dict[str, int]) -> list[str]:
    """`base` with `flag` set to `value` (a positional slot replaced in place, an option replaced or appended)."""
    argv = list(base)
    if flag in positional:
        argv[positional[flag]] = value
        return argv
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


POSITIONAL = {("search",): {"index": 0}, ("serve",): {"index": 0}, ("caption",): {"images": 0}, ("index", "add"): {"index": 0},
              ("data", "build"): {"recipe": 0}, ("data", "fetch"): {"recipe": 0}, ("data", "info"): {"name": 0},
              ("data", "splits"): {"task": 0}}


# ---------------------------------------------------------------- the properties

COMMANDS = leaf_commands()  # what `vlkit --help` lists, groups expanded


def test_every_command_and_endpoint_is_covered(world):
    assert sorted(cases(world)) == sorted(COMMANDS)
    routes = {getattr(r, "path", None) for r in create_app_for(world).routes} - {None, "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    assert routes == set(ENDPOINTS), routes


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_hostile_arguments_fail_in_one_line_before_any_model_or_output(world, guarded, command):
    base, slots = cases(world)[command]
    unknown = st.tuples(st.just("--no-such-option"), st.sampled_from(["1", "x"]))
    drawn = st.one_of(unknown, *[st.tuples(st.just(flag), s) for flag, s in slots.items()]) if slots else unknown
    before = snapshot(guarded, world.root)

    @_settings(2)
    @given(drawn)
    def check(slot):
        flag, value = slot
        argv = [*command, *(replace_option(base, flag, value, POSITIONAL.get(command, {})) if flag != "--no-such-option"
                            else base + [flag, value])]
        res, seconds = run_timed(argv)
        assert "ModelLoadReached" not in res.err, f"{argv}: accepted; a model loaded or a run started\n{res.describe()}"
        assert res.failed_cleanly(), f"{argv}\n{res.describe()}"
        assert seconds < SECONDS, f"{argv}: {seconds:.1f} s"
        assert snapshot(guarded, world.root) - before <= {str(world.root / "hostile"), str(world.root / "hostile" / "config.json")}, \
            f"{argv}: left {sorted(snapshot(guarded, world.root) - before)}"

    check()


@pytest.fixture
def loaded(monkeypatch, tmp_path):
    """Real (memoised) model loads, in an empty folder with its own feature cache."""
    memoise_model_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _decodable(data: bytes) -> bool:
    """Whether vlkit's one image-opening path accepts these bytes (the oracle for 'must not be skipped')."""
    from vlkit.data import images as img

    try:
        img.load_image(data, name="drawn").close()
        return True
    except img.BadImage:
        return False


@_settings(4)
@given(data=CORPUS["image_bytes"])
def test_a_hostile_query_image_is_one_error_line_or_a_result(world, loaded, data):
    q = loaded / "query.png"
    q.write_bytes(data)
    res, seconds = run_timed(["search", world.index, "--image", q, "--json", "-k", "2"])
    assert seconds < SECONDS
    if _decodable(data):
        assert res.code == 0 and len(json.loads(res.out)["results"]) == 2, res.describe()
    else:
        assert res.failed_cleanly() and str(q) in res.error_lines[0], res.describe()


@_settings(3)
@given(data=CORPUS["image_bytes"], name=st.sampled_from(["x.png", "x.jpg", "x.webp", ".x.png", "x.PNG"]))
def test_a_hostile_image_in_a_folder_is_skipped_and_listed(world, loaded, data, name):
    """zeroshot and index build keep the good images and list the bad one (with its reason) when it cannot be read."""
    import shutil

    folder = loaded / "data"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(world.data, folder)
    (folder / "cat" / name).write_bytes(data)
    readable = _decodable(data)
    for argv, out in ((["zeroshot", "--model", world.model, "--data", folder, "--out", loaded / "zs"], loaded / "zs"),
                      (["index", "build", "--images", folder, "--out", loaded / "ix", "--model", world.model, "--no-progress"], loaded / "ix")):
        shutil.rmtree(out, ignore_errors=True)
        res, seconds = run_timed(argv)
        assert res.code == 0 and "Traceback" not in res.err, res.describe()
        assert seconds < SECONDS
        if argv[0] == "zeroshot":
            (run,) = out.iterdir()
            listed = [s["path"] for s in json.loads((run / "metrics.json").read_text())["skipped"]]
        else:
            skipped = out / "skipped.json"
            listed = [p for p, _ in json.loads(skipped.read_text())] if skipped.exists() else []
        hidden = name.startswith(".")  # dot files are not images of the folder: neither read nor listed
        assert [os.path.basename(p) for p in listed] == ([] if readable or hidden else [name]), res.describe()


TABLE_COMMANDS = {
    "zeroshot": lambda w, t, out: ["zeroshot", "--model", w.model, "--data", t, "--out", out],
    "zeroshot --classes": lambda w, t, out: ["zeroshot", "--model", w.model, "--data", w.data, "--classes", t, "--out", out],
    "index build": lambda w, t, out: ["index", "build", "--images", t, "--out", out, "--model", w.model],
    "eval retrieval": lambda w, t, out: ["eval", "retrieval", "--data", t, "--model", w.model, "--runs-dir", out],
    "match": lambda w, t, out: ["match", "--model", w.blip, "--data", t, "--out", out],
    "predict": lambda w, t, out: ["predict", "--prompt", w.prompt, "--data", t, "--out", out],
    "eval caption": lambda w, t, out: ["eval", "caption", "--pred", t, "--refs", w.table, "--out", out],
    "coop train": lambda w, t, out: ["coop", "train", "--model", w.model, "--data", t, "--out", out],
    "capfilt run --web": lambda w, t, out: ["capfilt", "run", "--human", w.table, "--web", t, "--captioner", w.blip,
                                            "--filter", w.blip, "--out", out],
    "capfilt run --human": lambda w, t, out: ["capfilt", "run", "--human", t, "--web", w.table, "--captioner", w.blip,
                                              "--filter", w.blip, "--out", out],
    "capfilt finetune --human": lambda w, t, out: ["capfilt", "finetune", "--human", t, "--model", w.blip, "--out", out],
}


@pytest.mark.parametrize("command", sorted(TABLE_COMMANDS))
def test_a_hostile_table_is_one_error_line_or_accepted_before_the_model(world, guarded, command):
    """Any bytes as a table (wrong encodings, torn lines, binary): one error line naming the problem, or, where
    the table happens to be readable, the command goes on to load its model; never a traceback, never an output."""
    before = snapshot(guarded)

    @_settings(2)
    @given(data=CORPUS["table_bytes"], suffix=st.sampled_from([".csv", ".jsonl", ".txt", ".tsv"]))
    def check(data, suffix):
        table = guarded.parent / f"table{suffix}"
        table.write_bytes(data)
        res, seconds = run_timed(TABLE_COMMANDS[command](world, table, str(guarded / "OUT")))
        assert seconds < SECONDS
        assert "ModelLoadReached" in res.err or res.failed_cleanly(), res.describe()
        if "ModelLoadReached" in res.err:  # accepted: the guard's traceback is the only one
            assert res.err.count("Traceback") == 1, res.describe()
        assert snapshot(guarded) == before, f"left {sorted(snapshot(guarded) - before)}"

    check()


# ---------------------------------------------------------------- the server

ENDPOINTS = ("/", "/api/info", "/api/search", "/api/search/image", "/files/{rel:path}")


def create_app_for(world: World):
    from vlkit.retrieval.collection import read_source
    from vlkit.retrieval.index import build_index
    from vlkit.retrieval.search import Searcher
    from vlkit.retrieval.server import Limits, create_app

    folder = world.root / "served"
    if not (folder / "index.json").exists():
        build_index(folder, ColorModel(), read_source(world.table), progress=False)
    return create_app(Searcher.open(folder, ColorModel()), Limits(max_upload_bytes=100_000, max_pixels=2_000_000, max_k=50))


@pytest.fixture(scope="module")
def client(world):
    from fastapi.testclient import TestClient

    return TestClient(create_app_for(world), raise_server_exceptions=False)


def _judge(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert isinstance(r.json()["detail"], (str, list)) and r.json()["detail"], r.text[:300]


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
K = st.one_of(st.integers(-5, 60), st.integers(), st.sampled_from(["", "x", "1.5", "nan", "1e9", " 3"]))


@_settings(25)
@given(q=st.one_of(TEXT, st.just("a" * 5000), st.just("\x00")), k=K, target=st.one_of(st.sampled_from(["images", "captions"]), TEXT),
       extra=st.dictionaries(TEXT, TEXT, max_size=2))
def test_text_search_answers_below_500(client, q, k, target, extra):
    start = time.monotonic()
    r = client.get("/api/search", params={**extra, "q": q, "k": k, "target": target})
    _judge(r)
    assert time.monotonic() - start < 5
    if r.status_code == 200:
        assert len(r.json()["results"]) <= 50


@_settings(25)
@given(data=CORPUS["image_bytes"], k=K, target=st.sampled_from(["images", "captions", "", "x"]),
       field_name=st.sampled_from(["file", "file", "upload"]), mime=st.sampled_from(["image/png", "text/plain", "", "x/y"]))
def test_image_search_answers_below_500(client, data, k, target, field_name, mime):
    start = time.monotonic()
    r = client.post("/api/search/image", files={field_name: ("q.png", data, mime)}, data={"k": str(k), "target": target})
    _judge(r)
    assert time.monotonic() - start < 5
    if r.status_code == 200:
        assert _decodable(data)


@_settings(25)
@given(rel=st.one_of(TEXT, st.sampled_from(["../index.json", "..%2findex.json", "%2e%2e/x", "/etc/passwd", "img/../../index.json",
                                             "img/red.png", "img/red.png/", "img//red.png", "img/./red.png", "%00", "img/red.png%00"])))
def test_file_serving_gives_indexed_images_only(client, world, rel):
    from urllib.parse import quote

    r = client.get("/files/" + quote(rel, safe="/%"))  # the server sees `rel` itself, control characters included
    _judge(r)
    if r.status_code == 200:
        assert r.content in {p.read_bytes() for p in (world.table.parent / "img").iterdir()}


@_settings(12)
@given(path=st.sampled_from(["/", "/api/info", "/api/nope", "/api/search/image", "/files/", "/api"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
       body=st.one_of(st.binary(max_size=64), st.just(b"")),
       ctype=st.sampled_from(["application/json", "multipart/form-data", "multipart/form-data; boundary=x",
                              "application/x-www-form-urlencoded", "text/plain"]))
def test_any_method_on_any_route_answers_below_500(client, path, method, body, ctype):
    r = client.request(method, path, content=body, headers={"content-type": ctype})
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])


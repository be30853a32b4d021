"""Recipes on small fixtures shaped like each real source (built here, no network)."""

from __future__ import annotations

import base64
import hashlib
import io as _io
import json
import os
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlkit.cli import main
from vlkit.data.recipes import emoji, openclipart, read_jsonl, resolve_data_dir
from vlkit.data.recipes.fetch import (
    DebPackage,
    NpmPackage,
    fetch_deb,
    fetch_npm,
    sri_sha512,
    unpack_deb,
    unpack_tgz,
)
from vlkit.errors import VlkitError

# ---------------------------------------------------------------- fixtures


def _rgba_png(path: Path, colour: tuple[int, int, int], size: int = 64) -> None:
    """A coloured disc on a transparent canvas, like an emoji-datasource 64 px image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((8, 8, size - 8, size - 8), fill=(*colour, 255))
    im.save(path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


GROUPS = [
    {"key": "smileys-emotion", "message": "smileys & emotion", "order": 0},
    {"key": "people-body", "message": "people & body", "order": 1},
    {"key": "component", "message": "components", "order": 2},
    {"key": "flags", "message": "flags", "order": 9},
]
SUBGROUPS = [
    {"key": "face-smiling", "message": "smiling", "order": 0},
    {"key": "hand-fingers-open", "message": "fingers open", "order": 16},
    {"key": "skin-tone", "message": "skin tones", "order": 33},
    {"key": "country-flag", "message": "country flags", "order": 98},
]


def _skins(hexcode: str, label: str, emoji_char: str) -> list[dict]:
    mods = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]
    names = ["light", "medium-light", "medium", "medium-dark", "dark"]
    return [
        {"label": f"{label}: {n} skin tone", "hexcode": f"{hexcode}-{m}", "emoji": emoji_char + chr(int(m, 16)),
         "group": 1, "subgroup": 16, "tone": i + 1}
        for i, (m, n) in enumerate(zip(mods, names))
    ]


def make_emoji_source(data_dir: Path) -> None:
    """raw/emoji/<package>/package/... with the files the emoji recipe reads."""
    eb = data_dir / "raw/emoji/emojibase-data/package"
    en = [
        {"label": "grinning face", "hexcode": "1F600", "emoji": "😀", "group": 0, "subgroup": 0, "tags": ["face", "grin"]},
        {"label": "smiling face", "hexcode": "263A", "emoji": "☺️", "group": 0, "subgroup": 0, "tags": ["smile"]},
        {"label": "waving hand", "hexcode": "1F44B", "emoji": "👋", "group": 1, "subgroup": 16, "tags": ["wave"],
         "skins": _skins("1F44B", "waving hand", "👋")},
        {"label": "light skin tone", "hexcode": "1F3FB", "emoji": "🏻", "group": 2, "subgroup": 33},
        {"label": "flag: Japan", "hexcode": "1F1EF-1F1F5", "emoji": "🇯🇵", "group": 9, "subgroup": 98, "tags": ["JP"]},
        {"label": "regional indicator A", "hexcode": "1F1E6", "emoji": "🇦"},
    ]
    zh = [
        {"label": "嘿嘿", "hexcode": "1F600", "tags": ["笑"]},
        {"label": "微笑", "hexcode": "263A", "tags": ["笑脸"]},
        {"label": "挥手", "hexcode": "1F44B", "tags": ["再见"],
         "skins": [{"label": f"挥手: 肤色{i}", "hexcode": s["hexcode"]} for i, s in enumerate(_skins("1F44B", "", "👋"))]},
        {"label": "浅肤色", "hexcode": "1F3FB"},
        {"label": "旗: 日本", "hexcode": "1F1EF-1F1F5", "tags": ["日本"]},
    ]
    _write_json(eb / "en/data.json", en)
    _write_json(eb / "zh/data.json", zh)
    _write_json(eb / "en/messages.json", {"groups": GROUPS, "subgroups": SUBGROUPS, "skinTones": []})
    _write_json(eb / "zh/messages.json", {"groups": [{**g, "message": "组" + g["key"]} for g in GROUPS],
                                           "subgroups": [{**g, "message": "子" + g["key"]} for g in SUBGROUPS],
                                           "skinTones": []})
    colours = {"twitter": (250, 200, 0), "google": (240, 120, 0), "facebook": (0, 120, 240)}
    for style, colour in colours.items():
        root = data_dir / f"raw/emoji/emoji-datasource-{style}/package"
        has = f"has_img_{style}"
        entries = [
            {"unified": "1F600", "image": "1f600.png", has: True},
            {"unified": "263A-FE0F", "image": "263a-fe0f.png", has: True},
            {"unified": "1F44B", "image": "1f44b.png", has: True, "skin_variations": {
                m: {"unified": f"1F44B-{m}", "image": f"1f44b-{m.lower()}.png", has: style != "facebook" or m == "1F3FB"}
                for m in ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]}},
            {"unified": "1F1EF-1F1F5", "image": "1f1ef-1f1f5.png", has: True},
            {"unified": "1F3FB", "image": "1f3fb.png", has: True},
            {"unified": "1FAE8", "image": "1fae8.png", has: True},  # not in emojibase: unlabelled
            {"unified": "1F970", "image": "1f970.png", has: False},  # no image in this style
        ]
        _write_json(root / "emoji.json", entries)
        for e in entries:
            for item in [e, *e.get("skin_variations", {}).values()]:
                if item[has]:
                    _rgba_png(root / f"img/{style}/64" / item["image"], colour)
    om = data_dir / "raw/emoji/openmoji/package"
    meta = [
        {"hexcode": "1F600", "group": "smileys-emotion"},
        {"hexcode": "263A", "group": "smileys-emotion"},
        {"hexcode": "1F44B-1F3FD", "group": "people-body"},
        {"hexcode": "1F1EF-1F1F5", "group": "flags"},
        {"hexcode": "E000", "group": "extras-openmoji"},
    ]
    _write_json(om / "data/openmoji.json", meta)
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
           '<circle cx="36" cy="36" r="20" fill="#3F7F3F"/></svg>')
    for e in meta:
        (om / "color/svg").mkdir(parents=True, exist_ok=True)
        (om / "color/svg" / f"{e['hexcode']}.svg").write_text(svg)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height: a decompression bomb must be refused from it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def make_openclipart_source(data_dir: Path) -> Path:
    """raw/openclipart/root/usr/share/openclipart/png/<category path>/<name>.png, with links and a bomb."""
    png = data_dir / "raw/openclipart/root/usr/share/openclipart/png"
    _rgba_png(png / "animals/birds/blue_bird_jane_doe_01.png", (0, 0, 200), size=300)
    _rgba_png(png / "animals/birds/penguin/penguin_tux_02.png", (10, 10, 10), size=120)
    (png / "food/fruit").mkdir(parents=True)
    Image.new("RGB", (200, 80), (200, 0, 0)).save(png / "food/fruit/apple-red_bob_01.png")
    (png / "education").mkdir(parents=True)
    os.symlink("../animals/birds/blue_bird_jane_doe_01.png", png / "education/blue_bird_jane_doe_01.png")
    os.symlink("../animals/missing.png", png / "education/broken_link.png")
    _png_header_only(png / "signs_and_symbols/stop_sign_huge_.png", 20990, 29700)  # 623 MP
    (png / "food/fruit/not_really_a.png").write_text("this is text, not a PNG")
    return png


@pytest.fixture(scope="module")
def emoji_data(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("emoji-data")
    make_emoji_source(data_dir)
    report = emoji.build(data_dir, progress=False, log=lambda s: None)
    assert report["styles"]["twitter"]["unlabelled"] == 1
    return data_dir


# ---------------------------------------------------------------- emoji


def test_emoji_build_rows_carry_every_label(emoji_data: Path) -> None:
    rows = {r["id"]: r for r in read_jsonl(emoji_data / "built/emoji/metadata.jsonl")}
    wave = rows["google/1f44b-1f3fd"]
    assert wave["label"] == "waving hand: medium skin tone"
    assert wave["tags"] == ["wave"]  # skin variants inherit the base emoji's tags
    assert wave["label_zh"] == "挥手: 肤色2" and wave["tags_zh"] == ["再见"]
    assert wave["skintone"] == ["medium"] and wave["base"] == "1F44B" and wave["base_label"] == "waving hand"
    assert wave["group"] == "people-body" and wave["group_name"] == "people & body" and wave["group_zh"] == "组people-body"
    assert wave["subgroup"] == "hand-fingers-open" and wave["subgroup_name"] == "fingers open"
    assert wave["codepoints"] == ["1F44B", "1F3FD"]
    smile = rows["twitter/263a"]  # FE0F-qualified file name joins the unqualified emojibase key
    assert smile["codepoints"] == ["263A", "FE0F"] and smile["label"] == "smiling face" and smile["skintone"] == []
    assert rows["openmoji/1f1ef-1f1f5"]["label_zh"] == "旗: 日本"
    assert rows["twitter/1f600"]["licence"].startswith("CC-BY-4.0")


def test_emoji_styles_and_heldout_facebook_kept_apart(emoji_data: Path) -> None:
    open_rows = read_jsonl(emoji_data / "built/emoji/metadata.jsonl")
    held = read_jsonl(emoji_data / "built/emoji-facebook/metadata.jsonl")
    assert {r["style"] for r in open_rows} == {"twitter", "google", "openmoji"}
    assert {r["style"] for r in held} == {"facebook"}
    assert not any("facebook" in r["image"] for r in open_rows)
    styles = [r["style"] for r in open_rows]
    # 5 labelled base images + 5 skin variants per datasource style; openmoji: 4 (extras left out)
    assert styles.count("twitter") == 10 and styles.count("google") == 10 and styles.count("openmoji") == 4
    assert len(held) == 6 and "licence" in held[0] and "held-out" in held[0]["licence"]


def test_emoji_thumbnails_fixed_size_on_white_with_relative_paths(emoji_data: Path) -> None:
    for dataset in ("emoji", "emoji-facebook"):
        folder = emoji_data / "built" / dataset
        for r in read_jsonl(folder / "metadata.jsonl"):
            assert not os.path.isabs(r["image"]) and ".." not in r["image"].split("/")
            im = Image.open(folder / r["image"])
            assert im.size == (64, 64) and im.mode == "RGB"
            assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent corner -> white
            centre = im.getpixel((32, 32))
            assert centre != (255, 255, 255)  # the artwork itself survives
    assert Image.open(emoji_data / "built/emoji/images/openmoji/1f600.png").getpixel((36, 36)) == (0x3F, 0x7F, 0x3F)


def test_emoji_build_resumes_without_redoing_thumbnails(emoji_data: Path) -> None:
    meta = emoji_data / "built/emoji/metadata.jsonl"
    before = meta.read_bytes()
    report = emoji.build(emoji_data, progress=False, log=lambda s: None)
    assert all(s["thumbnails_made"] == 0 for s in report["styles"].values())
    assert meta.read_bytes() == before


# ---------------------------------------------------------------- openclipart


@pytest.fixture(scope="module")
def clipart_data(tmp_path_factory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("clipart-data")
    make_openclipart_source(data_dir)
    report = openclipart.build(data_dir, progress=False, log=lambda s: None)
    return data_dir, report


def test_openclipart_categories_captions_and_links(clipart_data) -> None:
    data_dir, _ = clipart_data
    rows = {r["id"]: r for r in read_jsonl(data_dir / "built/openclipart/metadata.jsonl")}
    assert set(rows) == {
        "openclipart/animals/birds/blue_bird_jane_doe_01",
        "openclipart/animals/birds/penguin/penguin_tux_02",
        "openclipart/food/fruit/apple-red_bob_01",
    }
    bird = rows["openclipart/animals/birds/blue_bird_jane_doe_01"]
    assert bird["category"] == "animals/birds" and bird["category_top"] == "animals"
    assert bird["caption"] == "blue bird jane doe 01" and bird["file_name"] == "blue_bird_jane_doe_01.png"
    assert bird["also_in"] == ["education"]  # the symlink files it under a second category
    assert rows["openclipart/food/fruit/apple-red_bob_01"]["caption"] == "apple red bob 01"
    for r in rows.values():
        im = Image.open(data_dir / "built/openclipart" / r["image"])
        assert im.size == (64, 64) and im.getpixel((0, 0)) == (255, 255, 255)


def test_openclipart_bomb_and_broken_files_are_skipped_and_counted(clipart_data) -> None:
    data_dir, report = clipart_data
    stats = report["report"]["openclipart"]
    assert stats["skipped"] == 2 and stats["broken_links"] == 1
    reasons = dict(stats["skipped_files"])
    assert "too large: 20990x29700 = 623 MP" in reasons["signs_and_symbols/stop_sign_huge_.png"]
    assert "food/fruit/not_really_a.png" in reasons
    stored = json.loads((data_dir / "built/openclipart/build.json").read_text())
    assert stored["report"]["openclipart"]["skipped"] == 2


def test_openclipart_max_pixels_guard_applies_to_every_image(tmp_path: Path) -> None:
    make_openclipart_source(tmp_path)
    report = openclipart.build(tmp_path, max_pixels=100 * 100, progress=False, log=lambda s: None)
    # every fixture image is over 10k pixels (and one is not an image): nothing is decoded or written
    assert report["rows"] == 0 and report["report"]["openclipart"]["skipped"] == 5
    assert not list((tmp_path / "built/openclipart").rglob("*.png"))


# ---------------------------------------------------------------- fetch


def _tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))


def _fake_tool(bin_dir: Path, name: str, script: str) -> None:
    """A stand-in for npm/apt-get/dpkg-deb: a Python script (PATH holds nothing else)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!{sys.executable}\nimport os, shutil, sys\n" + script)
    tool.chmod(0o755)


def test_fetch_npm_verifies_and_resumes(tmp_path: Path, monkeypatch) -> None:
    payload = tmp_path / "payload.tgz"
    _tgz(payload, {"package.json": b'{"name": "pkg"}'})
    pkg = NpmPackage("pkg", "1.0.0", sri_sha512(payload), "MIT")
    assert pkg.integrity == "sha512-" + base64.b64encode(hashlib.sha512(payload.read_bytes()).digest()).decode()
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "npm", f"shutil.copy({str(payload)!r}, 'pkg-1.0.0.tgz')\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    dest = tmp_path / "raw"
    path, downloaded = fetch_npm(pkg, dest)
    assert downloaded and path == dest / "pkg-1.0.0.tgz"
    assert [p.name for p in dest.iterdir()] == ["pkg-1.0.0.tgz"]  # no temporary left behind
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # already there: npm is not needed
    assert fetch_npm(pkg, dest) == (path, False)
    out = unpack_tgz(path, dest / "pkg")
    assert (out / "package/package.json").read_bytes() == b'{"name": "pkg"}'
    (out / "package/package.json").write_text("edited")
    unpack_tgz(path, dest / "pkg")  # marker present: not unpacked again
    assert (out / "package/package.json").read_text() == "edited"


def test_fetch_npm_rejects_a_wrong_checksum(tmp_path: Path, monkeypatch) -> None:
    payload = tmp_path / "payload.tgz"
    _tgz(payload, {"a": b"1"})
    pkg = NpmPackage("pkg", "1.0.0", "sha512-" + base64.b64encode(b"\0" * 64).decode(), "MIT")
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "npm", f"shutil.copy({str(payload)!r}, 'pkg-1.0.0.tgz')\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(VlkitError, match="checksum mismatch"):
        fetch_npm(pkg, tmp_path / "raw")
    assert not (tmp_path / "raw/pkg-1.0.0.tgz").exists()


def test_fetch_deb_and_unpack_with_fake_tools(tmp_path: Path, monkeypatch) -> None:
    deb = tmp_path / "payload.deb"
    deb.write_bytes(b"not really a deb")
    pkg = DebPackage("thing", "1:2.0-1", hashlib.sha256(deb.read_bytes()).hexdigest(), "public domain")
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "apt-get", f"shutil.copy({str(deb)!r}, 'thing_1%3a2.0-1_all.deb')\n")
    _fake_tool(bin_dir, "dpkg-deb", "os.makedirs(sys.argv[3] + '/usr/share')\nopen(sys.argv[3] + '/usr/share/x', 'w').write('hi\\n')\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    path, downloaded = fetch_deb(pkg, tmp_path / "raw")
    assert downloaded and path.name == "thing_1%3a2.0-1_all.deb"
    out = unpack_deb(path, tmp_path / "raw/root")
    assert (out / "usr/share/x").read_text() == "hi\n"


@pytest.mark.parametrize(
    ("recipe", "tool", "hint"),
    [("emoji", "npm", "install Node.js with npm"), ("openclipart", "apt-get", "run on a Debian/Ubuntu system")],
)
def test_missing_tool_is_one_clear_cli_line(tmp_path: Path, monkeypatch, capsys, recipe, tool, hint) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "fetch", recipe, "--data-dir", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"error: {tool}: not found on PATH; {hint}")
    assert str(tmp_path / "data" / "raw" / recipe) in err  # says which folder to fill instead


def test_missing_dpkg_deb_names_the_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    archive = tmp_path / "x.deb"
    archive.write_bytes(b"x")
    with pytest.raises(VlkitError, match=r"dpkg-deb: not found on PATH; install dpkg .* into .*root"):
        unpack_deb(archive, tmp_path / "root")


def test_build_before_fetch_and_writing_the_sample_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(VlkitError, match=r"emojibase-data/package: not found; run `vlkit data fetch emoji` first"):
        emoji.build(tmp_path, progress=False)
    with pytest.raises(VlkitError, match=r"png: not found; run `vlkit data fetch openclipart` first"):
        openclipart.build(tmp_path, progress=False)
    for args in (["data", "build", "emoji"], ["data", "fetch", "openclipart"], ["data", "splits"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--data-dir", "sample"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == (
            "error: --data-dir sample: the bundled sample is read-only; pass another folder (or none for the default)"
        )


def test_data_dir_resolution(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VLKIT_DATA", raising=False)
    assert resolve_data_dir() == Path(os.path.expanduser("~/.cache/vlkit/data"))
    monkeypatch.setenv("VLKIT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"  # the flag wins over the variable
    assert (resolve_data_dir("sample") / "NOTICE").exists()


def test_pinned_packages_are_pinned() -> None:
    for pkg in emoji.PACKAGES.values():
        assert pkg.integrity.startswith("sha512-") and len(base64.b64decode(pkg.integrity[7:])) == 64
        assert pkg.version[0].isdigit()
    assert len(bytes.fromhex(openclipart.PACKAGE.sha256)) == 32

"""Emoji recipe: four artwork styles labelled by emojibase, in English and Chinese.

Sources (npm, pinned and checksummed below):
- `emoji-datasource-twitter` / `-google` / `-facebook`: one 64 px PNG per emoji
  and skin-tone variant under `img/<style>/64/` (the sprite sheets are not used).
- `openmoji`: colour SVGs under `color/svg/`, rasterised with resvg (the
  package ships no PNGs); OpenMoji's own extras (no Unicode code point, hence
  no emojibase label) are left out.
- `emojibase-data`: labels, tags, group and subgroup names in `en` and `zh`.

Two datasets are built: `emoji` (twitter, google, openmoji: openly licensed)
and `emoji-facebook` (facebook: no clear licence, so it lives in its own folder
and is only ever a held-out test style; never train, tune or ship on it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vlkit import io
from vlkit.data.images import BadImage
from vlkit.data.recipes import built_dir, raw_dir, read_jsonl, write_jsonl
from vlkit.data.recipes.fetch import NpmPackage, fetch_npm, unpack_tgz
from vlkit.data.recipes.thumbs import THUMB_SIZE, raster_thumbnail, svg_thumbnail
from vlkit.errors import VlkitError

PACKAGES: dict[str, NpmPackage] = {
    "twitter": NpmPackage(
        "emoji-datasource-twitter",
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        "CC-BY-4.0 (Twemoji artwork)",
    ),
    "google": NpmPackage(
        "emoji-datasource-google",
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        "Apache-2.0 (Noto Emoji artwork)",
    ),
    "facebook": NpmPackage(
        "emoji-datasource-facebook",
        "16.0.0",
        "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
        "no clear licence: held-out evaluation only, never train, tune or ship",
    ),
    "openmoji": NpmPackage(
        "openmoji",
        "17.0.0",
        "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
        "CC-BY-SA-4.0 (OpenMoji artwork)",
    ),
    "emojibase": NpmPackage(
        "emojibase-data",
        "17.0.0",
        "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
        "MIT (labels and tags)",
    ),
}
DATASOURCE_STYLES = ("twitter", "google", "facebook")
OPEN_STYLES = ("twitter", "google", "openmoji")
HELDOUT_STYLES = ("facebook",)
LICENCES = {style: PACKAGES[style].licence for style in (*OPEN_STYLES, *HELDOUT_STYLES)}
# emojibase's `tone` 1..5, in Fitzpatrick order.
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")


def dataset_for_style(style: str) -> str:
    """`emoji` for open styles, `emoji-facebook` for the held-out one."""
    return "emoji-facebook" if style in HELDOUT_STYLES else "emoji"


def package_dir(data_dir: Path, key: str) -> Path:
    """Where the unpacked npm package `key` lives (its `package/` folder)."""
    return raw_dir(data_dir, "emoji") / PACKAGES[key].name / "package"


def fetch(data_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """npm-pack, verify and unpack every package; skip what is already there."""
    dest = raw_dir(data_dir, "emoji")
    report: dict[str, Any] = {}
    for key, pkg in PACKAGES.items():
        t0 = time.perf_counter()
        archive, downloaded = fetch_npm(pkg, dest)
        unpack_tgz(archive, dest / pkg.name)
        report[pkg.name] = {
            "version": pkg.version,
            "bytes": archive.stat().st_size,
            "downloaded": downloaded,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log(f"{pkg.name}@{pkg.version}: {'fetched' if downloaded else 'present'}, verified, unpacked")
    return report


def norm_hex(hexcode: str) -> str:
    """Join key across sources: upper-case code points without the FE0F variation selector."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


@dataclass
class Labels:
    """emojibase entries keyed by `norm_hex`, with group/subgroup/tone names in en and zh."""

    entries: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, emojibase: Path) -> "Labels":
        def read(lang: str, name: str) -> Any:
            return json.loads((emojibase / lang / name).read_text(encoding="utf-8"))

        en, zh = read("en", "data.json"), read("zh", "data.json")
        msg_en, msg_zh = read("en", "messages.json"), read("zh", "messages.json")
        groups = {g["order"]: (g["key"], g["message"]) for g in msg_en["groups"]}
        groups_zh = {g["order"]: g["message"] for g in msg_zh["groups"]}
        subgroups = {g["order"]: (g["key"], g["message"]) for g in msg_en["subgroups"]}
        subgroups_zh = {g["order"]: g["message"] for g in msg_zh["subgroups"]}
        zh_by_hex: dict[str, dict[str, Any]] = {}
        for e in zh:
            for item in [e, *e.get("skins", [])]:
                zh_by_hex[norm_hex(item["hexcode"])] = item

        entries: dict[str, dict[str, Any]] = {}
        for base in en:
            base_key = norm_hex(base["hexcode"])
            base_zh = zh_by_hex.get(base_key, {})
            for item in [base, *base.get("skins", [])]:
                key = norm_hex(item["hexcode"])
                item_zh = zh_by_hex.get(key, {})
                g, sg = item.get("group", base.get("group")), item.get("subgroup", base.get("subgroup"))
                tone = item.get("tone")
                tones = [] if tone is None else [TONES[t - 1] for t in (tone if isinstance(tone, list) else [tone])]
                entries[key] = {
                    "emoji": item["emoji"],
                    "codepoints": [f"{ord(c):04X}" for c in item["emoji"]],
                    "label": item["label"],
                    # skin variants carry no tags of their own: they inherit the base emoji's
                    "tags": item.get("tags", base.get("tags", [])),
                    "label_zh": item_zh.get("label"),
                    "tags_zh": item_zh.get("tags", base_zh.get("tags", [])),
                    "group": groups[g][0] if g is not None else None,
                    "group_name": groups[g][1] if g is not None else None,
                    "group_zh": groups_zh.get(g) if g is not None else None,
                    "subgroup": subgroups[sg][0] if sg is not None else None,
                    "subgroup_name": subgroups[sg][1] if sg is not None else None,
                    "subgroup_zh": subgroups_zh.get(sg) if sg is not None else None,
                    "skintone": tones,
                    "base": base_key,
                    "base_label": base["label"],
                    "base_label_zh": base_zh.get("label"),
                    "unicode_version": item.get("version"),
                }
        return cls(entries)


def source_images(data_dir: Path, style: str) -> list[tuple[str, Path]]:
    """(emojibase join key, source file) for every image a style's package ships."""
    if style == "openmoji":
        root = package_dir(data_dir, "openmoji")
        meta = json.loads((root / "data" / "openmoji.json").read_text(encoding="utf-8"))
        return [
            (norm_hex(e["hexcode"]), root / "color" / "svg" / f"{e['hexcode']}.svg")
            for e in meta
            if not e["group"].startswith("extras-")
        ]
    root = package_dir(data_dir, style)
    out = []
    for e in json.loads((root / "emoji.json").read_text(encoding="utf-8")):
        for item in [e, *e.get("skin_variations", {}).values()]:
            if item.get(f"has_img_{style}"):
                out.append((norm_hex(item["unified"]), root / "img" / style / "64" / item["image"]))
    return out


def build(
    data_dir: Path,
    size: int = THUMB_SIZE,
    styles: tuple[str, ...] = (*OPEN_STYLES, *HELDOUT_STYLES),
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Thumbnail every labelled image of each style and write metadata.jsonl per dataset.

    Existing thumbnails are kept (resume). A dataset's metadata is rewritten for the
    styles built now and keeps the rows (and build report) of its other styles, so
    building a subset of styles never drops the rest. Files that cannot be decoded
    are skipped and counted, never fatal.
    """
    t0 = time.perf_counter()
    known = (*OPEN_STYLES, *HELDOUT_STYLES)
    unknown = [st for st in styles if st not in known]
    if unknown or not styles:
        raise VlkitError(f"styles {list(styles)}: use one or more of {', '.join(known)}")
    for key in ("emojibase", *styles):
        if not package_dir(data_dir, key).is_dir():
            raise VlkitError(
                f"{package_dir(data_dir, key)}: not found; run `vlkit data fetch emoji` first "
                "(with the same --data-dir)"
            )
    labels = Labels.load(package_dir(data_dir, "emojibase"))
    rows: dict[str, list[dict[str, Any]]] = {}
    report: dict[str, Any] = {"size": size, "styles": {}}
    for style in styles:
        ts = time.perf_counter()
        dataset = dataset_for_style(style)
        out_dir = built_dir(data_dir, dataset)
        items = source_images(data_dir, style)
        made = kept = 0
        unlabelled: list[str] = []
        skipped: list[tuple[str, str]] = []
        for key, src in _progress(items, f"{style:>9}", progress):
            entry = labels.entries.get(key)
            if entry is None:
                unlabelled.append(key)
                continue
            rel = f"images/{style}/{key.lower()}.png"
            dst = out_dir / rel
            if dst.exists():
                kept += 1
            else:
                try:
                    (svg_thumbnail if src.suffix == ".svg" else raster_thumbnail)(src, dst, size)
                    made += 1
                except BadImage as e:
                    skipped.append((str(src), e.reason))
                    continue
            rows.setdefault(dataset, []).append(
                {"id": f"{style}/{key.lower()}", "image": rel, "style": style, "licence": LICENCES[style], **entry}
            )
        report["styles"][style] = {
            "dataset": dataset,
            "images": made + kept,
            "thumbnails_made": made,
            "thumbnails_kept": kept,
            "unlabelled": len(unlabelled),
            "skipped": len(skipped),
            "skipped_files": skipped,
            "seconds": round(time.perf_counter() - ts, 2),
        }
        log(f"{style}: {made + kept} images ({made} new), {len(unlabelled)} unlabelled, {len(skipped)} skipped")
    for dataset, dataset_rows in rows.items():
        out_dir = built_dir(data_dir, dataset)
        kept_rows, kept_report = _other_styles(out_dir, styles)
        report_styles = {**kept_report, **{st: report["styles"][st] for st in styles if dataset_for_style(st) == dataset}}
        dataset_rows = sorted([*kept_rows, *dataset_rows], key=lambda r: known.index(r["style"]) if r["style"] in known else len(known))
        n = write_jsonl(out_dir / "metadata.jsonl", dataset_rows)
        dataset_styles = sorted({r["style"] for r in dataset_rows})
        io.write_json(
            out_dir / "build.json",
            {
                "dataset": dataset,
                "recipe": "emoji",
                "rows": n,
                "size": size,
                "sources": {k: f"{PACKAGES[k].name}@{PACKAGES[k].version}" for k in (*dataset_styles, "emojibase")},
                "licences": {s: LICENCES[s] for s in dataset_styles if s in LICENCES},
                "report": {s: report_styles[s] for s in dataset_styles if s in report_styles},
            },
        )
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _other_styles(out_dir: Path, styles: tuple[str, ...]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and build reports of the styles of an existing build that this build leaves alone."""
    meta = out_dir / "metadata.jsonl"
    if not meta.exists():
        return [], {}
    rows = [r for r in read_jsonl(meta) if r.get("style") not in styles]
    info = out_dir / "build.json"
    reports = {}
    if rows and info.exists():
        try:
            reports = json.loads(info.read_text(encoding="utf-8")).get("report", {})
        except ValueError:
            reports = {}
    kept = {r["style"] for r in rows}
    return rows, {st: rep for st, rep in reports.items() if st in kept}


def _progress(items: list, label: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=label, transient=True)

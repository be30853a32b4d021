"""CapFilt (BLIP, section 3.3): bootstrap a cleaner image-text collection from noisy web pairs.

A captioner writes a synthetic caption for every web image (nucleus sampling by
default, as BLIP found more diverse captions help more than beam search), a
filter scores the web text and the synthetic caption against their image with
its ITM head and keeps a text when the match probability is above a threshold
(0.5), and the bootstrapped collection is the human pairs plus every kept web
and synthetic pair. BLIP fine-tunes captioner and filter apart from one
pretrained model; here they are any two BLIP models (or the same one).

The web table is cut into shards of `shard_size` rows in table order; each pass
writes one JSONL file per shard, atomically (`shards/NNNNN.captions.jsonl`, then
`shards/NNNNN.filter.jsonl`), so memory stays at one shard and an interrupted
run resumes at the first shard file missing. A shard's sampling seed is a
function of (seed, shard), so a resumed run writes exactly what an uninterrupted
one does. `write_collection` then reads the shards back into:

- `collection.jsonl`: one row per image, `captions` (human + kept web + kept
  synthetic) and their `sources`, which `vlkit pretrain` reads as a source;
- `provenance.jsonl`: every input pair and every synthetic caption exactly once,
  with source (human / web / synthetic), ITM probability and decision (or the
  reason its image was skipped);
- `summary.json`: counts and kept shares per source, examples of each kind;
- `itm_scores.png`: histograms of the ITM probabilities of web and synthetic texts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from vlkit import io
from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.blip.checkpoint import LoadedBlip
    from vlkit.blip.generate import CaptionSettings
    from vlkit.blip.match import Pair

DEFAULT_THRESHOLD = 0.5
DEFAULT_SHARD_SIZE = 1024
# the style `collection.jsonl` rows carry: list it in a pretraining config's data.styles to train on them
COLLECTION_STYLE = "capfilt"


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of the web table, the pairs in them, and the files the passes write for them."""

    index: int
    pairs: tuple["Pair", ...]
    folder: Path

    @property
    def captions_path(self) -> Path:
        return self.folder / f"{self.index:05d}.captions.jsonl"

    @property
    def filter_path(self) -> Path:
        return self.folder / f"{self.index:05d}.filter.jsonl"

    @property
    def images(self) -> list[str]:
        return list(dict.fromkeys(p.path for p in self.pairs))


def shards(web: Sequence["Pair"], out_dir: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE) -> list[Shard]:
    """The web pairs cut into shards of `shard_size` pairs (the pairs of one table row never split)."""
    if shard_size < 1:
        raise VlkitError(f"--shard-size {shard_size}: must be at least 1")
    folder = Path(out_dir) / "shards"
    out: list[Shard] = []
    current: list["Pair"] = []
    for i, pair in enumerate(web):
        current.append(pair)
        last_of_row = i + 1 == len(web) or web[i + 1].line != pair.line
        if len(current) >= shard_size and last_of_row:
            out.append(Shard(len(out), tuple(current), folder))
            current = []
    if current:
        out.append(Shard(len(out), tuple(current), folder))
    return out


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """A JSONL file of `rows`, written atomically (a shard file exists whole or not at all)."""
    io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of one shard: the same whether the run was interrupted or not."""
    return (int(seed) * 1_000_003 + int(shard)) % (2**31 - 1)


def caption_rows(captioner: "LoadedBlip", shard: Shard, settings: "CaptionSettings", batch_size: int = 16) -> list[dict[str, Any]]:
    """One shard's captions file rows: the synthetic captions of every image (sampled with the shard's
    seed), then the unreadable images with their reason. The single process and Ray both call this."""
    from vlkit.blip.captioning import caption_files

    run = caption_files(captioner, shard.images, replace(settings, seed=shard_seed(settings.seed, shard.index)),
                        batch_size=batch_size)
    rows = [{"path": r["path"], "captions": r.get("captions", [r["caption"]])} for r in run.records]
    return rows + [{"path": path, "skipped": reason} for path, reason in run.skipped]


def caption_pass(
    captioner: "LoadedBlip",
    todo: Sequence[Shard],
    settings: "CaptionSettings",
    *,
    batch_size: int = 16,
    on_shard: Callable[[Shard, bool], None] | None = None,
) -> None:
    """Caption every image of every shard whose captions file is missing (synthetic captions; unreadable
    images listed with their reason). `on_shard(shard, done_before)` reports each shard."""
    for shard in todo:
        done = shard.captions_path.exists()
        if not done:
            write_rows(shard.captions_path, caption_rows(captioner, shard, settings, batch_size))
        if on_shard is not None:
            on_shard(shard, done)


def read_captions(shard: Shard) -> list[dict[str, Any]]:
    """A shard's captions file rows (the filter pass's input)."""
    if not shard.captions_path.exists():
        raise VlkitError(f"{shard.captions_path}: missing; run the caption pass first")
    return read_rows(shard.captions_path)


def filter_rows(filt: "LoadedBlip", shard: Shard, captioned: Sequence[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD,
                batch_size: int = 32) -> list[dict[str, Any]]:
    """One shard's filter file rows: each web text, then each synthetic caption (`captioned`, the shard's
    captions rows), with its ITM probability and decision; texts of unreadable images as skipped."""
    from vlkit.blip.match import Pair, match_pairs

    skipped = {r["path"]: r["skipped"] for r in captioned if "skipped" in r}
    todo_pairs = [(p, "web") for p in shard.pairs if p.path not in skipped]
    todo_pairs += [(Pair(r["path"], c, -1), "synthetic") for r in captioned if "captions" in r for c in r["captions"]]
    result = match_pairs(filt.model, filt.tokenizer, filt.preprocess, [p for p, _ in todo_pairs], batch_size=batch_size)
    unread = dict(result.skipped)
    scores = iter(result.rows)
    rows: list[dict[str, Any]] = []
    for pair, source in todo_pairs:
        if pair.path in unread:
            rows.append({"path": pair.path, "text": pair.text, "source": source, "kept": False, "skipped": unread[pair.path]})
            continue
        p = next(scores)["itm_probability"]
        rows.append({"path": pair.path, "text": pair.text, "source": source, "itm_probability": p, "threshold": threshold,
                     "kept": p > threshold})
    return rows + [{"path": p.path, "text": p.text, "source": "web", "kept": False, "skipped": skipped[p.path]}
                   for p in shard.pairs if p.path in skipped]


def filter_pass(
    filt: "LoadedBlip",
    todo: Sequence[Shard],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    batch_size: int = 32,
    on_shard: Callable[[Shard, bool], None] | None = None,
) -> None:
    """Score each web text and each synthetic caption against its image with the filter's ITM head; keep it
    when the probability is above `threshold`. Needs the shard's captions file."""
    check_threshold(threshold)
    for shard in todo:
        done = shard.filter_path.exists()
        if not done:
            write_rows(shard.filter_path, filter_rows(filt, shard, read_captions(shard), threshold, batch_size))
        if on_shard is not None:
            on_shard(shard, done)


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold < 1.0:
        raise VlkitError(f"--threshold {threshold}: an ITM probability in [0, 1) (BLIP keeps a text above 0.5)")


def _examples(rows: Sequence[dict[str, Any]], n: int = 3) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("path", "text", "itm_probability") if k in r} for r in rows[:n]]


def write_collection(human: Sequence["Pair"], todo: Sequence[Shard], out_dir: str | os.PathLike) -> dict[str, Any]:
    """collection.jsonl, provenance.jsonl and summary.json from the human pairs and every shard's filter file."""
    out = Path(out_dir)
    missing = [str(s.filter_path) for s in todo if not s.filter_path.exists()]
    if missing:
        raise VlkitError(f"{missing[0]}: missing ({len(missing)} shard(s)); run the caption and filter passes first")
    provenance: list[dict[str, Any]] = [{"path": p.path, "text": p.text, "source": "human", "kept": True} for p in human]
    for shard in todo:
        provenance += read_rows(shard.filter_path)
    images: dict[str, dict[str, list[str]]] = {}
    for row in provenance:
        if row["kept"]:
            entry = images.setdefault(row["path"], {"captions": [], "sources": []})
            entry["captions"].append(row["text"])
            entry["sources"].append(row["source"])
    collection = [{"image": path, "style": COLLECTION_STYLE, **entry} for path, entry in images.items()]
    summary: dict[str, Any] = {"images": len(collection), "pairs": sum(len(e["captions"]) for e in images.values())}
    for source in ("human", "web", "synthetic"):
        rows = [r for r in provenance if r["source"] == source]
        kept = [r for r in rows if r["kept"]]
        summary[source] = {
            "pairs": len(rows), "kept": len(kept), "kept_share": len(kept) / len(rows) if rows else None,
            "skipped": sum("skipped" in r for r in rows),
            "examples_kept": _examples(kept), "examples_dropped": _examples([r for r in rows if not r["kept"] and "skipped" not in r]),
        }
    write_rows(out / "provenance.jsonl", provenance)
    write_rows(out / "collection.jsonl", collection)
    plot_itm_scores(provenance, out / "itm_scores.png")
    io.write_json(out / "summary.json", summary)  # last: its presence marks a finished collection
    return summary


def plot_itm_scores(provenance: Sequence[dict[str, Any]], path: Path) -> None:
    """Histograms of the filter's ITM probability for web texts and synthetic captions, the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for source, colour in (("web", "tab:orange"), ("synthetic", "tab:blue")):
        scores = [r["itm_probability"] for r in provenance if r["source"] == source and "itm_probability" in r]
        if scores:
            ax.hist(scores, bins=20, range=(0, 1), alpha=0.55, color=colour, label=f"{source} ({len(scores)})")
    cut = next((r["threshold"] for r in provenance if "threshold" in r), None)
    if cut is not None:
        ax.axvline(cut, color="black", ls="--", lw=1, label=f"threshold {cut:g}")
    ax.set_xlabel("ITM match probability")
    ax.set_ylabel("texts")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

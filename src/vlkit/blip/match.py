"""`vlkit match`: how well each image-text pair of a table matches, by BLIP's two heads.

For every row (an image path and a text) two scores:

- `itm_probability`: softmax of the image-grounded encoder's ITM logits, the
  "match" column (BLIP's `itm_output.softmax(dim=1)[:, 1]`), with its two raw
  logits beside it;
- `itc_cosine`: cosine of the ITC image and text features (BLIP's
  `image_feat @ text_feat.t()`, no temperature).

Texts are cleaned and cut as in BLIP's retrieval evaluation (`pre_caption`, 30
words, at most 35 tokens). Each image is decoded once however many rows name
it; an image that cannot be read is skipped and listed with its reason, and its
rows are left out of the output.

    from vlkit.blip.match import match_table
    result = match_table("path/to/blip", "pairs.csv")
    result.rows[0]["itm_probability"], result.skipped
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from vlkit import io
from vlkit.errors import VlkitError

if TYPE_CHECKING:
    from vlkit.blip.checkpoint import LoadedBlip
    from vlkit.blip.model import BlipModel
    from vlkit.blip.tokenizer import BlipTokenizer
    from vlkit.models.base import ImagePreprocess, TextBatch

# BLIP's retrieval evaluation: pre_caption(caption, max_words=30), tokenizer max_length=35.
TEXT_MAX_WORDS = 30
TEXT_MAX_LENGTH = 35
TEXT_COLUMNS = ("text", "caption", "title")
OUTPUT_COLUMNS = ("path", "text", "itm_probability", "itm_logit_no", "itm_logit_yes", "itc_cosine")


@dataclass(frozen=True)
class Pair:
    """One row of the input table: an image path (resolved against the table's folder) and a text."""

    path: str
    text: str
    line: int


@dataclass
class MatchResult:
    """Scores of the usable rows (input order), the images that could not be read, and the time taken."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    pairs_skipped: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        probs = [r["itm_probability"] for r in self.rows]
        return {
            "pairs": len(self.rows),
            "pairs_skipped": self.pairs_skipped,
            "images_skipped": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "mean_itm_probability": sum(probs) / len(probs) if probs else None,
            "mean_itc_cosine": sum(r["itc_cosine"] for r in self.rows) / len(self.rows) if self.rows else None,
            "seconds": self.seconds,
            "pairs_per_s": len(self.rows) / self.seconds if self.seconds > 0 else None,
        }


def blip_texts(tokenizer: "BlipTokenizer", texts: Sequence[str]) -> "TextBatch":
    """Token ids of texts as BLIP's retrieval evaluation feeds them (pre_caption, 30 words, 35 tokens)."""
    from vlkit.blip.tokenizer import pre_caption

    return tokenizer([pre_caption(t, TEXT_MAX_WORDS) for t in texts], max_length=TEXT_MAX_LENGTH)


def table_columns(table: str | os.PathLike, image_column: str | None, text_column: str | None) -> tuple[str, str]:
    """The (image, text) column names of a CSV/JSONL table; a missing one is a VlkitError naming the columns present."""
    from vlkit.data.datasets import IMAGE_COLUMNS, read_table

    path = Path(table)
    if not path.exists():
        raise VlkitError(f"{path}: table does not exist; give a .csv or .jsonl table of image-text pairs")
    if not path.is_file():
        raise VlkitError(f"{path}: is not a file; give a .csv or .jsonl table of image-text pairs")
    rows, columns = read_table(path)
    if not rows:
        raise VlkitError(f"{path}: the table has no rows")
    picked = []
    for given, names, role, flag in ((image_column, IMAGE_COLUMNS, "image", "--image-column"), (text_column, TEXT_COLUMNS, "text", "--text-column")):
        if given is not None:
            if given not in columns:
                raise VlkitError(f"{path}: no column {given!r} ({flag}); columns present: {', '.join(columns)}")
            picked.append(given)
            continue
        found = next((c for c in names if c in columns), None)
        if found is None:
            raise VlkitError(f"{path}: no {role} column (tried {', '.join(names)}); columns present: {', '.join(columns)}; pass {flag}")
        picked.append(found)
    return picked[0], picked[1]


def read_pairs(table: str | os.PathLike, image_column: str | None = None, text_column: str | None = None) -> list[Pair]:
    """Image-text pairs of a CSV/JSONL table; a list-valued text cell gives one pair per text."""
    from vlkit.data.datasets import read_table

    path = Path(table)
    img_col, txt_col = table_columns(path, image_column, text_column)
    base = path.resolve().parent
    pairs = []
    for line, row in read_table(path)[0]:
        value = row.get(img_col)
        if value is None or not str(value).strip():
            raise VlkitError(f"{path}:{line}: empty {img_col!r}; every row needs an image path")
        p = Path(str(value).strip()).expanduser()
        image = os.path.normpath(str(p if p.is_absolute() else base / p))
        cell = row.get(txt_col)
        texts = [str(t) for t in (cell if isinstance(cell, list) else [cell]) if t is not None and str(t).strip()]
        if not texts:
            raise VlkitError(f"{path}:{line}: empty {txt_col!r}; every row needs a text")
        pairs.extend(Pair(image, t, line) for t in texts)
    return pairs


@torch.no_grad()
def match_pairs(
    blip: "BlipModel",
    tokenizer: "BlipTokenizer",
    preprocess: "ImagePreprocess",
    pairs: Sequence[Pair],
    *,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = False,
) -> MatchResult:
    """ITM probability and ITC cosine of every pair whose image can be read, in input order."""
    from vlkit.blip.captioning import pixel_batches, progress_bar
    from vlkit.blip.rerank import itm_logits_batched

    if batch_size < 1:
        raise VlkitError(f"--batch-size {batch_size}: must be at least 1")
    start = time.perf_counter()
    device = next(blip.parameters()).device
    images: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        images.setdefault(pair.path, []).append(i)
    paths = list(images)
    texts = blip_texts(tokenizer, [p.text for p in pairs])
    results: list[dict[str, Any] | None] = [None] * len(pairs)
    skipped: list[tuple[str, str]] = []
    seen = 0
    with progress_bar(progress, len(paths), "matching") as advance:
        for batch in pixel_batches(paths, preprocess, batch_size, skipped, num_workers=num_workers):
            embeds = blip.image_embeds(batch.pixels.to(device))
            feats = blip.image_feat(embeds)
            rows = [(k, j) for k, i in enumerate(batch.index) for j in images[paths[i]]]
            which = torch.tensor([k for k, _ in rows])
            idx = torch.tensor([j for _, j in rows])
            ids, mask = texts.input_ids[idx], texts.attention_mask[idx]
            logits = itm_logits_batched(blip, embeds[which], ids, mask, batch_size)
            probs = logits.softmax(dim=-1)[:, 1]
            cos = []
            for s in range(0, len(rows), batch_size):
                sl = slice(s, s + batch_size)
                cos.append((blip.text_feat(ids[sl].to(device), mask[sl].to(device)) * feats[which[sl]]).sum(-1).float().cpu())
            cosine = torch.cat(cos)
            for r, j in enumerate(idx.tolist()):
                results[j] = {
                    "path": pairs[j].path,
                    "text": pairs[j].text,
                    "itm_probability": float(probs[r]),
                    "itm_logit_no": float(logits[r, 0]),
                    "itm_logit_yes": float(logits[r, 1]),
                    "itc_cosine": float(cosine[r]),
                }
            advance(len(batch.index) + len(skipped) - seen)
            seen = len(skipped)
    bad = {p for p, _ in skipped}
    rows_out = [r for r in results if r is not None]
    return MatchResult(rows_out, skipped, sum(len(images[p]) for p in bad), time.perf_counter() - start)


def write_matches(run_dir: str | os.PathLike, result: MatchResult) -> tuple[Path, Path]:
    """matches.csv and matches.jsonl (same rows, same columns), each written atomically."""
    run = Path(run_dir)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(OUTPUT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    io.write_text(run / "matches.csv", buf.getvalue())
    io.write_text(run / "matches.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows))
    return run / "matches.csv", run / "matches.jsonl"


def match_table(
    model: "LoadedBlip | str",
    table: str | os.PathLike,
    image_column: str | None = None,
    text_column: str | None = None,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> MatchResult:
    """`vlkit match` in Python: every row of a CSV/JSONL table scored by a BLIP model (loaded, or a spec)."""
    pairs = read_pairs(table, image_column, text_column)
    if isinstance(model, str):
        from vlkit.blip.checkpoint import load_blip

        model = load_blip(model)
    return match_pairs(model.model, model.tokenizer, model.preprocess, pairs, batch_size=batch_size, progress=progress)

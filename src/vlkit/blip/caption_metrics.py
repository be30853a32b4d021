"""Caption metrics as the COCO caption evaluation computes them, offline.

BLEU-1..4, ROUGE-L and CIDEr come from `pycocoevalcap`'s own scorers, called
directly (not `COCOEvalCap.evaluate()`, which would also try SPICE). Two parts
of that toolkit need Java: the Stanford PTB tokenizer that every score is
computed on, and METEOR. With Java present vlkit runs both; without it the
captions are tokenised by `python_ptb_tokenize`, a pure-Python mirror of what
the PTB tokenizer plus pycocoevalcap's punctuation filter produce on ordinary
captions, and METEOR is left out with a note. SPICE downloads Stanford CoreNLP
models on first use, so it never runs here. `metrics.json` says which of these
ran.

    from vlkit.blip.caption_metrics import score_captions
    result = score_captions({"a.png": "a dog"}, {"a.png": ["a dog", "a brown dog"]})
    result.scores["CIDEr"], result.tokenizer
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from vlkit.errors import VlkitError

TokenizerChoice = Literal["auto", "ptb", "python"]
MeteorChoice = Literal["auto", "on", "off"]

# The scores in the order COCO's caption evaluation reports them.
SCORE_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE_NOTE = "SPICE not computed: it downloads Stanford CoreNLP models on first use, which cannot happen offline"


# ---------------------------------------------------------------- Java


def java_available() -> bool:
    """True when a `java` that runs is on PATH (the PTB tokenizer and METEOR need it)."""
    exe = shutil.which("java")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _package_dir(sub: str) -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__))) / sub


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise VlkitError(
            "caption metrics need pycocoevalcap, which is not installed; install vlkit's 'caption' extra "
            "(pip install 'vlkit[caption]') or pycocoevalcap itself"
        ) from None


def java_ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Tokenise with the Stanford PTB tokenizer bundled in pycocoevalcap, then drop its punctuation tokens.

    Same jar, flags and punctuation list as `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`, but the
    sentences go through a temporary file outside the installed package (pycocoevalcap writes one into
    its own folder, which fails on a read-only install).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    if not sentences:
        return []
    jar = _package_dir("tokenizer") / STANFORD_CORENLP_3_4_1_JAR
    lines = [s.replace("\r", " ").replace("\n", " ") for s in sentences]
    with tempfile.TemporaryDirectory(prefix="vlkit-ptb-") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_text("\n".join(lines), encoding="utf-8")
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(src)]
        proc = subprocess.run(cmd, capture_output=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-300:]}")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    punct = set(PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in out[: len(lines)]]


# ---------------------------------------------------------------- pure-Python PTB mirror

# pycocoevalcap's PUNCTUATIONS list, compared after the tokenizer lower-cased every token: its
# "-LRB-" style entries never match the lower-cased "-lrb-" tokens, so brackets survive (as they do
# in every published COCO score).
_DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITIC = re.compile(r"^(.+?)(n['’]t|['’]s|['’]re|['’]ve|['’]ll|['’]d|['’]m)$")
# Abbreviations the PTB lexer keeps with their period (a subset of its list that captions use).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr mt ft vs etc inc ltd co corp no jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_TOKEN = re.compile(
    r"""
    (?P<number>\d+(?:[.,:]\d+)+)
  | (?P<word>[^\W_](?:[^\W_]|[-'’/&.@](?=[^\W_]))*)
  | (?P<ellipsis>\.\.\.|…)
  | (?P<dash>--+|[–—])
  | (?P<marks>[!?]+)
  | (?P<other>\S)
    """,
    re.VERBOSE,
)


def _split_word(word: str) -> list[str]:
    """Split a clitic off a word as PTB does ("dog's" -> "dog 's", "can't" -> "ca n't")."""
    m = _CLITIC.match(word)
    if m and m.group(1)[-1:].isalpha():
        return [m.group(1), m.group(2).replace("’", "'")]
    return [word]


def python_ptb_tokenize_one(sentence: str) -> str:
    """One caption as `java_ptb_tokenize` gives it, for ordinary English captions.

    Lower-cases, splits punctuation, quotes and clitics off words as the PTB lexer does, keeps
    hyphenated words, numbers with separators and known abbreviations whole, maps brackets to
    -lrb-/-rrb-..., drops symbols the lexer cannot tokenise (emoji), then removes the tokens
    pycocoevalcap's punctuation list removes.
    """
    text = unicodedata.normalize("NFC", sentence).replace("“", '"').replace("”", "''")
    tokens: list[str] = []
    for m in _TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group()
        if kind == "word":
            low = tok.lower()
            nxt = text[m.end() : m.end() + 1]
            abbrev = nxt == "." and (low in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)*[a-z]", low))
            if abbrev:
                tokens.append(low + ".")
                continue
            tokens.extend(_split_word(low))
        elif kind == "number":
            tokens.append(tok)
        elif kind == "ellipsis":
            tokens.append("...")
        elif kind == "dash":
            tokens.append("--")
        elif kind == "marks":
            tokens.append(tok)
        elif tok == '"':
            start = m.start() == 0 or text[m.start() - 1].isspace() or text[m.start() - 1] in "([{"
            tokens.append("``" if start else "''")
        elif tok in _BRACKETS:
            tokens.append(_BRACKETS[tok])
        elif tok == "." and tokens and tokens[-1].endswith(".") and len(tokens[-1]) > 1:
            continue  # the period that ended an abbreviation already sits on it
        elif tok in "'’":
            tokens.append("'")
        elif tok == "‘":
            tokens.append("`")
        elif ord(tok) > 0xFFFF or unicodedata.category(tok)[0] in "MC":
            continue  # emoji outside the BMP, variation selectors, combining marks: the lexer drops them
        else:
            tokens.append(tok)
    return " ".join(t for t in tokens if t not in _DROPPED)


def python_ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    return [python_ptb_tokenize_one(s) for s in sentences]


# ---------------------------------------------------------------- scoring


@dataclass
class CaptionScores:
    """Corpus scores (pycocoevalcap's scale: fractions, CIDEr around 0-10), per-image scores, and what ran."""

    scores: dict[str, float | None]
    per_image: dict[str, dict[str, float]]
    tokenizer: str  # "ptb" (Java) or "python" (the mirror)
    tokenizer_detail: str
    meteor: str
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.per_image)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "images": self.images,
            "tokenizer": self.tokenizer,
            "tokenizer_detail": self.tokenizer_detail,
            "meteor": self.meteor,
            "notes": self.notes,
        }


def _choose_tokenizer(choice: str, java: bool) -> str:
    if choice not in ("auto", "ptb", "python"):
        raise VlkitError(f"tokenizer {choice!r}: unknown; use auto, ptb or python")
    if choice == "ptb" and not java:
        raise VlkitError("tokenizer 'ptb': needs Java (the Stanford PTB tokenizer is a jar) and no working `java` is on PATH; install a JRE or use --tokenizer python")
    return "ptb" if choice == "ptb" or (choice == "auto" and java) else "python"


def _check_meteor(choice: str, java: bool) -> bool:
    if choice not in ("auto", "on", "off"):
        raise VlkitError(f"meteor {choice!r}: unknown; use auto, on or off")
    if choice == "on" and not java:
        raise VlkitError("METEOR: needs Java (meteor-1.5.jar) and no working `java` is on PATH; install a JRE or use --meteor off")
    return choice == "on" or (choice == "auto" and java)


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    """METEOR 1.5 through pycocoevalcap's wrapper (one Java process, closed afterwards)."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    finally:
        scorer.__del__()  # the wrapper stops its Java process only when collected; stop it now (a second call is a no-op)
        scorer.meteor_p.stdout.close()
        scorer.meteor_p.stderr.close()
    return float(score), [float(s) for s in scores]


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    tokenizer: TokenizerChoice = "auto",
    meteor: MeteorChoice = "auto",
) -> CaptionScores:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one predicted caption per key against its references.

    `predictions` and `references` must have the same keys (image ids or paths). CIDEr's
    idf weights come from the references of this corpus, so it needs many images to mean
    anything (on one image every idf is 0 and CIDEr is 0).
    """
    _require_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise VlkitError("caption metrics: no predictions to score")
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        raise VlkitError(
            f"caption metrics: predictions and references cover different images ({len(missing)} predictions without "
            f"references, e.g. {missing[:1]}; {len(extra)} references without a prediction, e.g. {extra[:1]})"
        )
    empty = [k for k, refs in references.items() if not [r for r in refs if str(r).strip()]]
    if empty:
        raise VlkitError(f"caption metrics: {len(empty)} images have no reference caption, e.g. {empty[0]!r}")
    java = java_available() if tokenizer != "python" or meteor != "off" else False
    tok_kind = _choose_tokenizer(tokenizer, java)
    run_meteor = _check_meteor(meteor, java)

    keys = list(predictions)
    sentences = [str(predictions[k]) for k in keys]
    ref_counts = [len(references[k]) for k in keys]
    sentences += [str(r) for k in keys for r in references[k]]
    tokenized = java_ptb_tokenize(sentences) if tok_kind == "ptb" else python_ptb_tokenize(sentences)
    res = {k: [tokenized[i]] for i, k in enumerate(keys)}
    gts: dict[str, list[str]] = {}
    pos = len(keys)
    for k, n in zip(keys, ref_counts):
        gts[k] = tokenized[pos : pos + n]
        pos += n

    scores: dict[str, float | None] = {}
    per: dict[str, dict[str, float]] = {k: {} for k in keys}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        scores[f"BLEU-{n + 1}"] = float(bleu[n])
        for k, s in zip(keys, bleu_each[n]):
            per[k][f"BLEU-{n + 1}"] = float(s)
    notes = []
    if run_meteor:
        scores["METEOR"], each = _meteor(gts, res)
        for k, s in zip(keys, each):
            per[k]["METEOR"] = s
        meteor_state = "computed (METEOR 1.5, Java)"
    else:
        scores["METEOR"] = None
        meteor_state = "not computed: " + ("turned off (--meteor off)" if meteor == "off" else "needs Java and no working `java` is on PATH")
        notes.append(f"METEOR {meteor_state}")
    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        value, each = scorer.compute_score(gts, res)
        scores[name] = float(value)
        for k, s in zip(keys, each):
            per[k][name] = float(s)
    notes.append(SPICE_NOTE)
    tok_desc = (
        "ptb: Stanford PTBTokenizer (CoreNLP 3.4.1, pycocoevalcap's jar, Java) + pycocoevalcap's punctuation filter"
        if tok_kind == "ptb"
        else "python: vlkit's pure-Python mirror of the PTB tokenizer + pycocoevalcap's punctuation filter"
        + ("" if tokenizer == "python" else " (Java not found)")
    )
    ordered = {name: scores[name] for name in SCORE_NAMES}
    return CaptionScores(ordered, per, tok_kind, tok_desc, meteor_state, notes)


# ---------------------------------------------------------------- files


@dataclass
class CaptionFileEval:
    """Scores of a predictions file against a references table, and the images left out on either side."""

    result: CaptionScores
    predictions_without_refs: list[str]
    refs_without_prediction: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.result.to_dict(),
            "predictions_without_references": len(self.predictions_without_refs),
            "references_without_prediction": len(self.refs_without_prediction),
            "unmatched_examples": {
                "predictions": self.predictions_without_refs[:10],
                "references": self.refs_without_prediction[:10],
            },
        }


def _pick_column(path: Path, columns: list[str], given: str | None, candidates: Sequence[str], role: str, option: str) -> str:
    if given is not None:
        if given not in columns:
            raise VlkitError(f"{path}: no column {given!r} ({role}); columns present: {', '.join(columns)}")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise VlkitError(f"{path}: no {role} column (tried {', '.join(candidates)}); columns present: {', '.join(columns)}; pass {option}")
    return found


def _read_keyed(
    path: Path,
    image_column: str | None,
    text_column: str | None,
    text_candidates: Sequence[str],
    what: str,
    opts: tuple[str, str],
    unique: bool,
) -> dict[str, list[str]]:
    """{resolved image path: [texts]} from a CSV/JSONL table; relative paths are relative to the table's folder."""
    from vlkit.data.datasets import IMAGE_COLUMNS, read_table

    if not path.is_file():
        raise VlkitError(f"{path}: {what} file does not exist; check the path")
    rows, columns = read_table(path)
    if not rows:
        raise VlkitError(f"{path}: the {what} table has no rows")
    img_col = _pick_column(path, columns, image_column, IMAGE_COLUMNS, "image", opts[0])
    txt_col = _pick_column(path, columns, text_column, text_candidates, "caption", opts[1])
    base = path.resolve().parent
    out: dict[str, list[str]] = {}
    for line, row in rows:
        value = row.get(img_col)
        if value is None or not str(value).strip():
            raise VlkitError(f"{path}:{line}: empty {img_col!r}; every row needs an image path")
        p = Path(str(value).strip()).expanduser()
        key = os.path.normpath(str(p if p.is_absolute() else base / p))
        texts = row.get(txt_col)
        texts = [str(t) for t in (texts if isinstance(texts, list) else [texts]) if t is not None and str(t).strip()]
        if not texts:
            raise VlkitError(f"{path}:{line}: empty {txt_col!r}; every row needs a caption")
        if unique and key in out:
            raise VlkitError(f"{path}:{line}: a second row for image {value!r}; give one prediction row per image")
        out.setdefault(key, []).extend(texts)  # references are kept as given, duplicates included (as COCO does)
    return out


def evaluate_caption_files(
    predictions: str | os.PathLike,
    references: str | os.PathLike,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    pred_image_column: str | None = None,
    pred_caption_column: str | None = None,
    tokenizer: TokenizerChoice = "auto",
    meteor: MeteorChoice = "auto",
) -> CaptionFileEval:
    """Score a predictions table (e.g. `vlkit caption`'s captions.jsonl) against a references table.

    Both are CSV/JSONL with an image-path column and a caption column (a string or a list;
    several reference rows per image are merged; a prediction row with several captions
    is scored on its first, the best beam). Images are matched by path, each resolved
    against its own table's folder. Images on only one side are left out and counted.
    """
    pred_path, ref_path = Path(predictions), Path(references)
    preds = _read_keyed(pred_path, pred_image_column, pred_caption_column, ("caption", "captions", "text"), "predictions", ("--pred-image-column", "--pred-caption-column"), True)
    refs = _read_keyed(ref_path, image_column, caption_column, ("caption", "captions", "text", "references"), "references", ("--image-column", "--caption-column"), False)
    common = [k for k in preds if k in refs]
    if not common:
        raise VlkitError(
            f"{pred_path}: none of its {len(preds)} images is in {ref_path} (e.g. {next(iter(preds))} vs "
            f"{next(iter(refs))}); paths are matched after resolving each against its own table's folder"
        )
    result = score_captions({k: preds[k][0] for k in common}, {k: refs[k] for k in common}, tokenizer=tokenizer, meteor=meteor)
    return CaptionFileEval(result, [k for k in preds if k not in refs], [k for k in refs if k not in preds])

"""CapFilt on real web noise: Openclipart's file-name captions, with the emoji names as the human pairs.

Human-annotated: every image of the training emoji styles (twitter, google, openmoji) with its describing
caption ("an emoji of <name>."). Web: the clipart-category train split with Openclipart's file-name
captions ("2 dead frogs lumen desig 01": author names, numbering, other languages). Then
`vlkit capfilt run` with the given captioner and filter (nucleus sampling, threshold 0.5) writes the
bootstrapped collection; this script writes the two input tables and a report of the summary (kept
shares, examples) and the time per 1,000 web images.

    PYTHONPATH=src python bench/capfilt_openclipart.py --model vlkit-blip-tiny --out bench/out/capfilt-openclipart
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vlkit-blip-tiny", help="captioner and filter, unless --captioner / --filter name others")
    ap.add_argument("--captioner", default=None, help="e.g. <capfilt folder>/captioner/model from `vlkit capfilt finetune`")
    ap.add_argument("--filter", default=None, help="e.g. <capfilt folder>/filter/model from `vlkit capfilt finetune`")
    ap.add_argument("--data-dir", default=os.environ.get("VLKIT_DATA", "~/.cache/vlkit/data"))
    ap.add_argument("--out", default="bench/out/capfilt-openclipart")
    ap.add_argument("--report", default="bench/results/capfilt-openclipart")
    args = ap.parse_args()

    from vlkit.data.tasks import load_task
    from vlkit.pretrain.data import describing_captions
    from vlkit.zeroshot import task_images

    data = Path(args.data_dir).expanduser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emoji = data / "built" / "emoji" / "metadata.jsonl"
    human = []
    for line in emoji.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        caps = describing_captions(row)
        if row.get("style") in ("twitter", "google", "openmoji") and caps:
            human.append({"image": str(emoji.parent / row["image"]), "caption": caps[0]})
    clip = data / "built" / "openclipart" / "metadata.jsonl"
    train = {str(Path(p).resolve()) for p in task_images(load_task("clipart-category", data_dir=data), "train").paths}
    web = []
    for line in clip.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        path = str((clip.parent / row["image"]).resolve())
        if path in train and str(row.get("caption") or "").strip():
            web.append({"image": path, "caption": row["caption"]})
    for name, rows in (("human", human), ("web", web)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    captioner, filt = args.captioner or args.model, args.filter or args.model
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "vlkit.cli", "capfilt", "run", "--human", str(out / "human.jsonl"), "--web", str(out / "web.jsonl"),
           "--captioner", captioner, "--filter", filt, "--out", str(out / "capfilt"), "--no-progress"]
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    summary = json.loads((out / "capfilt" / "summary.json").read_text())
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    record = {"captioner": captioner, "filter": filt, "human_pairs": len(human), "web_pairs": len(web), "seconds": round(seconds, 1),
              "s_per_1000_web_images": round(1000 * seconds / len(web), 1), "command": " ".join(cmd[1:]), "summary": summary}
    (report / "capfilt.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    lines = [f"Human: {len(human)} emoji names; web: {len(web)} Openclipart file-name captions; captioner {captioner}, filter {filt}; "
             f"{seconds:.0f} s in all ({record['s_per_1000_web_images']} s per 1,000 web images, caption + filter + write).", "",
             "| source | pairs | kept | kept share |", "|---|---|---|---|"]
    for source in ("human", "web", "synthetic"):
        s = summary[source]
        lines.append(f"| {source} | {s['pairs']} | {s['kept']} | {100 * s['kept_share']:.1f}% |")
    lines += ["", "Examples (ITM probability):", ""]
    for source in ("web", "synthetic"):
        for what in ("kept", "dropped"):
            for e in summary[source][f"examples_{what}"]:
                lines.append(f"- {source}, {what}: \"{e['text']}\" ({e.get('itm_probability', 0):.3f}) for {Path(e['path']).name}")
    (report / "capfilt.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

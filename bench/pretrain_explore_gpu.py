"""Recipe exploration for vlkit-tiny on a lent GPU (not needed to reproduce the shipped model).

Trains image-tower variants on the packed pretraining pairs of the twitter and
google emoji styles plus the clip-art train split, holding out the openmoji style,
and scores zero-shot on the validation splits only (openmoji for the emoji tasks,
clip-art val): the Facebook style and every test split stay untouched. The pack
(`runs/explore-pack/pack.npz`, WebP thumbnails and int8 pooled all-MiniLM-L6-v2
embeddings of every caption and prompt) is written from the same `load_pairs`
the trainer uses. Writes JSON lines to $OUT/explore.jsonl (or bench/out/).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.pretrain import augment
from vlkit.pretrain.losses import clamp_logit_scale_, clip_loss
from vlkit.pretrain.model import DualEncoder, tower_width


def decode(buf: np.ndarray, lens: np.ndarray, size: int) -> torch.Tensor:
    out = torch.empty(len(lens), 3, size, size, dtype=torch.uint8)
    off = 0
    for i, n in enumerate(lens):
        im = Image.open(io.BytesIO(buf[off : off + n].tobytes())).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        off += n
    return out


def deq(q: np.ndarray, s: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(q.astype(np.float32) * s[:, None])


@torch.no_grad()
def encode_texts(folder: str, texts: dict, dev: str) -> dict:
    """Mean-pooled all-MiniLM-L6-v2 outputs (weights carried as fp16, run in fp32) for every text list."""
    from transformers import AutoModel, AutoTokenizer

    from safetensors.torch import load_file
    from transformers import AutoConfig

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder), add_pooling_layer=False)
    sd = {k: v.float() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    ids, rows = sd.pop("pruned.word_ids").long(), sd.pop("pruned.word_rows")
    if ids.numel():  # the pack keeps only the word-embedding rows its texts use
        words = torch.zeros(model.config.vocab_size, rows.shape[1])
        words[ids] = rows
        sd["embeddings.word_embeddings.weight"] = words
    model.load_state_dict(sd, strict=False)
    model = model.to(dev).eval()
    out = {}
    for key, items in texts.items():
        parts = []
        for i in range(0, len(items), 1024):
            enc = tok(items[i : i + 1024], padding=True, truncation=True, max_length=32, return_tensors="pt").to(dev)
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            parts.append((h * m).sum(1) / m.sum(1).clamp_min(1e-9))
        out[key] = torch.cat(parts)
    return out


def tower(kind: str):
    from transformers import AutoConfig, AutoModel

    presets = {
        "resnet-s": ("resnet", dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic")),
        "resnet-m": ("resnet", dict(embedding_size=48, hidden_sizes=[48, 96, 192, 384], depths=[1, 1, 1, 1], layer_type="basic")),
        "resnet-xs": ("resnet", dict(embedding_size=24, hidden_sizes=[24, 48, 96, 192], depths=[1, 1, 1, 1], layer_type="basic")),
        "resnet-s2": ("resnet", dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="basic")),
        "convnext-s": ("convnext", dict(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1])),
        "vit-s": ("vit", dict(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)),
    }
    mt, cfg = presets[kind]
    return AutoModel.from_config(AutoConfig.for_model(mt, **cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="runs/explore-pack/pack.npz")
    ap.add_argument("--variants", default="resnet-s:64:30:2e-3")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--holdout", default="openmoji")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "bench/out")
    os.makedirs(out_dir, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    z = np.load(args.pack)
    texts = json.load(open(os.path.join(os.path.dirname(args.pack), "texts.json"), encoding="utf-8"))
    pooled = encode_texts(os.path.join(os.path.dirname(args.pack), "minilm"), texts, dev)
    styles = z["train_style"]
    keep = np.flatnonzero(styles != args.holdout)
    cap_off = np.concatenate([[0], np.cumsum(z["cap_len"])])
    cap_ids = z["cap_ids"]
    cap_emb = pooled["captions"]
    flip = torch.from_numpy(z["train_flip"]).to(dev)
    tasks = ["emoji_label", "emoji_group", "emoji_subgroup", "clipart_category"]
    raw = {}
    for variant in args.variants.split(","):
        kind, size, epochs, lr, *extra = variant.split(":")
        jitter = float(extra[0]) if extra else 0.0
        size, epochs, lr = int(size), int(epochs), float(lr)
        if size not in raw:
            raw[size] = {"train": decode(z["train_img"], z["train_img_len"], size).to(dev)}
            for t in tasks:
                raw[size][t] = raw[size]["train"][torch.from_numpy(z[f"{t}_rows"]).to(dev)] if f"{t}_rows" in z else decode(z[f"{t}_img"], z[f"{t}_img_len"], size).to(dev)
        imgs = raw[size]
        torch.manual_seed(0)
        tw = tower(kind)
        model = DualEncoder(tw, tower_width(tw, "pooler", size), torch.nn.Identity(), 384, 256).to(dev)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
        steps_per_epoch = len(keep) // args.batch
        total = epochs * steps_per_epoch
        warm = 100
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1, (s - warm) / max(1, total - warm))))
        )
        g = torch.Generator().manual_seed(0)
        t0 = time.time()
        model.train()
        for ep in range(epochs):
            order = keep[torch.randperm(len(keep), generator=g).numpy()]
            for st in range(steps_per_epoch):
                rows = order[st * args.batch : (st + 1) * args.batch]
                u = torch.rand(len(rows), generator=g).numpy()
                cid = [cap_ids[cap_off[r] + min(int(u[j] * z["cap_len"][r]), z["cap_len"][r] - 1)] for j, r in enumerate(rows)]
                params = augment.draw_params(len(rows), g, (0.6, 1.0), (0.8, 1.25), True)
                rows_t = torch.from_numpy(rows).to(dev)
                x01 = imgs["train"][rows_t].float() / 255.0
                if jitter:
                    x01 = augment.apply_color(x01, augment.draw_color(len(rows), g, jitter))
                px = augment.apply(augment.normalize(x01, [0.5] * 3, [0.5] * 3), params, flip[rows_t])
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                    img, txt, scale = model(px, cap_emb[torch.tensor(cid, device=dev)])
                loss = clip_loss(img.float(), txt.float(), scale.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                clamp_logit_scale_(model.log_logit_scale)
        train_s = time.time() - t0
        model.eval()
        res = {"variant": variant, "holdout": args.holdout, "train_rows": int(len(keep)), "steps": total, "train_s": round(train_s, 1), "final_loss": float(loss), "logit_scale": float(model.logit_scale.detach())}
        with torch.no_grad():
            for t in tasks:
                if args.holdout != "openmoji" and t.startswith("emoji"):
                    # score the held-out training style (e.g. google) with the task's own labels
                    sel = styles[z[f"{t}_train_rows"]] == args.holdout
                    rows_h = torch.from_numpy(z[f"{t}_train_rows"][sel]).to(dev)
                    feats_src, labels_src = imgs["train"][rows_h], z[f"{t}_train_labels"][sel]
                else:
                    feats_src, labels_src = imgs[t], z[f"{t}_labels"]
                nt = int(z[f"{t}_ntemplates"])
                w = model.encode_text(pooled[t]).float()
                w = F.normalize(w.view(-1, nt, w.shape[-1]).mean(1), dim=-1)
                f = torch.cat([model.encode_image(augment.normalize(feats_src[i : i + 1024], [0.5] * 3, [0.5] * 3)).float() for i in range(0, len(feats_src), 1024)])
                y = torch.from_numpy(labels_src).to(dev)
                top5 = (f @ w.t()).topk(5, dim=1).indices
                res[t] = {"top1": round(float((top5[:, 0] == y).float().mean()), 4), "top5": round(float((top5 == y[:, None]).any(1).float().mean()), 4)}
        print(json.dumps(res), flush=True)
        with open(os.path.join(out_dir, "explore.jsonl"), "a") as fh:
            fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

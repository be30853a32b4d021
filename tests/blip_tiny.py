"""Tiny random BLIP checkpoints in transformers' formats, built by the BLIP tests themselves.

`tiny_hf_blip(seed)` returns a `BlipForImageTextRetrieval` and a
`BlipForConditionalGeneration` that are the two halves of one BLIP model: the
same vision tower, and a decoder whose embeddings, cross-attention and
feed-forward blocks are copies of the retrieval text encoder's (BLIP's tie),
with its own self-attention and LM head. Every parameter is perturbed with
noise, so no LayerNorm is identity and no bias is zero: a parity test then sees
every tensor. Full BERT vocabulary (30524 with [DEC]/[ENC]) so the real
BLIP tokenizer applies; width 32, 2 layers, 32 px images in 16 px patches.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32


def tiny_configs(max_positions: int = 64, width: int = 32, heads: int = 2):
    """Vision and text configs; `width=64, heads=1` gives BLIP's 64-wide heads (what a .pth's shapes imply)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=heads,
        image_size=IMAGE_SIZE, patch_size=16, layer_norm_eps=1e-6, initializer_range=0.02,
    )
    text = BlipTextConfig(
        vocab_size=30524, hidden_size=width, encoder_hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=max_positions,
    )
    return vision, text


def _noise(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@torch.no_grad()
def tiny_hf_blip(seed: int = 0, embed_dim: int = 16, noise: float = 0.05):
    """(retrieval, captioning): random halves of one tiny BLIP model, in eval mode."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    vision, text = tiny_configs()
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=embed_dim)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ret = BlipForImageTextRetrieval(config).eval()
    _noise(ret, gen, noise)
    cap = BlipForConditionalGeneration(config).eval()
    _noise(cap, gen, noise)
    cap.vision_model.load_state_dict(ret.vision_model.state_dict())
    dec = cap.text_decoder.bert.state_dict()
    for name, value in ret.text_encoder.state_dict().items():
        if ".attention." not in f".{name}":  # BLIP ties everything but self-attention
            dec[name] = value.clone()
    cap.text_decoder.bert.load_state_dict(dec)
    cap.text_decoder.cls.predictions.bias.add_(torch.randn(text.vocab_size, generator=gen))
    return ret, cap


def vlkit_from_hf(ret, cap):
    """The two halves' weights loaded into one vlkit BlipModel (the decoder's tied names come from the encoder)."""
    from vlkit.blip.model import BlipModel

    model = BlipModel(ret.config.vision_config, ret.config.text_config, ret.config.image_text_hidden_size)
    missing, unexpected = model.load_state_dict({**cap.state_dict(), **ret.state_dict()}, strict=False)
    assert missing == ["temp"] and unexpected == []
    return model.eval()


def tiny_blip_model(seed: int = 0, width: int = 32, heads: int = 2, embed_dim: int = 16):
    """A vlkit BlipModel with BLIP's random init, its biases and LayerNorms perturbed (no identities)."""
    from vlkit.blip.model import BlipModel

    vision, text = tiny_configs(width=width, heads=heads)
    torch.manual_seed(seed)
    model = BlipModel.from_config(vision, text, embed_dim)
    _noise(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.temp.fill_(0.0625)  # a learned-looking temperature, not the init value
    return model.eval()


def save_tiny_hf_blip(folder: Path, seed: int = 0, image_mean=None, image_std=None) -> tuple[Path, Path]:
    """Save both halves with the BLIP tokenizer and image processor: folder/retrieval, folder/captioning."""
    from transformers import BlipImageProcessorPil

    from vlkit.blip.tokenizer import BlipTokenizer

    ret, cap = tiny_hf_blip(seed)
    tok = BlipTokenizer.from_minilm()
    extra = {}
    if image_mean is not None:
        extra = {"image_mean": list(image_mean), "image_std": list(image_std)}
    out = []
    for name, model in (("retrieval", ret), ("captioning", cap)):
        path = folder / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **extra).save_pretrained(path)
        out.append(path)
    return out[0], out[1]


def pixels(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))

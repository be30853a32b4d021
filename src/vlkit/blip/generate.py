"""Captioning with BLIP's decoding settings, on transformers' `generate`.

BLIP's settings (`models/blip.py: BLIP_Decoder.generate`, `configs/caption_coco.yaml`):
beam search with 3 beams, `max_length` 20 and `min_length` 5 (both counting the
[DEC] token and the prompt, as transformers counts them), repetition penalty 1.0;
nucleus sampling (`sample=True`, used by CapFilt) with top-p 0.9, repetition
penalty 1.1 and transformers' default top-k 50 (BLIP passes no top-k, so its
transformers applied 50, as transformers 5 does). The decoder input is [DEC]
followed by the prompt's tokens ("a picture of " for BLIP's captioners), without
the prompt's [SEP]; [SEP] ends a caption. The prompt is stripped from the output
by dropping its tokens before decoding (BLIP cuts `len(prompt)` characters off
the decoded text: the same string, except where the first generated token is a
word piece or punctuation that the decoder would glue onto the prompt's last word).

Image tokens are computed once per image: the ViT runs once on the batch, and
its tokens go to `text_decoder.generate` un-expanded; transformers repeats them
for the beams itself. (Original BLIP expands them per beam before calling
`generate`; doing that on transformers 5 expands them twice: 9 copies for 3 beams.)

**Beam scores: vlkit follows transformers, not original BLIP's transformers 4.25.**
A finished beam's score is the sum of its generated tokens' log-probabilities
divided by the number of generated tokens (length_penalty 1). BLIP ran on
transformers 4.25, which divided by the length of the whole sequence including
[DEC] and the prompt. Without a prompt the two rules agree for beams that end
in [SEP] (the [DEC] token stands in for the [SEP] the old rule did not count);
with "a picture of " the old rule divides by three more tokens, favours longer
captions, and can pick another beam. vlkit keeps transformers' rule because then
its captions equal transformers' `BlipForConditionalGeneration.generate`
token for token on any Hugging Face BLIP checkpoint, because the old rule is an
artefact of that library version (it normalises by prompt tokens whose
log-probabilities are not in the sum), not a choice the BLIP paper makes, and
because following it would mean re-implementing beam search. Captions scored
against BLIP's published numbers with a prompt may therefore differ slightly.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Literal

import torch
from PIL import Image

from vlkit.blip.model import BlipModel
from vlkit.blip.tokenizer import BlipTokenizer
from vlkit.errors import VlkitError

Method = Literal["beam", "nucleus"]
BLIP_PROMPT = "a picture of "


@dataclass(frozen=True)
class CaptionSettings:
    """How to decode; the defaults are BLIP's beam search (use `NUCLEUS` for its sampling)."""

    method: Method = "beam"
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    prompt: str = ""
    seed: int = 0  # nucleus sampling only: one seeded stream per `caption` call
    num_return_sequences: int = 1  # captions per image: the K best beams (K <= num_beams), or K samples
    # "bf16": the vision tower and decoder under bfloat16 autocast (about 2x on CPUs with avx512_bf16;
    # a few captions change where beams were close); "fp32": exact, equal to transformers' generate
    precision: str = "fp32"

    def validate(self) -> "CaptionSettings":
        """One-line errors for settings transformers would reject later, or silently misread."""
        if self.method not in ("beam", "nucleus"):
            raise VlkitError(f"caption method {self.method!r}: use 'beam' or 'nucleus'")
        if self.num_beams < 1:
            raise VlkitError(f"num_beams {self.num_beams}: must be at least 1 (1 is greedy decoding)")
        if self.min_length < 0 or self.max_length < 2 or self.min_length > self.max_length:
            raise VlkitError(f"lengths min {self.min_length}, max {self.max_length}: need 0 <= min <= max and max >= 2")
        if not 0 < self.top_p <= 1:
            raise VlkitError(f"top_p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise VlkitError(f"top_k {self.top_k}: must be >= 0 (0 turns it off)")
        if self.num_return_sequences < 1:
            raise VlkitError(f"num_return_sequences {self.num_return_sequences}: must be at least 1")
        if self.method == "beam" and self.num_return_sequences > self.num_beams:
            raise VlkitError(
                f"num_return_sequences {self.num_return_sequences}: beam search returns at most num_beams ({self.num_beams}) captions per image"
            )
        if self.repetition_penalty <= 0:
            raise VlkitError(f"repetition_penalty {self.repetition_penalty}: must be > 0 (1.0 is none)")
        if self.precision not in ("fp32", "bf16"):
            raise VlkitError(f"precision {self.precision!r}: use 'fp32' or 'bf16'")
        return self

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The context the tower and decoder run in: bfloat16 autocast for "bf16", else nothing."""
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BEAM = CaptionSettings()
NUCLEUS = CaptionSettings(method="nucleus", num_beams=1, repetition_penalty=1.1)
GREEDY = CaptionSettings(num_beams=1)


@dataclass
class Generated:
    """Token ids [B*K, L] as transformers returns them ([DEC], prompt, caption, [SEP], pads), K = num_return_sequences
    rows per image, grouped by image (image i: rows i*K .. i*K+K-1; beams best first)."""

    sequences: torch.Tensor
    prompt_length: int
    scores: torch.Tensor | None = None  # beam search: each returned beam's final (length-normalised) score

    def caption_ids(self) -> list[list[int]]:
        return [row[self.prompt_length :].tolist() for row in self.sequences]


def prompt_ids(tokenizer: BlipTokenizer, prompt: str, dec_token_id: int) -> list[int]:
    """[DEC] + the prompt's tokens (BLIP: tokenize the prompt, [CLS] -> [DEC], drop the final [SEP])."""
    ids = tokenizer([prompt]).input_ids[0].tolist()
    return [dec_token_id] + ids[1:-1]


@torch.no_grad()
def generate(
    model: BlipModel,
    image_embeds: torch.Tensor,
    tokenizer: BlipTokenizer,
    settings: CaptionSettings = BEAM,
    *,
    image_atts: torch.Tensor | None = None,
    return_scores: bool = False,
) -> Generated:
    """Decode captions for a batch of image tokens [B, 1+N, Dv] with transformers' `generate`."""
    settings.validate()
    decoder = model._need_decoder("captioning")
    start = prompt_ids(tokenizer, settings.prompt, model.dec_token_id)
    if len(start) >= settings.max_length:
        raise VlkitError(f"prompt {settings.prompt!r}: {len(start)} tokens leave nothing to generate within max_length {settings.max_length}")
    batch = image_embeds.shape[0]
    device = image_embeds.device
    input_ids = torch.tensor([start] * batch, dtype=torch.long, device=device)
    if image_atts is None:
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        max_length=settings.max_length,
        min_length=settings.min_length,
        eos_token_id=model.sep_token_id,
        pad_token_id=model.pad_token_id,
        repetition_penalty=settings.repetition_penalty,
        num_return_sequences=settings.num_return_sequences,
        return_dict_in_generate=True,
        output_scores=return_scores,
    )
    if settings.method == "beam":
        kwargs.update(num_beams=settings.num_beams, do_sample=False)
        with settings.autocast(device):
            out = decoder.generate(**kwargs)
    else:
        kwargs.update(num_beams=1, do_sample=True, top_p=settings.top_p, top_k=settings.top_k)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), settings.autocast(device):
            torch.manual_seed(settings.seed)
            out = decoder.generate(**kwargs)
    scores = getattr(out, "sequences_scores", None) if return_scores else None
    return Generated(out.sequences, len(start), scores)


def decode(tokenizer: BlipTokenizer, generated: Generated) -> list[str]:
    """Caption strings: the tokens after the prompt, special tokens dropped."""
    return [tokenizer.decode(ids).strip() for ids in generated.caption_ids()]


@torch.no_grad()
def caption(
    model: BlipModel,
    tokenizer: BlipTokenizer,
    pixel_values: torch.Tensor,
    settings: CaptionSettings = BEAM,
) -> list[str]:
    """Captions for a batch of preprocessed images [B, 3, H, W] (the ViT runs once on the batch);
    B*K strings with K = `num_return_sequences`, grouped by image."""
    settings.validate()
    model._need_decoder("captioning")
    with settings.autocast(pixel_values.device):
        embeds = model.image_embeds(pixel_values)
    return decode(tokenizer, generate(model, embeds, tokenizer, settings))


@torch.no_grad()
def caption_images(
    loaded: Any,
    images: Iterable[Image.Image],
    settings: CaptionSettings = BEAM,
    batch_size: int = 16,
) -> list[str]:
    """Captions for PIL images with a `LoadedBlip` (model, tokenizer, preprocess), in batches
    (K = `num_return_sequences` per image, grouped by image).

    Nucleus sampling draws from one stream seeded once per call, so the same
    images in the same batches give the same captions.
    """
    settings.validate()
    if batch_size < 1:
        raise VlkitError(f"batch size {batch_size}: must be at least 1")
    model: BlipModel = loaded.model
    model._need_decoder("captioning")
    device = next(model.parameters()).device
    images = list(images)
    out: list[str] = []
    run = settings
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([loaded.preprocess(im) for im in images[i : i + batch_size]]).to(device)
            with settings.autocast(device):
                embeds = model.image_embeds(pixels)
            if settings.method == "nucleus":
                # continue the call's stream: reseed each batch from it, deterministically
                run = replace(settings, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            out.extend(decode(loaded.tokenizer, generate(model, embeds, loaded.tokenizer, run)))
    return out


def settings_for(method: Method, prompt: str = "", **overrides: Any) -> CaptionSettings:
    """BLIP's settings for `method`, with a prompt and any field overridden."""
    base = BEAM if method == "beam" else NUCLEUS if method == "nucleus" else None
    if base is None:
        raise VlkitError(f"caption method {method!r}: use 'beam' or 'nucleus'")
    unknown = set(overrides) - set(CaptionSettings.__dataclass_fields__)
    if unknown:
        raise VlkitError(f"caption settings {sorted(unknown)}: unknown; known: {sorted(CaptionSettings.__dataclass_fields__)}")
    return replace(base, prompt=prompt, **overrides).validate()


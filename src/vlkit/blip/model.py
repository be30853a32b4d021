"""`BlipModel`: BLIP's multimodal mixture of encoder-decoder on transformers' BLIP classes.

One ViT (`BlipVisionModel`) and two BERT-style text stacks with cross-attention
in every layer (`BlipTextModel`, `BlipTextLMHeadModel`):

- the *unimodal text encoder* (`text_encoder` without image tokens) gives the
  [CLS] feature for ITC;
- the *image-grounded text encoder* (the same `text_encoder`, cross-attending to
  the image tokens, `[ENC]` as the first token) gives the ITM logits;
- the *image-grounded text decoder* (`text_decoder`: causal self-attention,
  `[DEC]` first, `[SEP]` ends) gives the LM loss and captions.

As in BLIP (`blip_pretrain.py: tie_encoder_decoder_weights(..., '/attention')`),
encoder and decoder share every parameter except their self-attention layers:
the decoder's embeddings, cross-attention and feed-forward blocks *are* the
encoder's `Parameter` objects, and the LM head's output weight is the word
embedding table (its bias is the head's `bias`). `tie_weights()` re-establishes
this. Because the tied tensors share storage (which safetensors refuses), the
`state_dict()` of a `BlipModel` holds each tensor once, under the encoder's (or
the head's own) name, and `load_state_dict` fills the decoder's names from those.

Attribute names are transformers' (`vision_model`, `text_encoder`, `vision_proj`,
`text_proj`, `itm_head` as in `BlipForImageTextRetrieval`; `vision_model`,
`text_decoder` as in `BlipForConditionalGeneration`), so state dicts map 1:1.

Where vlkit follows the original BLIP rather than transformers' forwards:
`itm_logits` puts `[ENC]` first (transformers' retrieval forward keeps `[CLS]`);
`lm_loss` puts `[DEC]` first and sets pads and the prompt to -100 (transformers'
captioning forward does neither) and uses label smoothing 0.1 (transformers'
`BlipConfig(label_smoothing=...)` never reaches the text config). ITC uses
`vision_proj`/`text_proj` of the first tokens, not `transformers.BlipModel`'s
CLIP-style projections.

A model may lack a part: one loaded from a retrieval checkpoint only has no
decoder, one loaded from a captioning checkpoint only has no text encoder,
projections or ITM head; asking it for what it lacks is a one-line `VlkitError`.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.errors import VlkitError

TEMP_INIT = 0.07
TEMP_RANGE = (0.001, 0.5)  # BLIP clamps the temperature to this range before every step
LABEL_SMOOTHING = 0.1
# Names (relative to a BlipTextModel) of the self-attention parameters: the only ones encoder and decoder do not share.
SELF_ATTENTION = re.compile(r"^encoder\.layer\.\d+\.attention\.")


def _as_config(config: Any, cls: type) -> Any:
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
        return cls(**config)
    if isinstance(config, cls):
        return copy.deepcopy(config)
    raise TypeError(f"expected a {cls.__name__} or its dict, got {type(config).__name__}")


def _set_parameter(root: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, param)


def _drop_aliases(module: "BlipModel", state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: keep each shared tensor once (safetensors refuses shared storage)."""
    for alias in module.tied_aliases():
        state_dict.pop(prefix + alias, None)


def _fill_aliases(module: "BlipModel", state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: the decoder's tied names load from the tensor they share."""
    for alias, source in module.tied_aliases().items():
        if prefix + source in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + source]


class BlipModel(nn.Module):
    """ViT + text encoder (ITC/ITM) + text decoder (LM), tied as in BLIP; see the module docstring."""

    def __init__(
        self,
        vision_config: Any,
        text_config: Any,
        embed_dim: int = 256,
        *,
        with_encoder: bool = True,
        with_decoder: bool = True,
        enc_token_id: int | None = None,
    ) -> None:
        """Build the parts with transformers' default initialisation; use `from_config` for BLIP's.

        `text_config.encoder_hidden_size` is set to the vision width and `is_decoder`
        to True (transformers creates the cross-attention layers only then).
        `enc_token_id` defaults to bos + 1, the order in which BLIP adds [DEC] and [ENC].
        """
        from transformers import BlipTextConfig, BlipTextLMHeadModel, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        if not (with_encoder or with_decoder):
            raise ValueError("a BlipModel needs a text encoder, a text decoder or both")
        vision_config = _as_config(vision_config, BlipVisionConfig)
        text_config = _as_config(text_config, BlipTextConfig)
        text_config.encoder_hidden_size = vision_config.hidden_size
        text_config.is_decoder = True
        self.vision_config = vision_config
        self.text_config = text_config
        self.embed_dim = int(embed_dim)
        self.dec_token_id = int(text_config.bos_token_id)
        self.enc_token_id = int(enc_token_id) if enc_token_id is not None else self.dec_token_id + 1
        self.pad_token_id = int(text_config.pad_token_id)
        self.sep_token_id = int(text_config.sep_token_id)

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False) if with_encoder else None
        self.text_decoder = BlipTextLMHeadModel(text_config) if with_decoder else None
        if with_encoder:
            self.vision_proj = nn.Linear(vision_config.hidden_size, self.embed_dim)
            self.text_proj = nn.Linear(text_config.hidden_size, self.embed_dim)
            self.itm_head = nn.Linear(text_config.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(TEMP_INIT))
        else:
            self.vision_proj = self.text_proj = self.itm_head = None
            self.temp = None
        self._aliases: dict[str, str] = {}
        self.tie_weights()
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls, vision_config: Any, text_config: Any, embed_dim: int = 256, *, enc_token_id: int | None = None
    ) -> "BlipModel":
        """A complete model (encoder and decoder) with BLIP's random initialisation (`init_weights`)."""
        model = cls(vision_config, text_config, embed_dim, enc_token_id=enc_token_id)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """BLIP's random initialisation of every part, each shared tensor drawn once.

        Vision (BLIP's `vit.py`, timm's ViT): Linear weights truncated normal std 0.02,
        biases 0, LayerNorm 1/0, position and class embeddings truncated normal 0.02,
        the patch convolution PyTorch's default. Text (BLIP's `med.py`, BERT): Linear
        and Embedding weights normal std `initializer_range`, biases 0, LayerNorm 1/0.
        Projections and ITM head: PyTorch's Linear default (BLIP leaves them so).
        Temperature 0.07.
        """
        seen: set[int] = set()

        def fresh(t: torch.Tensor | None) -> bool:
            if t is None or id(t) in seen:
                return False
            seen.add(id(t))
            return True

        for m in self.vision_model.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        emb = self.vision_model.embeddings
        nn.init.trunc_normal_(emb.position_embedding, std=0.02)
        nn.init.trunc_normal_(emb.class_embedding, std=0.02)
        emb.patch_embedding.reset_parameters()

        std = float(self.text_config.initializer_range)
        for part in (self.text_encoder, self.text_decoder):
            if part is None:
                continue
            for m in part.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)) and fresh(m.weight):
                    m.weight.normal_(0.0, std)
                if isinstance(m, nn.Linear) and fresh(m.bias):
                    m.bias.zero_()
                if isinstance(m, nn.LayerNorm):
                    if fresh(m.weight):
                        m.weight.fill_(1.0)
                    if fresh(m.bias):
                        m.bias.zero_()
        if self.text_decoder is not None:
            self.text_decoder.cls.predictions.bias.zero_()
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            if head is not None:
                head.reset_parameters()
        if self.temp is not None:
            self.temp.fill_(TEMP_INIT)

    def tie_weights(self) -> None:
        """Make the decoder share all but its self-attention with the encoder, and the LM head the word embeddings."""
        dec = self.text_decoder
        if dec is not None:
            if self.text_encoder is not None:
                dec_names = dict(dec.bert.named_parameters(remove_duplicate=False))
                for name, param in self.text_encoder.named_parameters(remove_duplicate=False):
                    if SELF_ATTENTION.match(name):
                        continue
                    if name not in dec_names or dec_names[name].shape != param.shape:
                        raise ValueError(f"text decoder has no parameter {name} of shape {tuple(param.shape)} to tie")
                    _set_parameter(dec.bert, name, param)
            head = dec.cls.predictions
            head.decoder.weight = dec.bert.embeddings.word_embeddings.weight
            head.decoder.bias = head.bias
        self._aliases = self._find_aliases()

    def _find_aliases(self) -> dict[str, str]:
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if id(param) in first:
                aliases[name] = first[id(param)]
            else:
                first[id(param)] = name
        return aliases

    def tied_aliases(self) -> dict[str, str]:
        """{name left out of the state dict: name of the tensor it shares} (the decoder's tied names)."""
        return dict(self._aliases)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every name incl. the decoder's tied ones (what transformers' classes expect), tensors shared."""
        state = self.state_dict()
        for alias, source in self._aliases.items():
            state[alias] = state[source]
        return state

    # ------------------------------------------------------------------ parts

    @property
    def has_encoder(self) -> bool:
        return self.text_encoder is not None

    @property
    def has_decoder(self) -> bool:
        return self.text_decoder is not None

    def _need_encoder(self, what: str) -> nn.Module:
        if self.text_encoder is None:
            raise VlkitError(
                f"BLIP model: has no text encoder for {what} (it was loaded from a captioning checkpoint only); "
                "load a retrieval checkpoint (BlipForImageTextRetrieval) or a full BLIP model"
            )
        return self.text_encoder

    def _need_decoder(self, what: str) -> nn.Module:
        if self.text_decoder is None:
            raise VlkitError(
                f"BLIP model: has no text decoder for {what} (it was loaded from a retrieval checkpoint only); "
                "load a captioning checkpoint (BlipForConditionalGeneration) or a full BLIP model"
            )
        return self.text_decoder

    # ------------------------------------------------------------------ forwards

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1+N, Dv]: the ViT's last hidden state after post_layernorm (as transformers)."""
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_feat(self, image_embeds: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 1+N, Dv] -> [B, E]: L2-normalised vision_proj of the [CLS] image token (raw with normalize=False)."""
        self._need_encoder("image features")
        feat = self.vision_proj(image_embeds[:, 0, :])
        return F.normalize(feat, dim=-1) if normalize else feat

    def text_feat(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        normalize: bool = True,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, L] ids starting with [CLS] -> [B, E]: L2-normalised text_proj of the unimodal encoder's [CLS].

        `inputs_embeds` ([B, L, W] word embeddings, no positions) replaces the ids for prompt learning.
        """
        encoder = self._need_encoder("text features")
        if inputs_embeds is not None:
            # transformers adds the positions in place; keep the caller's tensor intact
            inputs_embeds = inputs_embeds.clone()
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds).last_hidden_state
        feat = self.text_proj(hidden[:, 0, :])
        return F.normalize(feat, dim=-1) if normalize else feat

    def itm_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_atts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, 2] match logits (index 1 = match) of the image-grounded encoder, [ENC] replacing the first token."""
        encoder = self._need_encoder("image-text matching")
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        if image_atts is None:
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        return self.itm_head(hidden[:, 0, :])

    def decoder_inputs(
        self, input_ids: torch.Tensor, prompt_length: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([DEC]-first ids, labels): labels are those ids with pads and the first `prompt_length` tokens at -100.

        As BLIP's `blip.py`/`blip_pretrain.py`: pads are found by the pad id, and
        `prompt_length` counts [DEC] (BLIP's `len(tokenizer(prompt).input_ids) - 1`).
        """
        ids = input_ids.clone()
        ids[:, 0] = self.dec_token_id
        labels = ids.masked_fill(ids == self.pad_token_id, -100)
        if prompt_length:
            labels[:, :prompt_length] = -100
        return ids, labels

    def lm_logits(
        self,
        image_embeds: torch.Tensor,
        decoder_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_atts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, L, V] next-token logits of the decoder for ids already starting with [DEC]."""
        decoder = self._need_decoder("language modelling")
        return decoder(
            input_ids=decoder_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            use_cache=False,
        ).logits

    def lm_loss(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int = 0,
        label_smoothing: float = LABEL_SMOOTHING,
        reduction: Literal["mean", "none"] = "mean",
    ) -> torch.Tensor:
        """Captioning loss of the image-grounded decoder, exactly as BLIP's `BertLMHeadModel`.

        [DEC] replaces the first token; labels ignore pads and the first
        `prompt_length` tokens; next-token cross-entropy with label smoothing.
        `reduction="mean"`: the mean over every non-ignored token of the batch
        (a token-weighted mean, not a mean of per-caption means); `"none"`: [B],
        each caption's *sum* over its tokens (BLIP's `lm_loss.view(B, -1).sum(1)`).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
        ids, labels = self.decoder_inputs(input_ids, prompt_length)
        logits = self.lm_logits(image_embeds, ids, attention_mask)
        shifted = logits[:, :-1, :]
        targets = labels[:, 1:]
        loss = F.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        if reduction == "none":
            loss = loss.view(ids.shape[0], -1).sum(1)
        return loss

    def extra_repr(self) -> str:
        parts = ["vision"] + (["encoder"] if self.has_encoder else []) + (["decoder"] if self.has_decoder else [])
        return f"parts={'+'.join(parts)}, embed_dim={self.embed_dim}, enc_token_id={self.enc_token_id}, dec_token_id={self.dec_token_id}"

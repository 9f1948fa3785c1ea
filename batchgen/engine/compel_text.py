"""One text's conditioning read with InvokeAI's prompt syntax, built by the compel library.

Each text encoder gets its own compel object (what compel's CompelForSDXL does for SDXL): compel's multi-encoder
Compel fails on a `.blend()` (compel 2.5), and one object per encoder lets each tokenizer expand its own textual
inversions. The layer each reads is the one diffusers reads for that base (SD1/SD2: the last, normed; SDXL: the
penultimate of both, not normed, pooled from encoder 2); A1111's clip skip 2 on SD1/SD2 is compel's penultimate
normed layer, and deeper skips are refused at planning (batchgen.plan.compel_rules).
"""

from __future__ import annotations

import weakref

import torch

from batchgen.assets import text_model
from batchgen.assets.bases import Base
from batchgen.assets.bases.record import tokenizer_of
from batchgen.errors import BatchgenError


class CompelText:
    """The compel objects of one pipeline, built on first use per (clip skip, truncation)."""

    def __init__(self, pipe, base: Base) -> None:
        self.pipe = pipe
        self.base = base
        self._compels: dict[tuple[int, bool], list] = {}

    def encode(self, text: str, clip_skip: int, truncate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        _parse(text)
        compels = self._for(clip_skip, truncate)
        with torch.inference_mode(), text_model.level_alias(self.pipe.text_encoder, clip_skip > 1):
            for compel in compels:
                # compel keeps the empty text's encoding for weighting, computed once; a text-encoder LoRA patched
                # in place since would leave it stale, so it is recomputed for each text.
                compel.conditioning_provider._empty_z = None
            outputs = [compel.build_conditioning_tensor(text) for compel in compels]
            if not self.base.pooled_encoder:
                return outputs[0].to(self.pipe.text_encoder.dtype), None
            left, right = outputs
            # What compel's requires_pooled would add: the raw text's pooled output, cut at 77 tokens.
            pooling = compels[list(self.base.text_encoders).index(self.base.pooled_encoder)]
            pooled = pooling.conditioning_provider.get_pooled_embeddings([text], device=pooling.device)
            # The encoders chunk a long text each on its own tokenizer; like CompelForSDXL, pad the shorter with
            # its encoder's empty-text chunks so the two line up token for token.
            left, right = _pad(compels[0], left, right.shape[1]), _pad(compels[1], right, left.shape[1])
            return torch.cat([left, right], dim=-1).to(self.pipe.text_encoder.dtype), pooled

    def _for(self, clip_skip: int, truncate: bool) -> list:
        key = (clip_skip, truncate)
        if key not in self._compels:
            self._compels[key] = _build(self.pipe, self.base, clip_skip, truncate)
        return self._compels[key]


_READERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipe -> its CompelText, gone with the pipe


def compel_encode(
    pipe, base: Base, text: str, clip_skip: int, truncate: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text's conditioning as compel builds it: hidden [1, tokens, width] in the text encoder's dtype (SD1/SD2:
    one encoder; SDXL: both encoders' outputs concatenated on the last dim as diffusers does) and SDXL's pooled
    [1, width] (None for SD1/SD2). Long texts are chunked by compel (truncate_long_prompts=not truncate). No padding
    against the negative prompt: the caller does that."""
    reader = _READERS.get(pipe)
    if reader is None:
        reader = _READERS[pipe] = CompelText(pipe, base)
    return reader.encode(text, clip_skip, truncate)


def _build(pipe, base: Base, clip_skip: int, truncate: bool) -> list:
    from compel import Compel, ReturnedEmbeddingsType

    if clip_skip not in base.compel_clip_skips:
        raise BatchgenError(_skip_message(base.name, clip_skip))
    if base.clip_layer == "penultimate":
        layer = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    else:
        layer = {
            1: ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
            2: ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED,
        }[clip_skip]
    pairs = [(getattr(pipe, tokenizer_of(c)), getattr(pipe, c)) for c in base.text_encoders]
    # No requires_pooled: compel 2.5.1 then fails on an .and() with a part weight other than 1 (it pads its
    # (hidden, pooled) pair as if it were a tensor); CompelText.encode asks for the pooled output as compel would.
    return [
        Compel(
            tokenizer=tokenizer,
            text_encoder=encoder,
            textual_inversion_manager=_TextualInversions(pipe, tokenizer),
            truncate_long_prompts=truncate,  # batchgen's truncate: cut at 77 tokens; else compel's chunks
            returned_embeddings_type=layer,
        )
        for tokenizer, encoder in pairs
    ]


def _skip_message(base: str, clip_skip: int) -> str:
    # The planner refuses these first (batchgen.plan.compel_rules); this is the engine's own guard.
    return f"prompt_syntax=compel cannot read clip_skip {clip_skip} on {base}; use prompt_syntax=a1111"


def _parse(text: str):
    """compel's parse of the text, its errors and the syntax batchgen cannot render turned into BatchgenError."""
    import pyparsing
    from compel import Compel, PromptParser
    from compel.prompt_parser import Blend, CrossAttentionControlSubstitute

    try:
        conjunction = Compel.parse_prompt_string(text)
    except (PromptParser.ParsingException, pyparsing.ParseBaseException, ValueError) as error:
        detail = " ".join(str(error).split())
        raise BatchgenError(
            f"prompt_syntax=compel: cannot parse prompt '{text}': {detail}; fix the compel syntax or use "
            "prompt_syntax=a1111"
        ) from None
    if conjunction.lora_weights:
        # compel takes withLora() out of the text and leaves applying it to the caller: the LoRA would be ignored.
        raise BatchgenError(
            f"prompt_syntax=compel: prompt '{text}' asks for a LoRA with withLora(); batchgen applies LoRAs from "
            "sweep.loras (or A1111's <lora:name:weight> under prompt_syntax=a1111): remove withLora() from the prompt"
        )
    for part in conjunction.prompts:
        children = [c for p in part.prompts for c in p.children] if isinstance(part, Blend) else part.children
        if any(isinstance(c, CrossAttentionControlSubstitute) for c in children):
            # compel returns the unedited text's conditioning for .swap(): the edit would be dropped in silence.
            raise BatchgenError(
                f"prompt_syntax=compel: prompt '{text}' uses .swap() (cross-attention control), which diffusers "
                "pipelines cannot apply; use A1111's prompt editing [from:to:when] under prompt_syntax=a1111"
            )
    return conjunction


def _pad(compel, hidden: torch.Tensor, tokens: int) -> torch.Tensor:
    if hidden.shape[1] >= tokens:
        return hidden
    empty = compel.build_conditioning_tensor("")
    return torch.cat([hidden, *[empty] * ((tokens - hidden.shape[1]) // empty.shape[1])], dim=1)


class _TextualInversions:
    """compel's DiffusersTextualInversionManager for one tokenizer: a multi-vector TI's trigger expanded by the
    pipeline's own maybe_convert_prompt into its extra tokens. compel's class always uses pipe.tokenizer, which for
    SDXL's second encoder is right only while both tokenizers number the TI tokens alike."""

    def __init__(self, pipe, tokenizer) -> None:
        self.pipe = pipe
        self.tokenizer = tokenizer

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        added = self.tokenizer.added_tokens_decoder
        if not any(i in added and not added[i].special for i in token_ids):
            return token_ids  # no TI here: keep the ids, a decode and re-encode need not give them back
        text = self.pipe.maybe_convert_prompt(self.tokenizer.decode(token_ids), self.tokenizer)
        return self.tokenizer.encode(text, add_special_tokens=False)

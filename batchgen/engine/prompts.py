"""Text-encoder outputs cached per (text, text-encoder LoRA state), encoded a batch at a time.

A text longer than the encoder's 77 tokens is encoded as A1111 does: in chunks of 75 tokens, each wrapped in its
own start and end tokens, the chunks' outputs concatenated (the pooled SDXL output is the first chunk's); a job's
prompt and negative prompt are padded to the same number of chunks with the empty text's encoding. With
run.truncate_prompts the text is cut at 77 tokens instead, with a warning. A clip skip (A1111's count) reads an
earlier encoder layer for the prompt and the negative prompt alike, normed as the last one is for SD1/SD2.

A sweep renders each prompt under many UNet-only changes (seeds, steps, UNet weights); encoding it once per
text-encoder state removes that work from every image but the first. Prompts and negative prompts share one cache
(diffusers encodes both the same way), and every text a batch still needs goes through the encoders in one call.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch

from batchgen.engine.rows import BatchShape, isolate_image_rows
from batchgen.spec import Job


@dataclass(frozen=True)
class Embeds:
    """One image's conditioning, shaped [1, tokens, width] (pooled: [1, width]) as diffusers returns it."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class _Encoded:
    hidden: torch.Tensor  # [1, tokens, width]
    pooled: torch.Tensor | None  # [1, width], SDXL only


def text_encoder_state(job: Job) -> tuple[tuple[str, float], ...]:
    # Over-keying is safe (a cache miss), under-keying is not: every non-zero text-encoder weight counts.
    return tuple((lw.name, lw.text_encoder) for lw in job.loras if lw.text_encoder != 0.0)


def uses_guidance(pipe, job: Job) -> bool:
    """The pipeline's own rule for classifier-free guidance, so cached embeddings match what it would compute."""
    return job.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def texts_of(pipe, job: Job) -> list[str]:
    return [job.prompt, job.negative_prompt] if uses_guidance(pipe, job) else [job.prompt]


class PromptCache:
    def __init__(self, pipe, max_entries: int = 1024) -> None:
        self.pipe = pipe
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, _Encoded] = OrderedDict()
        self.misses = 0  # texts encoded
        self.calls = 0  # text-encoder calls
        self._shape = BatchShape()
        # The pooled projection sees one row per text: run it per text so a text encodes the same in any batch.
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None and hasattr(encoder, "text_projection"):
                isolate_image_rows(encoder, self._shape, ("text_projection",))

    def embeds(self, batch: list[Job]) -> list[Embeds]:
        """Each job's conditioning; the batch must share one text-encoder state (it shares its LoRA stack).

        Jobs with a long prompt may come back longer than the others: a pipeline call takes one length only."""
        states = {text_encoder_state(job) for job in batch}
        if len(states) != 1:
            raise RuntimeError("a batch spans text-encoder states; batches must be cut by batch_key")
        state = states.pop()
        modes = {(job.truncate_prompts, job.clip_skip) for job in batch}
        if len(modes) != 1:
            raise RuntimeError("a batch mixes prompt modes (truncation, clip skip); batches must be cut by batch_key")
        mode = modes.pop()  # (truncate, clip_skip): how a text is encoded, part of its cache key
        wanted = dict.fromkeys(text for job in batch for text in texts_of(self.pipe, job))
        missing = [text for text in wanted if (text, state, mode) not in self._entries]
        if missing:
            for text, encoded in zip(missing, self._encode(missing, mode), strict=True):
                self._entries[(text, state, mode)] = encoded
            self.misses += len(missing)
            self.calls += 1
        out = []
        for job in batch:
            texts = texts_of(self.pipe, job)
            for text in texts:
                self._entries.move_to_end((text, state, mode))
            cond = self._entries[(texts[0], state, mode)]
            uncond = self._entries[(texts[1], state, mode)] if len(texts) > 1 else None
            if uncond is not None and cond.hidden.shape[1] != uncond.hidden.shape[1]:
                if ("", state, mode) not in self._entries:  # the padding chunk, needed by long prompts only
                    self._entries[("", state, mode)] = self._encode([""], mode)[0]
                    self.misses += 1
                    self.calls += 1
                empty = self._entries[("", state, mode)].hidden
                cond, uncond = _pad_to(cond, uncond, empty), _pad_to(uncond, cond, empty)
            out.append(Embeds(cond.hidden, uncond and uncond.hidden, cond.pooled, uncond and uncond.pooled))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out

    def _encode(self, texts: list[str], mode: tuple[bool, int]) -> list[_Encoded]:
        """Texts that fit in one chunk go through diffusers' encode_prompt together; longer ones chunk by chunk."""
        truncate, clip_skip = mode
        chunks = {text: self._chunk_ids(text) for text in texts}
        # diffusers' SD1/SD2 encode_prompt reads a skipped layer through `text_encoder.text_model`, which
        # transformers 5's CLIPTextModel no longer has; there the chunk path reads the same layer itself.
        by_diffusers = clip_skip == 1 or getattr(self.pipe, "text_encoder_2", None) is not None
        short = [t for t in texts if by_diffusers and (len(chunks[t][0]) == 1 or truncate)]
        for text in texts:
            if truncate and len(chunks[text][0]) > 1:
                tokens = len(self.pipe.tokenizer(text, truncation=False, add_special_tokens=False).input_ids)
                print(
                    f"batchgen: warning: prompt '{text[:60]}...' is {tokens} tokens; the encoder reads the first "
                    "77 (run.truncate_prompts=true)",
                    file=sys.stderr,
                )
        encoded = dict(zip(short, self._encode_short(short, clip_skip), strict=True)) if short else {}
        for text in texts:
            if text not in encoded:
                ids = [c[:1] for c in chunks[text]] if truncate else chunks[text]
                encoded[text] = self._encode_chunks(ids, clip_skip)
        return [encoded[text] for text in texts]

    def _tokenizers(self) -> list[tuple[object, torch.nn.Module]]:
        pairs = [(self.pipe.tokenizer, self.pipe.text_encoder)]
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            pairs.append((self.pipe.tokenizer_2, self.pipe.text_encoder_2))
        return pairs

    def _chunk_ids(self, text: str) -> list[list[list[int]]]:
        """Per tokenizer, the text's 77-token chunks: start token, up to 75 tokens, end token, padding."""
        out = []
        for tokenizer, _ in self._tokenizers():
            if hasattr(self.pipe, "maybe_convert_prompt"):
                text_for = self.pipe.maybe_convert_prompt(text, tokenizer)  # a multi-vector TI's extra tokens
            else:
                text_for = text
            ids = tokenizer(text_for, truncation=False, add_special_tokens=False).input_ids
            size = tokenizer.model_max_length - 2
            pieces = [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]
            pad = tokenizer.pad_token_id
            out.append(
                [[tokenizer.bos_token_id, *c, tokenizer.eos_token_id] + [pad] * (size - len(c)) for c in pieces]
            )
        return out

    @torch.inference_mode()
    def _encode_chunks(self, chunks: list[list[list[int]]], clip_skip: int) -> _Encoded:
        device = self.pipe._execution_device
        sdxl = len(chunks) > 1
        hidden, pooled = [], None
        for (_, encoder), ids in zip(self._tokenizers(), chunks, strict=True):
            tensor = torch.tensor(ids, device=device)
            self._shape.images = len(ids)
            try:
                output = encoder(tensor, output_hidden_states=sdxl or clip_skip > 1)
            finally:
                self._shape.images = 1
            # diffusers' choice per pipeline: SD1/SD2 take the last layer (normed), SDXL the penultimate of both
            # encoders (not normed); a clip skip goes that many layers further back from there.
            if sdxl:
                states = output.hidden_states[-(clip_skip + 1)]
            elif clip_skip > 1:
                # The last layer's output is normed inside the encoder; an earlier one gets the same norm here.
                norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 nests it
                states = norm(output.hidden_states[-clip_skip])
            else:
                states = output[0]
            hidden.append(states.reshape(1, -1, states.shape[-1]))
            if sdxl:
                pooled = output[0][0:1]
        dtype = self.pipe.text_encoder.dtype
        return _Encoded(torch.cat(hidden, dim=-1).to(dtype), pooled)

    @torch.inference_mode()
    def _encode_short(self, texts: list[str], clip_skip: int) -> list[_Encoded]:
        # inference_mode also matters for memory: a cached tensor with autograd history would keep every
        # text-encoder activation of its prompt alive.
        device = self.pipe._execution_device
        self._shape.images = len(texts)
        skip = clip_skip - 1 or None  # diffusers counts layers skipped past its default; A1111 counts from 1
        try:
            if hasattr(self.pipe, "text_encoder_2"):
                hidden, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=texts,
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                    clip_skip=skip,
                )
            else:
                hidden, _ = self.pipe.encode_prompt(texts, device, 1, False, clip_skip=skip)
                pooled = None
        finally:
            self._shape.images = 1
        return [
            _Encoded(hidden[i : i + 1], None if pooled is None else pooled[i : i + 1]) for i in range(len(texts))
        ]


def _pad_to(encoded: _Encoded, other: _Encoded, empty: torch.Tensor) -> _Encoded:
    """A1111's padding of the shorter of prompt and negative prompt: empty-text chunks appended."""
    missing = (other.hidden.shape[1] - encoded.hidden.shape[1]) // empty.shape[1]
    if missing <= 0:
        return encoded
    return _Encoded(torch.cat([encoded.hidden, *([empty] * missing)], dim=1), encoded.pooled)


def batch_kwargs(batch: list[Embeds]) -> dict[str, torch.Tensor]:
    """Stack per-image embeddings into the pipeline's *_embeds arguments."""
    kwargs = {"prompt_embeds": torch.cat([e.prompt for e in batch])}
    if batch[0].negative is not None:
        kwargs["negative_prompt_embeds"] = torch.cat([e.negative for e in batch])
    if batch[0].pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.cat([e.pooled for e in batch])
        if batch[0].negative_pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([e.negative_pooled for e in batch])
    return kwargs

"""Text-encoder outputs cached per (text, text-encoder LoRA state), encoded a batch at a time.

A text longer than the encoder's 77 tokens is encoded as A1111 does: in chunks of 75 tokens, each wrapped in its
own start and end tokens, the chunks' outputs concatenated (the pooled SDXL output is the first chunk's); a job's
prompt and negative prompt are padded to the same number of chunks with the empty text's encoding. With
run.truncate_prompts the text is cut at 77 tokens instead, with a warning. A clip skip (A1111's count) reads an
earlier encoder layer for the prompt and the negative prompt alike, normed as the last one is for SD1/SD2.

Prompt syntax (batchgen.prompt_syntax) decides what is encoded: a text that needs no weights, BREAK or schedule
goes the plain way above, unchanged; an A1111 text is encoded per phase of its prompt-editing schedule, its pieces
tokenized one by one into 75-token chunks (BREAK closes one), each chunk's hidden states multiplied per token by
the weights and rescaled to their original mean (A1111's default emphasis), per text and per encoder; a compel
text goes through the compel library. When prompt and negative prompt end up with different lengths they are
padded with empty chunks only under pad_prompts; otherwise, as in A1111, each is conditioned in its own UNet pass
(engine/passes.py).

A sweep renders each prompt under many UNet-only changes (seeds, steps, UNet weights); encoding it once per
text-encoder state removes that work from every image but the first. Prompts and negative prompts share one cache
(diffusers encodes both the same way), and every text a batch still needs goes through the encoders in one call.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch

from batchgen.assets.bases import DENOISERS
from batchgen.engine.rows import BatchShape, isolate_image_rows
from batchgen.prompt_syntax import phases, plain_text
from batchgen.prompt_syntax.a1111 import BREAK
from batchgen.spec import Job, LoraState


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


# What one encoder pass reads: a plain text (today's key, so the cache is shared with syntax-free prompts), the
# weighted pieces of one A1111 phase, or a text compel parses.
Unit = str | tuple


@dataclass(frozen=True)
class Conditioning:
    """One job's conditioning over the steps: A1111's schedule, (until, embeds) with `until` the last 0-based step
    index the entry conditions; one entry for a prompt without editing."""

    phases: tuple[tuple[int, Embeds], ...]

    @property
    def first(self) -> Embeds:
        return self.phases[0][1]

    def at(self, step: int) -> Embeds:
        return next((e for until, e in self.phases if step <= until), self.phases[-1][1])

    @property
    def signature(self) -> tuple:
        """What jobs in one pipeline call must share: the switch steps and, at each, both sides' lengths."""
        return tuple(
            (until, e.prompt.shape[1], None if e.negative is None else e.negative.shape[1]) for until, e in self.phases
        )

    @property
    def simple(self) -> bool:
        """One phase with prompt and negative of one length: the pipeline's own call, no switching or passes."""
        (_, cond, uncond), *rest = self.signature
        return not rest and (uncond is None or uncond == cond)


def schedule_units(text: str, job: Job) -> list[tuple[int, Unit]]:
    """(until, unit) per phase of the text under the job's prompt syntax."""
    plain = plain_text(text, job.prompt_syntax, job.steps)
    if plain is not None:
        return [(job.steps, plain)]
    if job.prompt_syntax == "compel":
        return [(job.steps, ("compel", text))]
    return [(phase.until, ("a1111", phase.fragments)) for phase in phases(text, job.prompt_syntax, job.steps)]


def text_encoder_state(job: Job) -> LoraState:
    """What the job's LoRAs put into the text encoders, block weights included: the planner's state without the
    denoiser's part, so that jobs differing only in the denoiser share their encodings."""
    return job.lora_state.excluding(DENOISERS)


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
        self.rounds = 0  # batches (and empty-text fills) that had texts to encode
        self._shape = BatchShape()
        self._compel_text = None
        self._state: LoraState | None = None  # the text-encoder state of the last batch
        # The pooled projection sees one row per chunk: run it per chunk so a long text's first chunk pools the same
        # whatever the text's length.
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None and hasattr(encoder, "text_projection"):
                isolate_image_rows(encoder, self._shape, ("text_projection",))

    def embeds(self, batch: list[Job]) -> list[Conditioning]:
        """Each job's conditioning; the batch must share one text-encoder state (it shares its LoRA stack).

        Jobs may come back with different lengths or schedules: a pipeline call takes one `signature` only."""
        states = {text_encoder_state(job) for job in batch}
        if len(states) != 1:
            raise RuntimeError("a batch spans text-encoder states; batches must be cut by batch_key")
        state = states.pop()
        if state != self._state:
            self._forget_other_states(state)
        modes = {(job.truncate_prompts, job.clip_skip) for job in batch}
        if len(modes) != 1:
            raise RuntimeError("a batch mixes prompt modes (truncation, clip skip); batches must be cut by batch_key")
        mode = modes.pop()  # (truncate, clip_skip): how a text is encoded, part of its cache key
        schedules = [[schedule_units(text, job) for text in texts_of(self.pipe, job)] for job in batch]
        wanted = dict.fromkeys(unit for sides in schedules for side in sides for _, unit in side)
        missing = [unit for unit in wanted if (unit, state, mode) not in self._entries]
        if missing:
            for unit, encoded in zip(missing, self._encode_units(missing, mode), strict=True):
                self._entries[(unit, state, mode)] = encoded
            self.misses += len(missing)
            self.rounds += 1
        out = []
        for job, sides in zip(batch, schedules, strict=True):
            for side in sides:
                for _, unit in side:
                    self._entries.move_to_end((unit, state, mode))
            out.append(self._conditioning(sides, state, mode, job.pad_prompts))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out

    def _forget_other_states(self, state: LoraState) -> None:
        """Jobs come grouped by LoRA stack, so a text-encoder state left behind rarely comes back: keeping its
        encodings would grow memory with every LoRA of a sweep. The pristine state (no text-encoder LoRA) stays."""
        keep = {state, LoraState()}
        for key in [key for key in self._entries if key[1] not in keep]:
            del self._entries[key]
        self._state = state

    def _conditioning(self, sides: list[list[tuple[int, Unit]]], state, mode, pad: bool) -> Conditioning:
        """Prompt and negative schedules merged into one: an entry wherever either side switches."""
        ends = sorted({until for side in sides for until, _ in side})
        phases = []
        for end in ends:
            picked = [next(unit for until, unit in side if end <= until) for side in sides]
            cond = self._entries[(picked[0], state, mode)]
            uncond = self._entries[(picked[1], state, mode)] if len(picked) > 1 else None
            if uncond is not None and pad and cond.hidden.shape[1] != uncond.hidden.shape[1]:
                empty = self._empty(state, mode)
                cond, uncond = _pad_to(cond, uncond, empty), _pad_to(uncond, cond, empty)
            embeds = Embeds(cond.hidden, uncond and uncond.hidden, cond.pooled, uncond and uncond.pooled)
            if phases and _same(phases[-1][1], embeds):
                phases[-1] = (end, embeds)
            else:
                phases.append((end, embeds))
        return Conditioning(tuple(phases))

    def _empty(self, state, mode) -> torch.Tensor:
        """The empty text's encoding: the chunk A1111 pads the shorter side with."""
        if ("", state, mode) not in self._entries:  # needed by long prompts only
            self._entries[("", state, mode)] = self._encode([""], mode)[0]
            self.misses += 1
            self.rounds += 1
        return self._entries[("", state, mode)].hidden

    def _encode_units(self, units: list[Unit], mode: tuple[bool, int]) -> list[_Encoded]:
        texts = [u for u in units if isinstance(u, str)]
        encoded = dict(zip(texts, self._encode(texts, mode), strict=True)) if texts else {}
        truncate, clip_skip = mode
        for unit in units:
            if isinstance(unit, str):
                continue
            kind, body = unit
            if kind == "compel":
                hidden, pooled = self._compel().encode(body, clip_skip, truncate)
                encoded[unit] = _Encoded(hidden, pooled)
            else:
                encoded[unit] = self._encode_weighted(body, mode)
        return [encoded[u] for u in units]

    def _device(self) -> torch.device:
        # diffusers' _execution_device walks every module for offload hooks (5 ms a call on a tiny model);
        # batchgen never offloads, so the text encoder's device is where encoding runs.
        return self.pipe.text_encoder.device

    def _compel(self):
        if self._compel_text is None:
            from batchgen.engine.compel_text import CompelText  # only sweeps with compel prompts import compel

            self._compel_text = CompelText(self.pipe)
        return self._compel_text

    def _encode(self, texts: list[str], mode: tuple[bool, int]) -> list[_Encoded]:
        """Texts that fit in one chunk go through diffusers' encode_prompt one by one; longer ones chunk by chunk."""
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
        encoded = {text: self._encode_short(text, clip_skip) for text in short}
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

    def _weighted_chunks(self, fragments) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """Per tokenizer, A1111's chunks of weighted pieces: each piece tokenized on its own, its weight on every
        token (every vector of a TI), a chunk closed at 75 tokens or by BREAK (even an empty one, as A1111 does);
        start, end and padding tokens weigh 1. Cut flat at 75 like a plain text, without A1111's comma backtrack."""
        ids_out, weights_out = [], []
        for tokenizer, _ in self._tokenizers():
            size = tokenizer.model_max_length - 2
            chunks: list[tuple[list[int], list[float]]] = []
            ids: list[int] = []
            weights: list[float] = []
            for text, weight in fragments:
                if (text, weight) == BREAK:
                    chunks.append((ids, weights))
                    ids, weights = [], []
                    continue
                if hasattr(self.pipe, "maybe_convert_prompt"):
                    text = self.pipe.maybe_convert_prompt(text, tokenizer)
                for token in tokenizer(text, truncation=False, add_special_tokens=False).input_ids:
                    if len(ids) == size:
                        chunks.append((ids, weights))
                        ids, weights = [], []
                    ids.append(token)
                    weights.append(weight)
            if ids or not chunks:
                chunks.append((ids, weights))
            pad = tokenizer.pad_token_id
            ids_out.append(
                [[tokenizer.bos_token_id, *c, tokenizer.eos_token_id] + [pad] * (size - len(c)) for c, _ in chunks]
            )
            weights_out.append([[1.0, *w, 1.0] + [1.0] * (size - len(w)) for _, w in chunks])
        return ids_out, weights_out

    def _encode_weighted(self, fragments, mode: tuple[bool, int]) -> _Encoded:
        truncate, clip_skip = mode
        ids, weights = self._weighted_chunks(fragments)
        if truncate and len(ids[0]) > 1:
            print(
                f"batchgen: warning: prompt '{''.join(t for t, _ in fragments)[:60]}...' is {len(ids[0])} chunks; "
                "the encoder reads the first (run.truncate_prompts=true)",
                file=sys.stderr,
            )
            ids, weights = [c[:1] for c in ids], [w[:1] for w in weights]
        return self._encode_chunks(ids, clip_skip, weights)

    @torch.inference_mode()
    def _encode_chunks(
        self, chunks: list[list[list[int]]], clip_skip: int, weights: list[list[list[float]]] | None = None
    ) -> _Encoded:
        device = self._device()
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
            if weights is not None:
                states = _emphasis(states, torch.tensor(weights[len(hidden)], device=device, dtype=states.dtype))
            hidden.append(states.reshape(1, -1, states.shape[-1]))
            if sdxl:
                pooled = output[0][0:1]
        dtype = self.pipe.text_encoder.dtype
        return _Encoded(torch.cat(hidden, dim=-1).to(dtype), pooled)

    @torch.inference_mode()
    def _encode_short(self, text: str, clip_skip: int) -> _Encoded:
        """One text in its own encoder call: on some CPUs (Intel with AMX) a text's rows round differently beside
        other texts in one matrix product, so encoding texts together would make a prompt depend on its
        neighbours."""
        # inference_mode also matters for memory: a cached tensor with autograd history would keep every
        # text-encoder activation of its prompt alive.
        device = self._device()
        skip = clip_skip - 1 or None  # diffusers counts layers skipped past its default; A1111 counts from 1
        if hasattr(self.pipe, "text_encoder_2"):
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompt=[text], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                clip_skip=skip,
            )  # fmt: skip
            return _Encoded(hidden, pooled)
        hidden, _ = self.pipe.encode_prompt([text], device, 1, False, clip_skip=skip)
        return _Encoded(hidden, None)


def _emphasis(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's default emphasis, chunk by chunk ([chunks, 77, width] by [chunks, 77]): every token's hidden
    state times its weight, then the chunk scaled back to its original mean (A1111 takes that mean over the whole
    batch; here it is one text's chunk, so an image never depends on what it was batched with)."""
    out = []
    for z, w in zip(states, weights, strict=True):
        original = z.mean()
        z = z * w[:, None].expand(z.shape)
        out.append(z * (original / z.mean()))
    return torch.stack(out)


def _same(a: Embeds, b: Embeds) -> bool:
    """Two phases made of the same cached encodings (an alternation back to a text already seen) are one."""
    return all(getattr(a, f) is getattr(b, f) for f in ("prompt", "negative", "pooled", "negative_pooled"))


def _pad_to(encoded: _Encoded, other: _Encoded, empty: torch.Tensor) -> _Encoded:
    """A1111's padding of the shorter of prompt and negative prompt: empty-text chunks appended."""
    missing = (other.hidden.shape[1] - encoded.hidden.shape[1]) // empty.shape[1]
    if missing <= 0:
        return encoded
    return _Encoded(torch.cat([encoded.hidden, *([empty] * missing)], dim=1), encoded.pooled)

"""Plain texts on the CLIP path: a text that needs no weights, BREAK or schedule, under any prompt syntax.

A text of one 77-token chunk goes through diffusers' own encode_prompt, so it is encoded exactly as diffusers
does; a longer one is encoded as A1111 does, in chunks (engine/clip_encoders.py), the chunks' outputs laid end to
end (SDXL's pooled output is the first chunk's). With run.truncate_prompts the text is cut at 77 tokens instead,
with a warning.
"""

from __future__ import annotations

from batchgen.engine.clip_encoders import ClipEncoders
from batchgen.engine.conditioning import Encoded
from batchgen.library_log import warn


def encode_plain(encoders: ClipEncoders, texts: list[str], truncate: bool, clip_skip: int) -> list[Encoded]:
    """Each text's encoding, in order, every text in its own encoder call."""
    chunks = {text: encoders.chunks([(text, 1.0)]) for text in texts}
    # diffusers' SD1/SD2 encode_prompt reads a skipped layer through `text_encoder.text_model`, which
    # transformers 5's CLIPTextModel no longer has; there the chunk path reads the same layer itself.
    by_diffusers = clip_skip == 1 or encoders.penultimate  # SDXL reads hidden_states, no final norm
    short = [t for t in texts if by_diffusers and (chunks[t].count == 1 or truncate)]
    for text in texts:
        if truncate and chunks[text].count > 1:
            tokenizer = encoders.pipe.tokenizer
            tokens = len(tokenizer(text, truncation=False, add_special_tokens=False).input_ids)
            warn(
                f"prompt '{text[:60]}...' is {tokens} tokens; the encoder reads the first 77 "
                "(run.truncate_prompts=true)"
            )
    encoded = {text: encoders.encode_short(text, clip_skip) for text in short}
    for text in texts:
        if text not in encoded:
            read = chunks[text].first() if truncate else chunks[text]
            encoded[text] = encoders.joined(*encoders.hidden_states(read, clip_skip))
    return [encoded[text] for text in texts]

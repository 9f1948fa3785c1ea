"""The tiny T5: a Unigram tokenizer over the fixed word list and a 2-layer encoder at T5-XXL's real width 4096."""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING

from batchgen.tiny.noise import reinit, seeded_generator
from batchgen.tiny.tokenizer import _WORDS

if TYPE_CHECKING:
    import torch
    from transformers import T5TokenizerFast

# Real T5's special ids, which the pipelines and attention masks rely on: pad 0, eos 1, unk 2.
PAD = "<pad>"
EOS = "</s>"
UNK = "<unk>"
SPACE = "▁"  # sentencepiece's word boundary, which the Metaspace pre-tokenizer prepends to every word
T5_WIDTH = 4096  # T5-XXL's d_model: FLUX's and SD3's context embedders read this width
MAX_TOKENS = 512  # real T5's model_max_length, FLUX's largest max_sequence_length
_LAYERS = 2
_HEADS = 4
_KV_WIDTH = 8
_FFN = 64
# Unigram picks the split with the best summed score: a whole word (one piece) always beats spelling it out,
# and a bare word beats its letters, so "catdog" reads "▁cat" "dog" and unknown words fall back to letters.
_WORD_SCORE = -4.0
_SPACE_SCORE = -6.0
_CHAR_SCORE = -10.0
# reinit draws embeddings at CLIP's std 0.02, while T5 initialises (and learns) them near std 1. At 0.02 the
# attention outputs swamp the token's own embedding in the pre-norm residual, so every position encodes the
# same average of the (mostly padding) sequence. x64 (a power of two: bit-exact) gives std 1.28.
_EMBEDDING_GAIN = 64.0


def _vocab() -> list[tuple[str, float]]:
    pieces: dict[str, float] = {PAD: 0.0, EOS: 0.0, UNK: 0.0, SPACE: _SPACE_SCORE}
    for word in _WORDS:
        pieces.setdefault(SPACE + word, _WORD_SCORE)
    for word in _WORDS:
        pieces.setdefault(word, _WORD_SCORE - 1.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault(char, _CHAR_SCORE)
    return list(pieces.items())


def write_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """Save a T5 tokenizer (tokenizer.json + config) into ``folder`` and return it as loaded back from there."""
    from transformers import T5TokenizerFast

    # T5Tokenizer (transformers 5) builds T5's own tokenizers pipeline around a given Unigram vocab: Metaspace
    # pre-tokenizer and decoder, "$A </s>" post-processor, unk id 2. No sentinels: nothing here generates text,
    # and 100 extra rows of the 4096-wide embedding would be most of its size.
    tokenizer = T5TokenizerFast(vocab=_vocab(), extra_ids=0, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder, local_files_only=True)


def t5_encoder(tokenizer: T5TokenizerFast, seed: str) -> torch.nn.Module:
    """A random T5 v1.1 encoder (gated GELU, as FLUX's and SD3's T5-XXL) at width 4096 with 2 tiny layers."""
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=_KV_WIDTH,
        d_ff=_FFN,
        num_layers=_LAYERS,
        num_heads=_HEADS,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5EncoderModel(config).eval()
    # T5LayerNorm keeps its init (ones, as T5's own): reinit does not know it.
    reinit_except(model, seeded_generator(seed), (T5LayerNorm,))
    model.get_input_embeddings().weight.mul_(_EMBEDDING_GAIN)
    return model


def reinit_except(model: torch.nn.Module, generator: torch.Generator, kept: tuple[type, ...]) -> None:
    """:func:`reinit` for models with norm layers it does not know (RMS norms): those keep their constructor init
    (ones, not random), every other parameterised module is drawn in module order from ``generator``."""
    import torch

    for path, module in model.named_modules():
        if isinstance(module, kept) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if not isinstance(
            module, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Embedding | torch.nn.LayerNorm | torch.nn.GroupNorm
        ):
            raise TypeError(f"reinit_except does not know how to initialise {path} ({type(module).__name__})")
        reinit(module, generator)

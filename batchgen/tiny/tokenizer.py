"""The tiny CLIP tokenizer: a fixed word list as byte-level BPE files, no download."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# A fixed English word list the tokenizer knows as single tokens; anything else falls back to byte pieces.
_WORDS = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "by", "for", "from", "under", "over",
    "portrait", "drawing", "ink", "style", "cartoon", "photo", "painting", "watercolor", "sketch",
    "pencil", "oil", "pastel", "grain", "grainy", "film", "anime", "pixel", "art", "render", "illustration",
    "cat", "dog", "bird", "horse", "fox", "owl", "man", "woman", "girl", "boy", "king", "queen", "knight",
    "robot", "dragon", "castle", "city", "forest", "mountain", "lake", "river", "sea", "beach", "garden",
    "house", "street", "tree", "flower", "sky", "cloud", "moon", "sun", "star", "night", "day", "rain",
    "snow", "winter", "summer", "red", "blue", "green", "yellow", "black", "white", "golden", "dark",
    "bright", "old", "young", "small", "big", "beautiful", "detailed", "highly", "quality", "best",
    "masterpiece", "lowres", "blurry", "ugly", "simple", "background", "light", "soft", "sharp", "closeup",
)  # fmt: skip
_BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SDXL_PAD = "!"  # SDXL's second tokenizer pads with "!" rather than the end token
MAX_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level map: printable bytes map to themselves, the rest to code points from 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _word_symbols(word: str) -> list[str]:
    byte_map = _bytes_to_unicode()
    chars = [byte_map[b] for b in word.encode()]
    return [*chars[:-1], chars[-1] + "</w>"]


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair with the lowest rank."""
    unknown = len(ranks)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, unknown), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == unknown:
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _bpe_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that turn every word into one token.

    A new merge ranks after all existing ones, so it never changes how an earlier word splits; each word
    only needs merges that join, left to right, the pieces the current merges leave.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_bpe(_word_symbols(word), ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return sorted(ranks, key=ranks.__getitem__)


def _bpe_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    # CLIP's id order: bytes, bytes + "</w>", merge results, then the two special tokens.
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *(a + b for a, b in merges), _BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_bpe_files(folder: Path) -> None:
    merges = _bpe_merges(_WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.dumps(_bpe_vocab(merges), ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_tokenizer(folder: Path, pad: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    write_bpe_files(folder)
    # Without model_max_length the tokenizer pads to a huge sentinel and the pipeline fails.
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, pad_token=pad, model_max_length=MAX_TOKENS)

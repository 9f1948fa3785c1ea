"""transformers 5 dropped CLIPTextModel's `text_model.` level (CLIPTextModelWithProjection keeps it), so a CLIP
module path may be spelled with or without it: by the loaded model, by a saved file, by a LoRA (kohya always
writes it). Every place that spells, compares or walks such a path asks here. No torch."""

from __future__ import annotations

import contextlib

LEVEL = "text_model."
# What sits under that level: a CLIP path that starts with one of them is spelled without it.
CHILDREN = frozenset({"embeddings", "encoder", "final_layer_norm"})


def without_level(path: str) -> str:
    return path.removeprefix(LEVEL)


def with_level(path: str) -> str:
    """The path with the level, whether or not it had it."""
    return LEVEL + without_level(path)


def kohya_spelling(path: str) -> str:
    """kohya's spelling of a CLIP path: the level written before its children, other paths (the projection) as
    they are."""
    return LEVEL + path if path.split(".", 1)[0] in CHILDREN else path


def spellings(path: str) -> tuple[str, str]:
    """The path as given, then its other spelling."""
    return (path, without_level(path) if path.startswith(LEVEL) else LEVEL + path)


def inner(encoder):
    """The module that holds a CLIP's layers: its text_model where transformers 4 nests it, else the encoder."""
    return getattr(encoder, LEVEL[:-1], encoder)


@contextlib.contextmanager
def level_alias(encoder, wanted: bool = True):
    """For the call only, `encoder.text_model` names the encoder itself where transformers 5 has no such level (code
    written for transformers 4 reads `text_model.final_layer_norm`: compel). Set outside nn.Module's registry and
    removed after, as diffusers' LoRA loader reads the same attribute to choose its key prefixes."""
    alias = wanted and not hasattr(encoder, LEVEL[:-1])
    if alias:
        object.__setattr__(encoder, LEVEL[:-1], encoder)
    try:
        yield encoder
    finally:
        if alias:
            object.__delattr__(encoder, LEVEL[:-1])

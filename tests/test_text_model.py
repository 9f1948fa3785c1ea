"""The one helper for transformers 5's missing `text_model.` level (batchgen/assets/text_model.py)."""

from __future__ import annotations

from types import SimpleNamespace

from batchgen.assets.text_model import inner, kohya_spelling, spellings, with_level, without_level


def test_both_spellings_of_a_clip_path() -> None:
    assert spellings("encoder.layers.0.mlp.fc1") == ("encoder.layers.0.mlp.fc1", "text_model.encoder.layers.0.mlp.fc1")
    assert spellings("text_model.encoder.layers.0") == ("text_model.encoder.layers.0", "encoder.layers.0")
    assert (with_level("encoder.x"), with_level("text_model.encoder.x")) == ("text_model.encoder.x",) * 2
    assert (without_level("text_model.encoder.x"), without_level("encoder.x")) == ("encoder.x",) * 2


def test_kohya_writes_the_level_before_its_children_only() -> None:
    assert kohya_spelling("encoder.layers.0.self_attn.q_proj") == "text_model.encoder.layers.0.self_attn.q_proj"
    assert kohya_spelling("final_layer_norm") == "text_model.final_layer_norm"
    assert kohya_spelling("text_projection") == "text_projection"
    assert kohya_spelling("text_model.encoder.layers.0") == "text_model.encoder.layers.0"


def test_the_layers_of_either_transformers_version() -> None:
    nested = SimpleNamespace(text_model=SimpleNamespace(final_layer_norm="norm4"))
    flat = SimpleNamespace(final_layer_norm="norm5")
    assert (inner(nested).final_layer_norm, inner(flat).final_layer_norm) == ("norm4", "norm5")

"""Oracle for prompt_syntax=compel: batchgen's image equals plain diffusers given compel's own embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from compel import CompelForSD, CompelForSDXL, DiffusersTextualInversionManager

from batchgen.engine.worker import Renderer
from batchgen.spec import EmbeddingFile, Job, LoraState, ModelSpec
from batchgen.tiny import tiny_root
from tests.reference import load_embedding
from tests.test_oracle import MAX_PIXEL_DIFF

LONG = " ".join(["a castle at night with towers and a river and the moon over the hills"] * 3)
TI = {"tiny_sd1": "grainy", "tiny_sdxl": "cartoona"}  # each model's two-vector TI


def _reference(model: str, cache: Path, prompt: str, negative: str, seed: int) -> np.ndarray:
    """What a diffusers user with compel writes: CompelForSD/CompelForSDXL (their negative padded to the prompt's
    length), the embeddings handed to the pipeline, the seed's CPU generator."""
    from diffusers import DiffusionPipeline

    root = tiny_root(model, cache)
    pipe = DiffusionPipeline.from_pretrained(str(root / "main" / model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for path in sorted((root / "embedding").iterdir()):
        load_embedding(pipe, path, f"<{path.stem}>")
    manager = DiffusersTextualInversionManager(pipe)
    compel = (CompelForSDXL if "xl" in model else CompelForSD)(pipe, textual_inversion_manager=manager)
    with torch.no_grad():
        c = compel(prompt, negative_prompt=negative)
    kwargs = {"prompt_embeds": c.embeds, "negative_prompt_embeds": c.negative_embeds}
    if c.pooled_embeds is not None:
        kwargs |= {"pooled_prompt_embeds": c.pooled_embeds, "negative_pooled_prompt_embeds": c.negative_pooled_embeds}
    image = pipe(
        **kwargs,
        num_inference_steps=3,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sdxl"])
def test_compel_images_equal_diffusers_with_compels_embeddings(tiny_cache: Path, model: str) -> None:
    root = tiny_root(model, tiny_cache)
    tis = tuple(EmbeddingFile(p.stem, p) for p in sorted((root / "embedding").iterdir()))
    spec = ModelSpec(model, "sdxl" if "xl" in model else "sd-1", root / "main" / model, "", embeddings=tis)
    cases = [
        (f"a castle+ at night, (<{TI[model]}> style)1.2", "blurry-, ugly", 3),
        ('("a castle at night", "a dog in the snow").blend(0.7, 0.3)', "(blurry)0.5", 4),
        (LONG, "blurry", 5),  # three chunks against one: the negative padded with empty chunks
    ]
    jobs = [
        Job(f"{i:016x}", model, prompt, negative, seed, 3, 7.5, 64, 64, prompt_syntax="compel", lora_state=LoraState())
        for i, (prompt, negative, seed) in enumerate(cases)
    ]
    results = list(Renderer({model: spec}).render(jobs))
    assert [r.error for r in results] == [""] * len(cases)
    for result, (prompt, negative, seed) in zip(results, cases, strict=True):
        ours = np.asarray(result.image, dtype=np.int16)
        theirs = _reference(model, tiny_cache, prompt, negative, seed)
        assert np.abs(ours - theirs).max() <= MAX_PIXEL_DIFF, prompt

"""Full-size SD3.5-large and FLUX.1-dev on the meta device (built from the component configs batchgen ships, no
memory needed): diffusers/PEFT-named LoRAs over every Linear of their transformers and text encoders map
completely, and tell their base apart as far as their names can."""

from __future__ import annotations

from functools import cache

import pytest

from batchgen.assets.architecture import Architecture, ModuleRef, model_architecture
from batchgen.assets.bases import BY_NAME, lora_bases
from batchgen.assets.lora_formats import group_by_module, layer_evidence, map_to_modules
from batchgen.assets.loras import Shape

RANK = 16


@cache
def _architecture(base: str) -> Architecture:
    return model_architecture(BY_NAME[base].shipped_configs, base)


def _peft_keys(arch: Architecture, components: tuple[str, ...]) -> dict[str, Shape]:
    keys = {}
    for component in components:
        for path, shape in arch.modules[component].items():
            if len(shape) != 2:
                continue  # patch embeddings are convolutions; PEFT trainers target the Linears
            keys[f"{component}.{path}.lora_A.weight"] = Shape((RANK, shape[1]))
            keys[f"{component}.{path}.lora_B.weight"] = Shape((shape[0], RANK))
    return keys


@pytest.mark.parametrize(
    ("base", "blocks", "linears"),
    # FLUX: 14 per double block, 6 per single, 10 around them; SD3.5: the last block drops its context output
    [("flux", (19, 38), 19 * 14 + 38 * 6 + 10), ("sd-3", (38, 0), 37 * 14 + 11 + 7)],
)
def test_full_size_transformers_are_the_real_ones(base: str, blocks: tuple[int, int], linears: int) -> None:
    modules = _architecture(base).modules["transformer"]
    double = {p.split(".")[1] for p in modules if p.startswith("transformer_blocks.")}
    single = {p.split(".")[1] for p in modules if p.startswith("single_transformer_blocks.")}
    assert (len(double), len(single)) == blocks
    assert sum(len(shape) == 2 for shape in modules.values()) == linears
    width = 3072 if base == "flux" else 2432
    assert modules["transformer_blocks.0.attn.to_q"] == (width, width)
    assert modules["context_embedder"] == (width, 4096)  # T5-XXL's width, as the record says


@pytest.mark.parametrize("base", ["flux", "sd-3"])
def test_peft_loras_over_every_linear_map_completely(base: str) -> None:
    arch = _architecture(base)
    components = tuple(c for c in arch.modules if c != "text_encoder_2" or base == "sd-3")
    keys = _peft_keys(arch, components)
    fmt, groups = group_by_module(keys)
    assert fmt == "peft"
    mapped, unmapped = map_to_modules(groups, fmt, arch.modules, arch.unet_config)
    assert unmapped == []
    wanted = {ModuleRef(c, p) for c in components for p, shape in arch.modules[c].items() if len(shape) == 2}
    assert set(mapped) == wanted
    # FLUX's single blocks name it; SD3's CLIP-G layers (1280 wide) name it.
    assert lora_bases(layer_evidence(groups, fmt)) == {base}
    # A transformer-only SD3 LoRA: its MMDiT blocks are named as FLUX's double blocks are, so it is undecided and
    # maps against the model it is used with (test_a_flux_lora_does_not_fit_sd3_and_the_reverse).
    _, alone = group_by_module(_peft_keys(arch, ("transformer",)))
    assert lora_bases(layer_evidence(alone, fmt)) == ({"flux"} if base == "flux" else {"flux", "sd-3"})


def test_a_flux_lora_does_not_fit_sd3_and_the_reverse() -> None:
    flux, sd3 = _architecture("flux"), _architecture("sd-3")
    for own, other in ((flux, sd3), (sd3, flux)):
        keys = _peft_keys(own, ("transformer",))
        fmt, groups = group_by_module(keys)
        mapped, unmapped = map_to_modules(groups, fmt, other.modules, other.unet_config)
        # 3072 against 2432 wide: nothing of one fits the other, so it is refused, never half applied
        assert not mapped and sorted(unmapped) == sorted(groups)


def test_an_undecided_transformer_lora_that_fits_nothing_is_the_other_bases(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from batchgen.assets.hashing import HashCache
    from batchgen.assets.loras import inspect_lora
    from batchgen.spec import LoraFile

    sd3, flux = _architecture("sd-3"), _architecture("flux")
    path = tmp_path / "sd35_style.safetensors"
    tensors = {}
    for key, shape in _peft_keys(sd3, ("transformer",)).items():
        if ".transformer_blocks.0." in key:
            tensors[key] = torch.zeros(shape.shape)
    save_file(tensors, str(path))
    hashes = HashCache(tmp_path / "hashes.json")
    info, mapped = inspect_lora(LoraFile("sd35_style", path), flux, hashes)
    assert (info.base, mapped) == ("sd-3", None)  # skipped on FLUX.1, as an SD3 LoRA
    info, mapped = inspect_lora(LoraFile("sd35_style", path), sd3, hashes)
    assert info.base is None and len(mapped) == 14  # undecided by name, and it fits SD3.5-large: used

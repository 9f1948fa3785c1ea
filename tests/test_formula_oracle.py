"""Formula oracle: batchgen's LyCORIS patching renders what the published formulas give, applied by hand.

test_oracle.py checks kohya LoRAs against diffusers' own loader, which knows no LoHa, LoKr, DoRA, Tucker cores or
full diffs. Here every LyCORIS layer type is written with write_lycoris, rendered by batchgen, and compared with
a plain diffusers pipeline whose weights this file patches itself, from the formulas in LyCORIS
(lycoris/functional/*.py) and not through batchgen.assets.lora_layers, so that a shared mistake cannot cancel out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from batchgen.config import compose_config
from batchgen.tiny import LYCORIS_KINDS, tiny_root, write_lycoris
from tests.reference import render_row

MAX_PIXEL_DIFF = 2  # out of 255: float tolerance between two correct implementations
MIN_LORA_EFFECT = 0.5  # out of 255, mean over pixels: below this a wrong formula could pass unnoticed
PROMPT = "a castle at night"  # no TI trigger: embeddings are test_oracle.py's business
SPLIT = "{unet: 0.8, text_encoder: 0.3}"  # Hydra override syntax; 0.8/0.3 in the manifest
# Kinds whose file leaves the text encoders alone: it covers a UNet-only file, and so gets no split stack.
UNET_ONLY = frozenset({"locon_mid"})
PREFIX_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}

# UNet modules both tiny models have: attention linears (self and cross), 3x3 resnet convs, and a 1x1
# conv_shortcut. proj_in is a 1x1 conv in SD1 and a linear in SDXL, which covers both spellings of a 1x1 map.
UNET_TARGETS = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.1.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.resnets.0.conv2",
)
TEXT_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Other test processes may share the 2 cores; oversubscription makes every render slower, not faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _demo_stacks_removed() -> list[str]:
    # Only the stacks written here should render; the demo sweep's own list changes as the tiny LoRAs grow.
    stacks = compose_config(["+sweep=styles"]).config.sweep.stacks
    return [f"~sweep.stacks.{name}" for name in stacks if name != "none"]


def _pipeline(model: str, cache: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_root(model, cache) / "main" / model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_path(encoder: torch.nn.Module, suffix: str) -> str:
    # transformers 5 dropped CLIPTextModel's text_model level but kept it in the projection variant (SDXL's second
    # encoder): look the module up by its tail rather than assume either layout.
    (path,) = [p for p, _ in encoder.named_modules() if p == suffix or p.endswith("." + suffix)]
    return path


def _targets(pipe, kind: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """write_lycoris targets with the real modules' shapes."""
    targets = {"lora_unet": {p: tuple(pipe.unet.get_submodule(p).weight.shape) for p in UNET_TARGETS}}
    if kind in UNET_ONLY:
        return targets
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    encoders = (
        {"lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2} if sdxl else {"lora_te": pipe.text_encoder}
    )
    for prefix, encoder in encoders.items():
        paths = [_text_path(encoder, suffix) for suffix in TEXT_TARGETS]
        targets[prefix] = {p: tuple(encoder.get_submodule(p).weight.shape) for p in paths}
    return targets


def _key(prefix: str, path: str) -> str:
    # kohya spelling: text encoder layers always under text_model, dots as underscores.
    if prefix != "lora_unet":
        path = "text_model." + path.removeprefix("text_model.")
    return f"{prefix}_{path.replace('.', '_')}"


# --- the published formulas, in float64 -----------------------------------------------------------------------------


def _scale(t: dict[str, torch.Tensor], rank: int) -> float:
    return float(t["alpha"]) / rank


def _lora(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LoRA/LoCon: up @ down · alpha/r with conv factors flattened; with lora_mid, LyCORIS's Tucker rebuild
    einsum('m n ..., i m, n j -> i j ...', mid, up, down) (functional/general.py tucker_weight_from_conv)."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    rank = down.shape[0]
    up, flat_down = up.reshape(up.shape[0], rank), down.reshape(rank, -1)
    if "lora_mid.weight" in t:
        delta = torch.einsum("mnhw,im,nj->ijhw", t["lora_mid.weight"], up, flat_down)
    else:
        delta = up @ flat_down
    return delta.reshape(shape) * _scale(t, rank)


def _loha(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LoHa: (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r. With Tucker cores each half is LyCORIS's
    einsum('i j ..., j r, i p -> p r ...', t, w_b, w_a) (functional/loha.py HadaWeightTucker), w_a [r, out]."""
    rank = t["hada_w1_b"].shape[0]
    if "hada_t1" in t:
        halves = [
            torch.einsum("ijhw,jr,ip->prhw", t[f"hada_t{n}"], t[f"hada_w{n}_b"], t[f"hada_w{n}_a"]) for n in "12"
        ]
    else:
        halves = [t[f"hada_w{n}_a"] @ t[f"hada_w{n}_b"] for n in "12"]
    return (halves[0] * halves[1]).reshape(shape) * _scale(t, rank)


def _lokr(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LoKr: kron(w1, w2_a @ w2_b) · alpha/r, r = w2_b's rank; a conv w2 is [b, d, kh, kw] and w1 gets unit kernel
    dims, the 4-D kron of LyCORIS's make_kron (functional/lokr.py)."""
    w1, w2_a, w2_b = t["lokr_w1"], t["lokr_w2_a"], t["lokr_w2_b"]
    w2 = w2_a @ w2_b
    if len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
        w1 = w1.reshape(*w1.shape, 1, 1)
    return torch.kron(w1, w2) * _scale(t, w2_b.shape[0])


def _delta(kind: str, t: dict[str, torch.Tensor], w0: torch.Tensor) -> torch.Tensor:
    """ΔW at strength 1, so that strength w patches W0 + w·ΔW."""
    if kind == "full":
        return t["diff"].reshape(w0.shape)
    if kind in ("loha", "loha_tucker"):
        return _loha(t, w0.shape)
    if kind == "lokr":
        return _lokr(t, w0.shape)
    delta = _lora(t, w0.shape)
    if kind != "dora":
        return delta
    # DoRA (LyCORIS apply_dora_scale, wd_on_output=False): V = W0 + ΔW, one magnitude per input channel, the norm of
    # V taken over every dim but dim 1; strength w scales the difference the decomposition makes.
    merged = w0 + delta
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    norm = norm.reshape(1, -1, *[1] * (merged.dim() - 2))
    return t["dora_scale"].reshape(norm.shape) * merged / norm - w0


def _reference_image(pipe, folder: Path, targets: dict, row: pd.Series) -> np.ndarray:
    """Patch the fresh pipeline by hand for this manifest row, render it, and put the weights back."""
    saved = []
    with torch.no_grad():
        for entry in filter(None, row["loras"].split(";")):
            name, weights = entry.split(":")
            unet_w, _, te_w = weights.partition("/")
            strength = {"unet": float(unet_w), "text": float(te_w or unet_w)}
            kind = name.removeprefix("f_")
            tensors = {k: v.to(torch.float64) for k, v in load_file(folder / f"{name}.safetensors").items()}
            for prefix, paths in targets[kind].items():
                component = PREFIX_COMPONENT[prefix]
                w = strength["unet" if component == "unet" else "text"]
                for path in paths:
                    key = _key(prefix, path)
                    layer = {k.removeprefix(key + "."): v for k, v in tensors.items() if k.startswith(key + ".")}
                    assert layer, f"{name}: no tensors under {key}"
                    module = getattr(pipe, component).get_submodule(path)
                    saved.append((module, module.weight.clone(), None if module.bias is None else module.bias.clone()))
                    w0 = module.weight.to(torch.float64)
                    module.weight.copy_(w0 + w * _delta(kind, layer, w0))
                    # write_lycoris writes diff_b for bias-free modules too (to_q, to_v): nothing to add it to.
                    if "diff_b" in layer and module.bias is not None:
                        module.bias.copy_(module.bias.to(torch.float64) + w * layer["diff_b"])
        image = render_row(pipe, row)
        # Backwards, so a module patched by two LoRAs of one stack ends at its own pristine weight.
        for module, weight, bias in reversed(saved):
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
    return np.asarray(image, dtype=np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sdxl"])
def test_lycoris_kinds_match_published_formulas(run_cli, tiny_cache: Path, tmp_path: Path, model: str) -> None:
    pipe = _pipeline(model, tiny_cache)
    folder = tmp_path / "lycoris"
    folder.mkdir()
    targets = {}
    stacks = []
    for i, kind in enumerate(LYCORIS_KINDS):
        targets[kind] = _targets(pipe, kind)
        write_lycoris(folder / f"f_{kind}.safetensors", targets[kind], kind, seed=i)
        stacks.append(f"+sweep.stacks.{kind}={{f_{kind}: [1.0, 0.6]}}")
        if kind not in UNET_ONLY:
            stacks.append(f"+sweep.stacks.{kind}_split={{f_{kind}: {SPLIT}}}")
    code, _, err = run_cli(
        "+sweep=styles",
        *_demo_stacks_removed(),
        f"sweep.models=[{model}]",
        f"models.{model}.loras=['{folder}']",
        f"sweep.prompts=['{PROMPT}']",
        "sweep.seeds=[1]",
        "sweep.steps=4",
        *stacks,
    )
    assert code == 0, err
    run = Path("runs/styles")
    table = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    # none, then every kind at two weights, plus a split weight where the file has text encoder layers
    assert len(table) == 1 + 2 * len(LYCORIS_KINDS) + len(LYCORIS_KINDS) - len(UNET_ONLY)
    assert set(table["status"]) == {"ok"}, table[["loras", "error"]]
    assert {"f_lokr:1", "f_lokr:0.6", "f_lokr:0.8/0.3"} <= set(table["loras"])

    ours = {
        row.loras: np.asarray(Image.open(run / row.image).convert("RGB"), dtype=np.int16) for row in table.itertuples()
    }
    diffs, effects = {}, {}
    for _, row in table.iterrows():
        theirs = _reference_image(pipe, folder, targets, row)
        diffs[row["loras"]] = int(np.abs(ours[row["loras"]] - theirs).max())
        effects[row["loras"]] = float(np.abs(ours[row["loras"]] - ours[""]).mean())
    # The comparison proves nothing unless every LoRA and weight visibly moves the image away from the base.
    weak = {loras: effect for loras, effect in effects.items() if loras and effect <= MIN_LORA_EFFECT}
    assert not weak, f"mean change from the base image: {weak}"
    # f_full's three states (1, 0.6, 0.8/0.3) patch the same biases in one run, so each write must start from the
    # original bias: when bias deltas accumulated into the pristine copy on fp32 CPU, every state after the first
    # missed by 18-58/255 here (fixed in 736b971). Only full diffs carry a bias delta (diff_b).
    bad = {loras: diff for loras, diff in diffs.items() if diff > MAX_PIXEL_DIFF}
    assert not bad, f"max pixel difference per stack: {diffs}"

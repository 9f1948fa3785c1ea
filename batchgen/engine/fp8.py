"""`run.weights=fp8`: the denoiser's Linear weights stored in float8 (e4m3), computed in bf16, LoRAs exact.

What is stored in fp8: the weight of every plain `torch.nn.Linear` of the denoiser (FLUX.1's and SD3's
transformers are almost all Linear weights; a UNet's convolutions stay in bf16), modulation Linears included, as
flux1-dev-fp8.safetensors and ComfyUI's fp8 weight type store them, so a bf16 folder under fp8 renders what its
own fp8 file renders. Biases, norms, embeddings and convolutions stay bf16. A weight loaded in fp8 (an fp8 single
file) stays the file's bytes; any other is rounded to fp8 once, at load (`store_fp8`). Everything computes in bf16,
whatever run.dtype says: a Linear's forward upcasts its weight (exactly: every e4m3 value is a bf16 value) for the
matmul.

Why not diffusers' layerwise casting (`apply_layerwise_casting`, `ModelMixin.enable_layerwise_casting`, read in
0.42.1): its hook casts the whole module, bias included, with `module.to(dtype)` before and after every forward, so
each call swaps every parameter's storage twice (a weight patched in place would be patched in fp8 between calls,
and torch.compile would see new storages); it cannot be removed (`deinitalize_hook` raises); and by the models'
`_skip_layerwise_casting_patterns` it keeps FLUX.1's modulation Linears in bf16 (15.2 GB of transformer instead of
11.9). Here the weight is cast in the forward, functionally, and nothing is written back. diffusers' hook registry
is used for one thing: a hook under diffusers' own name whose `compute_dtype` `ModelMixin.dtype` reports, as it does
for its own casting, so the pipelines read bf16 from the denoiser, not float8.

LoRAs: a delta is never rounded into fp8 storage. The fp8 weight is never written; a patched module computes with
    W = bf16(fp32(W8) + sum_i w_i dW_i)
built in its forward: for LoRA layers from their low-rank factors (all of a stack's concatenated, U @ D, added in
fp32 by one addmm), for every other layer type (LoHa, LoKr, full diffs, DoRA, whose delta needs W0) as the bf16
weight itself, computed once at the switch. Removing the stack drops what was attached: the fp8 bytes are the
loaded ones throughout, so restore is bitwise by construction. Measured on a FLUX.1-size 3072x3072 Linear (weights
N(0, 0.02) rounded to fp8, a rank-16 LoRA; tests/test_fp8.py `test_lora_choice_figures`): the patched weight is the
same bf16 bits either way it is held, 0.00024 at most (half a bf16 step at its largest values) from fp32 W8 + ΔW;
rounded into fp8 it would be 0.0020 off, 8 times that, and a delta below fp8's resolution would vanish (asserted).
Memory while patched: (a) the module's weight held in bf16, 18.9 MB; (b) fp8 plus the factors in fp32, 9.4 + 0.39 MB.
(b) is chosen: a typical FLUX.1 LoRA touches nearly every Linear, and holding them in bf16 while
patched would give back almost all of fp8's memory (23.8 GB of transformer instead of 11.9), which is the reason
to use fp8. The cost is time: each forward of a patched module builds its fp32 weight (one addmm), where a bf16
weight would be read as is; the non-LoRA types fall back to (a) and hold their modules' weights in bf16.

torch.compile: what a forward reads is class attributes (None) or tensors, so dynamo guards on them. Switching
between stacks that patch the same modules, weights or files, compiles nothing; each new set of patched modules
(and the first change of a stack's total rank, after which the rank is dynamic) compiles the denoiser once more.
Outside fp8 the patcher writes weights in place and no switch compiles anything (tests/test_compile.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from batchgen.assets.lora_layers import LayerPatch

STORAGE = torch.float8_e4m3fn
COMPUTE = torch.bfloat16
# diffusers' name for its layerwise casting hook: ModelMixin.dtype (get_parameter_dtype) reports such a hook's
# compute_dtype rather than its first parameter's.
_DIFFUSERS_CASTING_HOOK = "layerwise_casting"


def compute_dtype(weights: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model renders in under run.weights: bf16 under fp8, whatever run.dtype says, else `dtype`."""
    return COMPUTE if weights == "fp8" else dtype


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is stored in fp8 and whose forward computes in bf16, with the LoRA stack attached by
    `patch` (never written into the weight)."""

    # Class attributes: an unpatched module reads these, a patched one its own, and dynamo guards every read (it
    # missed an instance-dict lookup in a test, compiling a stale weight).
    lora_up: torch.Tensor | None = None  # fp32 [out, R]: every LoRA's up, times its scale and weight
    lora_down: torch.Tensor | None = None  # fp32 [R, in]
    patched_weight: torch.Tensor | None = None  # bf16 [out, in]: a stack with other layer types, built whole
    patched_bias: torch.Tensor | None = None  # bf16 [out]: a full diff's bias delta added to the bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.patched_bias is None else self.patched_bias.to(self.bias.device)
        return F.linear(x, self.compute_weight(), bias)

    def compute_weight(self) -> torch.Tensor:
        weight = self.weight
        if self.patched_weight is not None:
            return self.patched_weight.to(weight.device)
        if self.lora_up is not None:
            # Summed in fp32 and rounded once, as the patcher writes a half-precision weight.
            up, down = self.lora_up.to(weight.device), self.lora_down.to(weight.device)
            return torch.addmm(weight.to(torch.float32), up, down).to(COMPUTE)
        return weight.to(COMPUTE)


def _compute_dtype_hook(dtype: torch.dtype):
    """A diffusers ModelHook that casts nothing: it tells ModelMixin.dtype what the model computes in."""
    from diffusers.hooks.hooks import ModelHook  # lazy: diffusers costs seconds to import

    hook = ModelHook()
    hook.compute_dtype = dtype
    return hook


def linear_weight_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys stored in fp8: the weight of each plain Linear (works on the meta device)."""
    return {f"{name}.weight" for name, module in model.named_modules() if type(module) is torch.nn.Linear}


def fp8_state(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A converted single file's state for `model` (a meta model): its Linear weights in fp8, every other tensor in
    bf16. A tensor the file holds in fp8 passes as it is (`.to` of its own dtype is no copy), so an fp8 file never
    has a bf16 copy of its Linear weights; a non-Linear tensor it holds in fp8 is upcast exactly."""
    linear = linear_weight_keys(model)
    return {key: value.to(STORAGE if key in linear else COMPUTE) for key, value in state.items()}


@torch.no_grad()
def store_fp8(denoiser: torch.nn.Module) -> int:
    """At load, before the model moves to its device: every plain Linear of the denoiser becomes an Fp8Linear (a
    weight already in fp8 kept as it is, any other rounded once), the rest of it bf16. Returns the modules made."""
    made = 0
    for module in denoiser.modules():
        if type(module) is torch.nn.Linear:
            weight = module.weight
            if weight.dtype != STORAGE:
                module.weight = torch.nn.Parameter(weight.detach().to(STORAGE), requires_grad=False)
            module.__class__ = Fp8Linear
            made += 1
    for param in denoiser.parameters():
        if param.dtype not in (STORAGE, COMPUTE):
            param.data = param.data.to(COMPUTE)
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(
        _compute_dtype_hook(COMPUTE), _DIFFUSERS_CASTING_HOOK
    )
    return made


@torch.no_grad()
def patch(module: Fp8Linear, layers: list[tuple[LayerPatch, float]]) -> None:
    """Make `module` compute with W0 + sum of weight * ΔW over `layers` (none: W0 itself); its fp8 weight and bias
    are never written, so whatever was attached before is simply replaced."""
    for name in ("lora_up", "lora_down", "patched_weight", "patched_bias"):
        module.__dict__.pop(name, None)
    if not layers:
        return
    weight = module.weight
    device = weight.device
    factors = [layer.low_rank() for layer, _ in layers]
    plain = all(
        f is not None and f[0].shape[0] == weight.shape[0] and f[1].shape[1] == weight.shape[1] for f in factors
    )
    if plain and not any(layer.bias_delta() is not None for layer, _ in layers):
        # A stack of LoRAs is one low-rank product: [w1 s1 up1 | w2 s2 up2] @ [down1; down2].
        scaled = [up.to(device) * (scale * w) for (up, _, scale), (_, w) in zip(factors, layers, strict=True)]
        module.lora_up = torch.cat(scaled, 1)
        module.lora_down = torch.cat([down.to(device) for _, down, _ in factors], 0)
        return
    w0 = weight.to(torch.float32)
    target = w0.clone()
    bias = module.bias.to(torch.float32, copy=True) if module.bias is not None else None
    changed_bias = False
    for layer, w in layers:
        target.add_(layer.delta(w0), alpha=w)
        delta = layer.bias_delta()
        if delta is not None and bias is not None:
            bias.add_(delta.to(device), alpha=w)
            changed_bias = True
    module.patched_weight = target.to(COMPUTE)
    if changed_bias:
        module.patched_bias = bias.to(module.bias.dtype)

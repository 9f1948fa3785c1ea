"""Fused LoRA weight patching: W = W0 + sum_i w_i * dW_i, in place, restored bit for bit.

Every module's target weight is computed from its pristine copy, never by adding to or subtracting from the
current weight, so switching A -> B -> A gives exactly A's bits and removing every LoRA gives exactly W0.
Only modules whose contributions change are touched when the stack or a weight changes. A module with no
contribution holds W0 itself, so adding a stack to it reads nothing back. A Linear stored in fp8
(run.weights=fp8) is never written: its stack is attached beside the weight (engine/fp8.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from batchgen.assets.architecture import ModuleRef, module_shapes
from batchgen.assets.block_weights import block_of
from batchgen.assets.lora_layers import LayerPatch
from batchgen.assets.loras import read_lora_layers
from batchgen.engine.fp8 import Fp8Linear
from batchgen.engine.fp8 import patch as patch_fp8
from batchgen.engine.pristine import PristineStore
from batchgen.spec import LoraState

Contribution = tuple[str, float]  # (LoRA name, weight) in one module
# What _applied says of a module while it is being written: equal to no stack (nan != nan), so never skipped.
_UNKNOWN: tuple[Contribution, ...] = (("", float("nan")),)


def load_lora_layers(
    path: Path, components: dict[str, torch.nn.Module], unet_config: dict, device: torch.device | str
) -> dict[ModuleRef, LayerPatch]:
    """Read a LoRA file once and keep it as low-rank factors on the device, keyed by the module it patches."""
    shapes = {name: module_shapes(module) for name, module in components.items()}
    return {ref: layer.to(device) for ref, layer in read_lora_layers(path, shapes, unet_config).items()}


class WeightPatcher:
    """Owns the LoRA state of one loaded model: which contributions are in which module's weight."""

    def __init__(
        self, components: dict[str, torch.nn.Module], checkpoint: Path | None = None, base: str | None = None
    ) -> None:
        self.components = components
        self.base = base  # for block weights: which LoRA Block Weight ids its modules have
        self.loras: dict[str, dict[ModuleRef, LayerPatch]] = {}
        # Each LoRA's modules per component, so that a switch walks each module once, not once per component.
        self._refs: dict[str, dict[str, list[ModuleRef]]] = {}
        self.pristine = PristineStore(checkpoint, components)
        self._applied: dict[ModuleRef, tuple[Contribution, ...]] = {}
        self.touched_last = 0  # modules rewritten by the last apply(): what a stack switch cost
        self._bias_changed: set[ModuleRef] = set()  # in-place writes whose bias differs from the original
        # get_submodule walks the path with hasattr at every level; a switch rewrites the same modules again and again.
        self._modules: dict[ModuleRef, torch.nn.Module] = {}

    def add(self, name: str, layers: dict[ModuleRef, LayerPatch]) -> None:
        """The LoRA's layers under `name`; adding a name again replaces them (its file was rewritten, --watch): every
        module holding the old layers is rewritten from its pristine copy by the next apply()."""
        if name in self.loras:
            for ref, contributions in self._applied.items():
                if any(lora == name for lora, _ in contributions):
                    self._applied[ref] = _UNKNOWN
        self.loras[name] = layers
        by_component: dict[str, list[ModuleRef]] = {}
        for ref in layers:
            by_component.setdefault(ref.component, []).append(ref)
        self._refs[name] = by_component

    def apply(self, state: LoraState) -> None:
        """Make the weights equal W0 plus exactly this state's contributions."""
        wanted: dict[ModuleRef, list[Contribution]] = {}
        for component, parts in state.components:
            for part in parts:
                factors = dict(part.blocks)
                for ref in self._refs[part.lora].get(component, ()):
                    weight = part.weight
                    if factors:
                        # The extension's rule: the module's block weight times the LoRA's.
                        weight *= factors.get(block_of(component, ref.path, self.base), 1.0)
                    if weight != 0.0:  # W0 + 0 * dW is W0: skip the work, keep the bits
                        wanted.setdefault(ref, []).append((part.lora, weight))
        changed = [
            ref for ref in {*self._applied, *wanted} if self._applied.get(ref, ()) != tuple(wanted.get(ref, ()))
        ]
        for ref in changed:
            self._write(ref, tuple(wanted.get(ref, ())))
        self.touched_last = len(changed)

    def restore(self) -> None:
        self.apply(LoraState())

    @torch.no_grad()
    def _write(self, ref: ModuleRef, contributions: tuple[Contribution, ...]) -> None:
        module = self._modules.get(ref)
        if module is None:
            module = self._modules[ref] = self.components[ref.component].get_submodule(ref.path)
        fp8 = isinstance(module, Fp8Linear)
        if ref not in self.pristine and not fp8:  # fp8 storage is never written (engine/fp8.py): nothing to keep
            self.pristine.keep(ref, module)
        layers = [(self.loras[name][ref], weight) for name, weight in contributions]
        holds_original = ref not in self._applied
        # Until this write completes the module's bits are unknown: a failure part-way must not leave it looking
        # original (or as its old stack), so the next write of it restores from the pristine copy first.
        self._applied[ref] = _UNKNOWN
        if fp8:
            patch_fp8(module, layers)  # a delta would round away in fp8: the stack rides beside the weight
        elif module.weight.dtype == torch.float32 and not any(layer.needs_pristine for layer, _ in layers):
            self._write_in_place(ref, module, layers, holds_original)
        else:
            self._write_via_fp32(ref, module, layers)
        if contributions:
            self._applied[ref] = contributions
        else:
            self._applied.pop(ref, None)

    def _write_in_place(self, ref: ModuleRef, module: torch.nn.Module, layers: list, holds_original: bool) -> None:
        """fp32 weights: restore the original bits into the weight itself, then add each delta there.

        No full-size temporary is allocated, and the same sequence of operations from the same bits gives the
        same result every time, which is what makes A -> B -> A exact.
        """
        if not holds_original:  # a weight with no contribution already holds them (the first patch, say)
            self.pristine.restore_into(ref, "weight", module.weight)
        has_bias = getattr(module, "bias", None) is not None
        # Only full-diff layers change a bias; a bias no layer touched still holds its original bits.
        if has_bias and ref in self._bias_changed:
            self.pristine.restore_into(ref, "bias", module.bias)
            self._bias_changed.discard(ref)
        for layer, weight in layers:
            layer.add_to(module.weight, alpha=weight)
            bias_delta = layer.bias_delta()
            if bias_delta is not None and has_bias:
                module.bias.add_(bias_delta.to(module.bias.device), alpha=weight)
                self._bias_changed.add(ref)

    def _write_via_fp32(self, ref: ModuleRef, module: torch.nn.Module, layers: list) -> None:
        """Half-precision weights (and DoRA, whose delta needs W0): compute in fp32, then cast once."""
        weight0, bias0 = self.pristine.get(ref, "weight"), self.pristine.get(ref, "bias")
        self._bias_changed.discard(ref)  # the bias is rewritten from its original below
        device = module.weight.device
        w0 = weight0.to(device, torch.float32)
        # copy=True: on an fp32 CPU model .to() may hand back the pristine tensor itself, and add_ would corrupt it.
        target = w0.clone()
        bias_target = bias0.to(device, torch.float32, copy=True) if bias0 is not None else None
        for layer, weight in layers:
            target.add_(layer.delta(w0), alpha=weight)
            bias_delta = layer.bias_delta()
            if bias_delta is not None and bias_target is not None:
                bias_target.add_(bias_delta.to(device), alpha=weight)
                self._bias_changed.add(ref)
        module.weight.copy_(target.to(module.weight.dtype))
        if bias_target is not None:
            module.bias.copy_(bias_target.to(module.bias.dtype))

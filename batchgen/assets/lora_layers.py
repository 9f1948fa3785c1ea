"""The weight delta ΔW of one module, one class per LoRA layer type (LoRA/LoCon, LoHa, LoKr, DoRA, full diff).

Each layer takes the module's tensors keyed by their kohya/LyCORIS suffix, keeps them as fp32 factors, and builds
the full-size ΔW only when `delta` is called. Applying a layer at strength w gives W0 + w * delta(W0).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class LayerPatch(ABC):
    kind: ClassVar[str]
    required: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        _check_suffixes(self.kind, set(tensors), self.required, self.optional)
        self._tensors = {name: t.detach().to(dtype=torch.float32) for name, t in tensors.items()}

    @abstractmethod
    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """fp32 ΔW shaped like `weight`, the pristine module weight (fp32, on the factors' device)."""

    # True when ΔW depends on the pristine weight (DoRA), which in-place patching no longer has at hand.
    needs_pristine: ClassVar[bool] = False

    def add_to(self, target: torch.Tensor, alpha: float) -> None:
        """target += alpha · ΔW in place; target is fp32 and shaped like the module's weight."""
        target.add_(self.delta(target), alpha=alpha)

    def bias_delta(self) -> torch.Tensor | None:
        return None

    def rank(self) -> int | None:
        return None

    def to(self, device: torch.device | str) -> LayerPatch:
        self._tensors = {name: t.to(device=device, dtype=torch.float32) for name, t in self._tensors.items()}
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @abstractmethod
    def shape_error(self, weight_shape: tuple[int, ...]) -> str | None:
        """None if the factors can produce a ΔW of this shape, else a short reason."""

    def _check_shape(self, weight: torch.Tensor) -> None:
        error = self.shape_error(tuple(weight.shape))
        if error:
            raise ValueError(f"{self.kind} layer: {error}")


class _FactoredLayer(LayerPatch):
    """A layer whose ΔW is `scale * build(factors)`, the factors alone fixing ΔW's shape."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        # Running build() on meta tensors checks that the factors fit together and yields ΔW's shape for free.
        meta = {name: torch.empty(t.shape, device="meta") for name, t in self._tensors.items()}
        try:
            self._made = tuple(self._build(meta).shape)
        except RuntimeError as e:
            raise ValueError(f"{self.kind} layer: factors do not fit together ({str(e).splitlines()[0]})") from None
        alpha = self._tensors.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise ValueError(f"{self.kind} layer: alpha must be a single number, got shape {tuple(alpha.shape)}")
        self._scale = _alpha_scale(alpha, self.rank())

    @abstractmethod
    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unscaled ΔW in the factors' own layout."""

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_shape(weight)
        return (self._build(self._tensors) * self._scale).reshape(weight.shape)

    def shape_error(self, weight_shape: tuple[int, ...]) -> str | None:
        weight_shape = tuple(weight_shape)
        if _fits(self._made, weight_shape):
            return None
        return f"ΔW would be {self._made}, module weight is {weight_shape}"


class LoRALayer(_FactoredLayer):
    """kohya LoRA / LyCORIS LoCon: ΔW = up @ down · alpha/r, or with a Tucker core up ×mid× down for convs."""

    kind = "lora"
    required = frozenset({"lora_up.weight", "lora_down.weight"})
    optional = frozenset({"lora_mid.weight", "alpha"})

    def rank(self) -> int:
        return self._tensors["lora_down.weight"].shape[0]

    def add_to(self, target: torch.Tensor, alpha: float) -> None:
        # One fused multiply-add into the weight's own storage: no full-size ΔW is ever allocated.
        if "lora_mid.weight" in self._tensors or not target.is_contiguous():
            super().add_to(target, alpha)
            return
        self._check_shape(target)
        up, down = self._tensors["lora_up.weight"].flatten(1), self._tensors["lora_down.weight"].flatten(1)
        target.view(up.shape[0], -1).addmm_(up, down, alpha=alpha * self._scale)

    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        # up may be [out, r] or [out, r, 1, 1] and a Tucker down is [r, in, 1, 1]: flatten(1) reads all alike.
        up, down, mid = t["lora_up.weight"].flatten(1), t["lora_down.weight"], t.get("lora_mid.weight")
        if mid is None:
            return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return torch.einsum("or,rshw,si->oihw", up, mid, down.flatten(1))


class LoHaLayer(_FactoredLayer):
    """LyCORIS LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r; the Tucker form rebuilds each half with its core."""

    kind = "loha"
    required = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    optional = frozenset({"hada_t1", "hada_t2", "alpha"})

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            raise ValueError("loha layer: hada_t1 and hada_t2 come as a pair, only one is present")
        super().__init__(tensors)

    def rank(self) -> int:
        return self._tensors["hada_w1_b"].shape[0]

    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if "hada_t1" in t:
            # Tucker halves store both sides rank-first: w_a [r, out], w_b [r, in], core [r, r, kh, kw].
            half1 = torch.einsum("abhw,ao,bi->oihw", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            half2 = torch.einsum("abhw,ao,bi->oihw", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
            return half1 * half2
        # Without Tucker, conv factors are flat: w_b is [r, in*kh*kw].
        half1 = t["hada_w1_a"].flatten(1) @ t["hada_w1_b"].flatten(1)
        half2 = t["hada_w2_a"].flatten(1) @ t["hada_w2_b"].flatten(1)
        return half1 * half2


class LoKrLayer(_FactoredLayer):
    """LyCORIS LoKr: ΔW = kron(w1, w2) · scale, each side full or a low-rank product, w2 optionally Tucker.

    scale is alpha/r with r the rank of the decomposed side (w1's first); with both sides full there is no rank
    and the scale is 1 whatever alpha says, as LyCORIS trains it.
    """

    kind = "lokr"
    optional = frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
    )

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        for side in ("lokr_w1", "lokr_w2"):
            low_rank = {f"{side}_a", f"{side}_b"} & set(tensors)
            if (side in tensors) == bool(low_rank) or len(low_rank) == 1:
                raise ValueError(f"lokr layer: needs either {side} or both {side}_a and {side}_b")
        if "lokr_t2" in tensors and "lokr_w2" in tensors:
            raise ValueError("lokr layer: lokr_t2 needs lokr_w2_a and lokr_w2_b, not lokr_w2")
        super().__init__(tensors)

    def rank(self) -> int | None:
        for low_rank_b in ("lokr_w1_b", "lokr_w2_b"):
            if low_rank_b in self._tensors:
                return self._tensors[low_rank_b].shape[0]
        return None

    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            # Tucker w2 stores both sides rank-first: w2_a [r, out], w2_b [r, in], core [r, r, kh, kw].
            w2 = torch.einsum("abhw,ao,bi->oihw", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            # A conv w2_b may be flat [r, in*kh*kw]; the 2-D kron then lays out exactly like the 4-D one.
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
        return torch.kron(w1, w2.contiguous())


class FullLayer(LayerPatch):
    """LyCORIS full fine-tune diff: ΔW is stored as is, with an optional bias delta."""

    kind = "full"
    required = frozenset({"diff"})
    optional = frozenset({"diff_b"})

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_shape(weight)
        # A copy, so that a caller scaling the result in place cannot change the stored diff.
        return self._tensors["diff"].reshape(weight.shape).clone()

    def bias_delta(self) -> torch.Tensor | None:
        return self._tensors.get("diff_b")

    def shape_error(self, weight_shape: tuple[int, ...]) -> str | None:
        diff, weight_shape = tuple(self._tensors["diff"].shape), tuple(weight_shape)
        return None if _fits(diff, weight_shape) else f"ΔW would be {diff}, module weight is {weight_shape}"


class DoRALayer(LayerPatch):
    """DoRA (LyCORIS weight_decompose) over a LoRA, LoHa or LoKr layer: the patched weight is
    dora_scale · V / ||V|| with V = W0 + ΔW_inner, so ΔW = that - W0 depends on the pristine weight.

    dora_scale [1, in(, 1, 1)] (LyCORIS/kohya default) holds one magnitude per input channel, the norm taken over
    the output (and kernel) dims; [out, 1(, 1, 1)] (LyCORIS wd_on_output) or a 1-D [out] (PEFT) one per output
    channel, the norm over the rest. The orientation is read against the weight's shape, never guessed alone.
    """

    needs_pristine = True

    kind = "dora"
    required = frozenset({"dora_scale"})

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        if "dora_scale" not in tensors:
            raise ValueError(f"dora layer: missing dora_scale (has {', '.join(sorted(tensors))})")
        super().__init__({"dora_scale": tensors["dora_scale"]})
        inner = layer_from_tensors({name: t for name, t in tensors.items() if name != "dora_scale"})
        if not isinstance(inner, _FactoredLayer):
            raise ValueError(f"dora layer: dora_scale needs a lora, loha or lokr layer, not {inner.kind}")
        self._inner = inner

    def rank(self) -> int | None:
        return self._inner.rank()

    def to(self, device: torch.device | str) -> DoRALayer:
        self._inner.to(device)
        super().to(device)
        return self

    def nbytes(self) -> int:
        return self._inner.nbytes() + super().nbytes()

    def shape_error(self, weight_shape: tuple[int, ...]) -> str | None:
        weight_shape = tuple(weight_shape)
        error = self._inner.shape_error(weight_shape)
        if error is None and self._norm_dims(weight_shape) is None:
            scale_shape = tuple(self._tensors["dora_scale"].shape)
            out, inp = weight_shape[0], weight_shape[1] if len(weight_shape) > 1 else 1
            error = f"dora_scale is {scale_shape}, expected (1, {inp}) or ({out}, 1) for module weight {weight_shape}"
        return error

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_shape(weight)
        dims = self._norm_dims(tuple(weight.shape))
        merged = weight + self._inner.delta(weight)
        norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
        magnitude = self._tensors["dora_scale"].reshape(norm.shape)
        # An all-zero column would divide by zero and put NaN in the weight; eps leaves every real norm untouched.
        return magnitude * merged / norm.clamp_min(torch.finfo(torch.float32).eps) - weight

    def _norm_dims(self, weight_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The dims the direction norm runs over, or None when dora_scale fits neither orientation."""
        scale = self._tensors["dora_scale"]
        if len(weight_shape) < 2:
            return None
        out, inp, rest = weight_shape[0], weight_shape[1], tuple(range(2, len(weight_shape)))
        if scale.dim() >= 2 and scale.shape[0] == 1 and scale.shape[1] == inp and scale.numel() == inp:
            return (0, *rest)
        if scale.shape[0] == out and scale.numel() == out:
            return (1, *rest)
        return None


_FAMILIES: tuple[type[LayerPatch], ...] = (LoRALayer, LoHaLayer, LoKrLayer, FullLayer)
LAYER_SUFFIXES: frozenset[str] = frozenset({"dora_scale"}).union(*(cls.required | cls.optional for cls in _FAMILIES))


def layer_from_tensors(tensors: dict[str, torch.Tensor]) -> LayerPatch:
    """Pick the class from the suffixes present; ValueError naming unknown or missing suffixes."""
    names = set(tensors)
    unknown = names - LAYER_SUFFIXES
    if unknown:
        raise ValueError(
            f"unknown layer suffixes {', '.join(sorted(unknown))}; "
            "expected a LoRA/LoCon, LoHa, LoKr, DoRA or full-diff layer"
        )
    if "dora_scale" in names:
        return DoRALayer(tensors)
    for cls in _FAMILIES:
        if names & (cls.required | cls.optional) - {"alpha"}:
            return cls(tensors)
    raise ValueError(f"no layer tensors, only {', '.join(sorted(names)) or 'nothing'}")


def _check_suffixes(kind: str, names: set[str], required: frozenset[str], optional: frozenset[str]) -> None:
    missing, extra = required - names, names - required - optional
    problems = [f"missing {', '.join(sorted(missing))}"] if missing else []
    problems += [f"unexpected {', '.join(sorted(extra))}"] if extra else []
    if problems:
        raise ValueError(f"{kind} layer: {'; '.join(problems)} (has {', '.join(sorted(names))})")


def _alpha_scale(alpha: torch.Tensor | None, rank: int | None) -> float:
    # kohya and LyCORIS train with a missing or zero alpha meaning alpha = rank, i.e. no scaling.
    if alpha is None or rank is None or float(alpha) == 0:
        return 1.0
    return float(alpha) / rank


def _fits(made: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Whether a ΔW laid out as `made` is the module's weight reshaped."""
    if made == weight_shape:
        return True
    if made[:1] != weight_shape[:1] or math.prod(made[1:]) != math.prod(weight_shape[1:]):
        return False
    # Flat conv factors give [out, in*kh*kw]; a 1x1 conv and a linear layer are the same matrix.
    return len(made) == 2 or (len(weight_shape) == 2 and all(k == 1 for k in made[2:]))

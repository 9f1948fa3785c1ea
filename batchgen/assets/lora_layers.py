"""One class per LoRA layer type (LoRA/LoCon and its Tucker form, LoHa, LoKr, DoRA, full diff); each owns its tensor
suffixes, the fewest dimensions each tensor has, its rank, the shape of the ΔW it makes, and ΔW itself.

The class methods read only shapes (safetensors headers, meta tensors: anything with a ``shape``), so inspection asks
the same classes the patcher uses. An instance takes the module's tensors keyed by their kohya/LyCORIS suffix, keeps
them as factors in the file's own dtype (an fp16 LoRA stays half the size of its fp32 copy), and builds the full-size
ΔW, in fp32, only when `delta` or `add_to` is called. Applying a layer at strength w gives
W0 + w * delta(W0). `LAYER_TYPES` is the registry the key formats and inspection read. torch is imported where a
layer holds tensors, never at import: a dry run reads the classes' suffixes and shapes without it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

# (output width, input width times kernel size) of a ΔW, None where the tensors at hand do not say.
DeltaDims = tuple[int | None, int | None]


class LayerPatch(ABC):
    kind: ClassVar[str]
    required: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()
    # The fewest dimensions a tensor can have where that is not 2 (conv-only factors have 4); alpha is one number.
    min_dims: ClassVar[Mapping[str, int]] = {}

    @classmethod
    def suffixes(cls) -> frozenset[str]:
        return cls.required | cls.optional

    @classmethod
    @abstractmethod
    def rank_of(cls, tensors: Mapping[str, Any]) -> int | None:
        """The rank alpha divides by, from the tensors' shapes; None for a layer without one."""

    @classmethod
    @abstractmethod
    def delta_dims(cls, tensors: Mapping[str, Any]) -> DeltaDims:
        """The ΔW's widths from the tensors' shapes; missing tensors give None (shapes are read before any check)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        _check_suffixes(self.kind, set(tensors), self.required, self.optional)
        # Floating point, any width: the planner's value checks refuse integer tensors before a layer is made.
        self._tensors = {name: t.detach() for name, t in tensors.items()}

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

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(up, down, scale) with ΔW = scale · up @ down, up and down fp32 matrices, for a layer that is one such
        product (a LoRA on a Linear); None for every other. fp8 weights apply such a layer in the forward."""
        return None

    def rank(self) -> int | None:
        return self.rank_of(self._tensors)

    def to(self, device: torch.device | str) -> LayerPatch:
        self._tensors = {name: t.to(device=device) for name, t in self._tensors.items()}
        return self

    def _fp32(self, name: str) -> torch.Tensor:
        """A factor in fp32, the precision every ΔW is built in (a no-op for an fp32 file)."""
        import torch

        return self._tensors[name].to(torch.float32)

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
        import torch

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
        # alpha lives on as the float scale; a tensor object per layer would cost more than its two bytes.
        self._tensors.pop("alpha", None)

    @abstractmethod
    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unscaled ΔW in the factors' own layout."""

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_shape(weight)
        return (self._build({name: self._fp32(name) for name in self._tensors}) * self._scale).reshape(weight.shape)

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
    min_dims = {"lora_mid.weight": 4}

    @classmethod
    def rank_of(cls, tensors: Mapping[str, Any]) -> int | None:
        down = tensors.get("lora_down.weight")
        return None if down is None else down.shape[0]

    @classmethod
    def delta_dims(cls, tensors: Mapping[str, Any]) -> DeltaDims:
        # up [out, r(, 1, 1)]; down [r, in(, kh, kw)], or with a Tucker core: down [r, in, 1, 1], mid [r, r, kh, kw].
        up, down, mid = (tensors.get(name) for name in ("lora_up.weight", "lora_down.weight", "lora_mid.weight"))
        out_dim = _shape(up)[0] if up is not None else None
        if down is None:
            return out_dim, None
        kernel = math.prod(_shape(mid)[2:]) if mid is not None else 1
        return out_dim, math.prod(_shape(down)[1:]) * kernel

    def add_to(self, target: torch.Tensor, alpha: float) -> None:
        # One fused multiply-add into the weight's own storage: no full-size ΔW is ever allocated.
        if "lora_mid.weight" in self._tensors or not target.is_contiguous():
            super().add_to(target, alpha)
            return
        self._check_shape(target)
        up, down = self._fp32("lora_up.weight").flatten(1), self._fp32("lora_down.weight").flatten(1)
        target.view(up.shape[0], -1).addmm_(up, down, alpha=alpha * self._scale)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if "lora_mid.weight" in self._tensors or self._tensors["lora_down.weight"].dim() != 2:
            return None
        return self._fp32("lora_up.weight").flatten(1), self._fp32("lora_down.weight"), self._scale

    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

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
    min_dims = {"hada_t1": 4, "hada_t2": 4}

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            raise ValueError("loha layer: hada_t1 and hada_t2 come as a pair, only one is present")
        super().__init__(tensors)

    @classmethod
    def rank_of(cls, tensors: Mapping[str, Any]) -> int | None:
        w1_b = tensors.get("hada_w1_b")
        return None if w1_b is None else w1_b.shape[0]

    @classmethod
    def delta_dims(cls, tensors: Mapping[str, Any]) -> DeltaDims:
        # Plain: w1_a [out, r], w1_b [r, in*kh*kw]. Tucker: t1 [r, r, kh, kw], w1_a [r, out], w1_b [r, in].
        if "hada_w1_a" not in tensors or "hada_w1_b" not in tensors:
            return None, None
        w1_a, w1_b = _shape(tensors["hada_w1_a"]), _shape(tensors["hada_w1_b"])
        core = tensors.get("hada_t1")
        if core is None:
            return w1_a[0], w1_b[1]
        return w1_a[1], w1_b[1] * math.prod(_shape(core)[2:])

    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

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
    min_dims = {"lokr_t2": 4}

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        for side in ("lokr_w1", "lokr_w2"):
            low_rank = {f"{side}_a", f"{side}_b"} & set(tensors)
            if (side in tensors) == bool(low_rank) or len(low_rank) == 1:
                raise ValueError(f"lokr layer: needs either {side} or both {side}_a and {side}_b")
        if "lokr_t2" in tensors and "lokr_w2" in tensors:
            raise ValueError("lokr layer: lokr_t2 needs lokr_w2_a and lokr_w2_b, not lokr_w2")
        super().__init__(tensors)

    @classmethod
    def rank_of(cls, tensors: Mapping[str, Any]) -> int | None:
        for low_rank_b in ("lokr_w1_b", "lokr_w2_b"):
            if low_rank_b in tensors:
                return tensors[low_rank_b].shape[0]
        return None

    @classmethod
    def delta_dims(cls, tensors: Mapping[str, Any]) -> DeltaDims:
        # ΔW = kron(w1, w2): widths multiply.
        first = _lokr_factor(tensors, "lokr_w1", None)
        second = _lokr_factor(tensors, "lokr_w2", "lokr_t2")
        if first is None or second is None:
            return None, None
        return first[0] * second[0], first[1] * second[1]

    def _build(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

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
    min_dims = {"diff_b": 1}

    @classmethod
    def rank_of(cls, tensors: Mapping[str, Any]) -> int | None:
        return None

    @classmethod
    def delta_dims(cls, tensors: Mapping[str, Any]) -> DeltaDims:
        if "diff" in tensors:
            shape = _shape(tensors["diff"])
            return shape[0], math.prod(shape[1:])
        if "diff_b" in tensors:
            return _shape(tensors["diff_b"])[0], None
        return None, None

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        import torch

        self._check_shape(weight)
        # A copy, so that a caller scaling the result in place cannot change the stored diff.
        return self._tensors["diff"].to(torch.float32, copy=True).reshape(weight.shape)

    def bias_delta(self) -> torch.Tensor | None:
        return self._fp32("diff_b") if "diff_b" in self._tensors else None

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
    min_dims = {"dora_scale": 1}

    @classmethod
    def rank_of(cls, tensors: Mapping[str, Any]) -> int | None:
        inner = _inner_type(tensors)
        return None if inner is None else inner.rank_of(tensors)

    @classmethod
    def delta_dims(cls, tensors: Mapping[str, Any]) -> DeltaDims:
        inner = _inner_type(tensors)
        return (None, None) if inner is None else inner.delta_dims(tensors)

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
        import torch

        self._check_shape(weight)
        dims = self._norm_dims(tuple(weight.shape))
        merged = weight + self._inner.delta(weight)
        norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
        magnitude = self._fp32("dora_scale").reshape(norm.shape)
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


# The registry. A module's tensors are matched against these in order: the first type one of whose suffixes (alpha
# aside) is present decides, so a mix of two types is reported as the first one's error. DoRA wraps one of them.
LAYER_TYPES: tuple[type[LayerPatch], ...] = (LoRALayer, LoHaLayer, LoKrLayer, FullLayer)
WRAPPERS: tuple[type[LayerPatch], ...] = (DoRALayer,)
LAYER_SUFFIXES: frozenset[str] = frozenset().union(*(cls.suffixes() for cls in (*LAYER_TYPES, *WRAPPERS)))
# The order --list names a file's layer types in, and the names LyCORIS gives them. "locon" is no class of its own:
# a LoRA layer over a convolution's kernel (LyCORIS's LoCon, kohya's C3Lier), which a plain kohya LoRA never has.
REPORTED_KINDS = {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "locon": "LoCon", "lora": "LoRA", "full": "full"}


def layer_type(names: Iterable[str]) -> type[LayerPatch] | None:
    """The class a module with these tensor suffixes is read as, or None when it has no layer tensors."""
    names = set(names)
    for wrapper in WRAPPERS:
        if names & wrapper.required:
            return wrapper
    return _inner_type(names)


def layer_kinds(names: Iterable[str]) -> tuple[str, ...]:
    """The kinds of layer a module's suffixes make, a wrapper with the type it wraps ("dora", "loha")."""
    cls = layer_type(names)
    if cls is None:
        return ()
    inner = _inner_type(names) if cls in WRAPPERS else None
    return (cls.kind, inner.kind) if inner is not None else (cls.kind,)


def spans_kernel(tensors: Mapping[str, Any]) -> bool:
    """Whether a LoRA layer patches a convolution over more than 1x1 (a Tucker core, or a down with a kernel)."""
    down = tensors.get("lora_down.weight")
    kernel = _shape(down)[2:] if down is not None else ()
    return "lora_mid.weight" in tensors or math.prod(kernel) > 1


def delta_dims(tensors: Mapping[str, Any]) -> DeltaDims:
    """The ΔW's widths a module's tensors make, from shapes alone; (None, None) where they do not say."""
    cls = layer_type(tensors)
    return (None, None) if cls is None else cls.delta_dims(tensors)


def rank_of(tensors: Mapping[str, Any]) -> int | None:
    cls = layer_type(tensors)
    return None if cls is None else cls.rank_of(tensors)


def min_dims(suffix: str) -> int:
    """The fewest dimensions a tensor with this suffix can have."""
    for cls in (*LAYER_TYPES, *WRAPPERS):
        if suffix in cls.min_dims:
            return cls.min_dims[suffix]
    return 2


def layer_from_tensors(tensors: dict[str, torch.Tensor]) -> LayerPatch:
    """Pick the class from the suffixes present; ValueError naming unknown or missing suffixes."""
    names = set(tensors)
    unknown = names - LAYER_SUFFIXES
    if unknown:
        raise ValueError(
            f"unknown layer suffixes {', '.join(sorted(unknown))}; "
            "expected a LoRA/LoCon, LoHa, LoKr, DoRA or full-diff layer"
        )
    cls = layer_type(names)
    if cls is None:
        raise ValueError(f"no layer tensors, only {', '.join(sorted(names)) or 'nothing'}")
    return cls(tensors)


def _inner_type(names: Iterable[str]) -> type[LayerPatch] | None:
    names = set(names)
    for cls in LAYER_TYPES:
        if names & cls.suffixes() - {"alpha"}:
            return cls
    return None


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _lokr_factor(tensors: Mapping[str, Any], name: str, core_name: str | None) -> tuple[int, int] | None:
    """(out, in*kernel) of one Kronecker factor: full, a @ b, or with a Tucker core (a [r, out], b [r, in])."""
    if name in tensors:
        shape = _shape(tensors[name])
        return shape[0], math.prod(shape[1:])
    a, b = tensors.get(f"{name}_a"), tensors.get(f"{name}_b")
    if a is None or b is None:
        return None
    core = tensors.get(core_name) if core_name else None
    if core is None:
        return _shape(a)[0], math.prod(_shape(b)[1:])
    return _shape(a)[1], _shape(b)[1] * math.prod(_shape(core)[2:])


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

"""Row surgery for the MMDiT families (flux.py, sd3.py), whose original layouts fuse projections diffusers keeps
apart and order some modulations otherwise: cut a layer's ΔW rows into one layer per part, swap its halves.

Only the tensors that own ΔW's rows are cut (a LoRA's up, a LoHa's row factors, a full diff and its bias, a
per-output DoRA magnitude); the others serve every row and are shared. Shape-only stand-ins (``Shape``) are cut
into stand-ins of the same class, so planning reads a file's header alone. ``over`` names, in messages, what a
family cuts or reorders (``"FLUX's fused qkv/linear1"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchgen.assets.lora_formats.peft import _scalar_like
from batchgen.assets.lora_layers import delta_dims, layer_kinds


def with_alpha(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRA without alpha gets alpha = rank: kohya reads a missing alpha so, XLabs' processors apply no scale,
    and diffusers loads both (and BFL lora_A/lora_B files) at PEFT's default lora_alpha = r."""
    tensors = dict(tensors)
    down = tensors.get("lora_down.weight")
    if down is not None and "alpha" not in tensors:
        tensors["alpha"] = _scalar_like(down, float(tuple(down.shape)[0]))
    return tensors


@dataclass(frozen=True)
class Layout:
    """What a family cuts and reorders: a file module's fused parts (None: not fused), whether its halves are
    [shift; scale], the diffusers path of a ``<prefix>#<part>``, and how messages name the two."""

    fused_parts: Callable[[str], Sequence[str] | None]
    reordered: Callable[[str], bool]
    path_of: Callable[[str], str | None]
    over_fused: str
    over_swapped: str


def split_groups(
    groups: Mapping[str, Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]], layout: Layout
) -> dict[str, dict[str, Any]]:
    """The groups with each fused one replaced by one per part (``<prefix>#<part>``), rows sized by the parts'
    modules in `shapes` ({path: weight shape}), and [shift; scale] modulations in diffusers' row order
    (``<prefix>#scale_shift``); every LoRA has an alpha. Idempotent: split prefixes are never split again. A fused
    group whose parts the model lacks, or whose rows they do not add up to, stays whole and so maps nowhere. Raises
    ValueError for a layer whose ΔW rows cannot be cut apart (LoKr, DoRA with per-input magnitudes)."""
    result: dict[str, dict[str, Any]] = {}
    for prefix, tensors in groups.items():
        tensors = with_alpha(tensors)
        parts = layout.fused_parts(prefix)
        if parts is None:
            if layout.reordered(prefix):
                result[f"{prefix}#scale_shift"] = swap_halves(prefix, tensors, layout.over_swapped)
            else:
                result[prefix] = tensors
            continue
        sizes = [shapes.get(layout.path_of(f"{prefix}#{part}") or "", (None,))[0] for part in parts]
        cuts = cut(prefix, tensors, sizes, layout.over_fused)
        if cuts is None:
            result[prefix] = tensors
            continue
        result.update({f"{prefix}#{part}": part_tensors for part, part_tensors in zip(parts, cuts, strict=True)})
    return result


def cut(
    prefix: str, tensors: Mapping[str, Any], sizes: Sequence[int | None], over: str
) -> list[dict[str, Any]] | None:
    """One group per part, the parts' rows in order; None when a size is unknown (the model lacks that module) or
    the sizes do not add up to ΔW's rows (the group then stays whole and maps nowhere). Raises ValueError for a
    layer whose rows cannot be cut apart (LoKr, DoRA with per-input magnitudes)."""
    known = [size for size in sizes if size is not None]
    if len(known) != len(sizes) or sum(known) != delta_dims(tensors)[0]:
        return None
    dims = _row_dims(prefix, tensors, over, fused=True)
    parts: list[dict[str, Any]] = []
    start = 0
    for size in known:
        parts.append(
            {
                suffix: rows(value, start, start + size, dims[suffix]) if suffix in dims else value
                for suffix, value in tensors.items()
            }
        )
        start += size
    return parts


def swap_halves(prefix: str, tensors: dict[str, Any], over: str) -> dict[str, Any]:
    """ΔW with its two row halves swapped ([shift; scale] to [scale; shift]); ValueError for a layer whose rows
    cannot be reordered (a LoKr whose w1 has an odd number of rows)."""
    if delta_dims(tensors)[0] is None:
        return tensors  # no layer to reorder: the layer types say what is missing
    dims = _row_dims(prefix, tensors, over, fused=False)
    swapped = dict(tensors)
    for suffix, dim in dims.items():
        value = tensors[suffix]
        count = tuple(value.shape)[dim]
        if hasattr(value, "dtype"):
            import torch  # tensors at hand, so torch is loaded already

            half = count // 2
            swapped[suffix] = torch.cat([value.narrow(dim, half, count - half), value.narrow(dim, 0, half)], dim=dim)
    return swapped  # a shape-only stand-in keeps its shape


def halves_swapped(value: Any) -> Any:
    """A base weight or bias with its two row halves swapped ([shift; scale] to [scale; shift]); a shape-only
    stand-in comes back as it is (the swap keeps its shape)."""
    if not hasattr(value, "narrow"):
        return value
    import torch  # a real tensor: torch is loaded already

    count = tuple(value.shape)[0]
    half = count // 2
    return torch.cat([value.narrow(0, half, count - half), value.narrow(0, 0, half)])


def rows(value: Any, start: int, stop: int, dim: int) -> Any:
    """Rows start:stop along `dim`: a view of a tensor, or a stand-in of the same class with that shape."""
    if hasattr(value, "narrow"):
        return value.narrow(dim, start, stop - start)
    shape = list(value.shape)
    shape[dim] = stop - start
    return type(value)(tuple(shape))


def _row_dims(prefix: str, tensors: Mapping[str, Any], over: str, fused: bool) -> dict[str, int]:
    """{suffix: dim holding ΔW's output rows} of the tensors that own rows; the others serve every row."""
    inner = layer_kinds(tensors)[-1]
    out_rows = delta_dims(tensors)[0]
    if inner == "lora":
        dims = {"lora_up.weight": 0}
    elif inner == "loha":
        side = 1 if "hada_t1" in tensors else 0  # Tucker factors are rank-first: [r, out]
        dims = {"hada_w1_a": side, "hada_w2_a": side}
    elif inner == "full":
        dims = {suffix: 0 for suffix in ("diff", "diff_b") if suffix in tensors}
    elif inner == "lokr" and not fused and _even(tensors.get("lokr_w1", tensors.get("lokr_w1_a"))):
        # kron(w1, w2) row-block r is w1's row r: swapping w1's halves swaps ΔW's. No such cut fits q/k/v in general.
        dims = {"lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a": 0}
    else:
        raise ValueError(_cannot(prefix, "LoKr layer" if inner == "lokr" else f"{inner} layer", over))
    scale = tensors.get("dora_scale")
    if scale is not None:
        shape = tuple(scale.shape)
        if shape[0] == out_rows and math.prod(shape) == out_rows:
            dims["dora_scale"] = 0  # one magnitude per output row: it goes with its row
        elif fused:
            # Per-input magnitudes divide by column norms over all fused rows; a part's own norm would differ.
            # (Reordering rows, as the swap does, leaves those norms as they are.)
            raise ValueError(_cannot(prefix, "DoRA layer with per-input magnitudes", over))
    return dims


def _cannot(prefix: str, what: str, over: str) -> str:
    return f"{prefix}: batchgen cannot split a {what} over {over}; convert it to LoRA (e.g. with kohya's tools)"


def _even(value: Any) -> bool:
    return value is not None and tuple(value.shape)[0] % 2 == 0

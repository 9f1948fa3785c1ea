"""What prompt_syntax=compel cannot render, refused at planning so that no job fails mid-run. No torch here.

compel reads one of three encoder layers: the last one normed (SD1/SD2 without clip skip), the penultimate normed
(A1111's clip skip 2 on SD1/SD2) and the penultimate not normed (SDXL, which diffusers already reads there). A deeper
clip skip has no compel layer. Text-level refusals (compel's .swap() and withLora()) need compel's parser, which
imports torch: the engine raises those (batchgen.engine.compel_text).
"""

from __future__ import annotations

from batchgen.assets.bases import BASES
from batchgen.errors import BatchgenError

# Per base, the clip skips (A1111's count) compel has a layer for, as each base module declares them.
COMPEL_CLIP_SKIPS: dict[str, tuple[int, ...]] = {b.name: b.compel_clip_skips for b in BASES if b.compel_clip_skips}


def check_compel(base: str, clip_skip: int, where: str) -> None:
    """Raise BatchgenError when compel cannot render clip skip `clip_skip` on `base`; `where` names the job."""
    offered = COMPEL_CLIP_SKIPS.get(base)
    if offered is None:
        raise BatchgenError(
            f"{where}: prompt_syntax=compel is not set up for base '{base}'; use prompt_syntax=a1111 or plain"
        )
    if clip_skip not in offered:
        choices = " or ".join(str(c) for c in offered)
        raise BatchgenError(
            f"{where}: prompt_syntax=compel offers clip_skip {choices} on {base} (asked: {clip_skip}); "
            "use prompt_syntax=a1111 for a deeper clip skip"
        )

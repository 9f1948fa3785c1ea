"""Text on images: Pillow's bundled font at any size, wrapping by measured width, never inside a `<trigger>`."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

import pandas as pd
from PIL import ImageDraw, ImageFont

LABEL_FILL = (0, 0, 0)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
# A <trigger> is one unbreakable atom; anything else breaks between characters.
_ATOM = re.compile(r"<[^<>\s]*>|.", re.S)


def text(value: object) -> str:
    """Display form of a table value; 1 and 1.0 (an int column read back with NaNs) must group together."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return ""
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return "" if pd.isna(value) else str(value)


def font(size: int) -> Font:
    # Pillow >= 10.1 ships a scalable font, so labels need no system font.
    return ImageFont.load_default(size=size)


def line_height(face: Font) -> int:
    bottom = face.getbbox("Ag|")[3]
    return int(bottom + max(2, bottom // 5))


def _add_word(lines: list[str], word: str, face: Font, width: float) -> None:
    if lines and lines[-1] and face.getlength(f"{lines[-1]} {word}") <= width:
        lines[-1] = f"{lines[-1]} {word}"
        return
    if face.getlength(word) <= width:
        lines.append(word)
        return
    current = ""
    for atom in _ATOM.findall(word):
        if current and face.getlength(current + atom) > width:
            lines.append(current)
            current = ""
        current += atom
    lines.append(current)


def _ellipsize(line: str, face: Font, width: float) -> str:
    atoms = _ATOM.findall(line)
    while atoms and face.getlength("".join(atoms).rstrip() + "...") > width:
        atoms.pop()
    return "".join(atoms).rstrip() + "..."


def wrap_label(label: str, face: Font, width: float, max_lines: int) -> list[str]:
    """Wrap to `width` pixels by measured length, never inside a `<trigger>`; cut to max_lines with '...'."""
    lines: list[str] = []
    for word in label.split():
        _add_word(lines, word, face, width)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], face, width)
    return lines or [""]


def draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: Sequence[str],
    face: Font,
    box: tuple[int, int, int, int],
    line_h: int,
    centre_x: bool = True,
    fill: tuple[int, int, int] = LABEL_FILL,
) -> None:
    """Draw lines vertically centred in box, each centred (or left-aligned) horizontally."""
    left, top, right, bottom = box
    y = top + (bottom - top - len(lines) * line_h) / 2
    for line in lines:
        x = left + (right - left - face.getlength(line)) / 2 if centre_x else left
        draw.text((x, y), line, font=face, fill=fill)
        y += line_h

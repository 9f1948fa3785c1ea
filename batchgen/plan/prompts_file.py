"""`sweep.prompts_file`: prompts from a .txt (one per line) or a .csv (prompt, optional negative_prompt and seed
columns). A CSV row's prompt, negative prompt and seed belong together: rows are zipped, not multiplied."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from batchgen.errors import BatchgenError

_COLUMNS = ("prompt", "negative_prompt", "seed")


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    negative_prompt: str | None = None  # None: the sweep's negative prompt
    seed: int | None = None  # None: the sweep's seeds axis


def read_prompts_file(text: str, where: str = "sweep.prompts_file") -> list[PromptRow]:
    path = Path(text).expanduser()
    if not path.is_file():
        raise BatchgenError(f"{where}: {path} is not a file; give a .txt (one prompt per line) or a .csv")
    try:
        content = path.read_text(encoding="utf-8-sig")  # spreadsheets often write a byte-order mark
    except UnicodeDecodeError:
        raise BatchgenError(f"{where}: {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise BatchgenError(f"{where}: cannot read {path} ({e.strerror or e})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows = [PromptRow(line.strip()) for line in content.splitlines() if line.strip()]
    elif suffix == ".csv":
        rows = _csv_rows(content, path, where)
    else:
        raise BatchgenError(f"{where}: {path} is neither .txt nor .csv; rename it or convert it")
    if not rows:
        raise BatchgenError(f"{where}: {path} holds no prompt; write one per line (or per CSV row)")
    return rows


def _csv_rows(content: str, path: Path, where: str) -> list[PromptRow]:
    reader = csv.DictReader(content.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    if "prompt" not in columns:
        raise BatchgenError(f"{where}: {path} has no 'prompt' column (columns: {', '.join(columns) or 'none'})")
    unknown = [c for c in columns if c not in _COLUMNS]
    if unknown:
        raise BatchgenError(
            f"{where}: {path} has column '{unknown[0]}', which batchgen does not read; use {', '.join(_COLUMNS)}"
        )
    rows = []
    for line, record in enumerate(reader, start=2):
        record = {k.strip(): (v or "").strip() for k, v in record.items() if k is not None}
        if not record.get("prompt"):
            if any(record.values()):
                raise BatchgenError(f"{where}: {path} line {line} has no prompt; fill it in or delete the row")
            continue
        seed = record.get("seed") or None
        if seed is not None and not (seed.isdigit()):
            raise BatchgenError(f"{where}: {path} line {line}: seed '{seed}' is not an integer >= 0")
        negative = record.get("negative_prompt") if "negative_prompt" in columns else None
        rows.append(PromptRow(record["prompt"], negative, int(seed) if seed is not None else None))
    return rows

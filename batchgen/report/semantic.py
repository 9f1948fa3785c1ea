"""clip_t, clip_i and dino_i (sweep.metrics) into the manifest, for the latest ok rows whose cells are empty: what a
render does after its last image and what `batchgen report` does for older runs, in place (manifest.fill_cells).

- clip_t: every job, its image against its prompt's plain words (prompt_syntax.words);
- clip_i, dino_i: a job that carries concepts (its LoRAs' and TIs' in sweep.metrics.concepts), its image against
  every image of those concepts (batchgen.semantic);
- reference_clip_i, reference_dino_i: the same concepts' images against the job's no-LoRA reference image, which
  carries no LoRA, so that `batchgen rank` reads the base model's own resemblance beside each state's.
Images are read from the PNGs as written; each concept image's features are computed once per call, and no model
loads when no cell is to be filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from batchgen.assets.metric_models import Concept, MetricModels, concept_of
from batchgen.cells import format_value, lora_names, parse_loras, parse_names
from batchgen.columns import BY_NAME
from batchgen.errors import BatchgenError
from batchgen.manifest import Cells, fill_cells, latest_positions
from batchgen.prompt_syntax.words import plain_words
from batchgen.settings import did_you_mean

COLUMNS = ("clip_t", "clip_i", "dino_i", "reference_clip_i", "reference_dino_i")
DIGITS = 4  # as effect and ssim are written


@dataclass(frozen=True)
class _Wanted:
    position: int
    job_id: str
    reference: str | None  # the reference's job_id where its image is on disk
    concepts: tuple[Concept, ...]
    text: str
    columns: tuple[str, ...]


def fill_semantic(run_dir: Path, models: MetricModels | None) -> int:
    """Write the cells semantic_cells finds into manifest.csv; the caller holds the run lock. Returns rows updated."""
    if models is None:
        return 0
    return fill_cells(run_dir, lambda rows: semantic_cells(rows, run_dir, models))


def semantic_cells(rows: pd.DataFrame, run_dir: Path, models: MetricModels) -> Cells:
    """{position in rows: {column: value}} for the latest ok rows whose image is on disk and whose metric cells are
    empty and can be had with `models`. `rows`: read_manifest(run_dir)."""
    latest = rows.iloc[latest_positions(rows, run_dir)]
    ok = latest[latest["status"] == "ok"]
    images = {
        job: run_dir / image
        for job, image in zip(ok["job_id"], ok["image"], strict=True)
        if (run_dir / image).is_file()
    }
    wanted = [w for position, row in ok.iterrows() if (w := _wanted(int(position), row, images, models))]
    if not wanted:
        return {}
    clip = _features(models.clip, "clip", wanted, images)
    dino = _features(models.dino, "dino", wanted, images)
    return {w.position: {c: _value(c, w, dino if c.endswith("dino_i") else clip) for c in w.columns} for w in wanted}


def check_carried(models: MetricModels, rows: pd.DataFrame, where: dict[str, str]) -> None:
    """Each concept `where` names (concept -> its option) is carried by a job of `rows` (read_manifest's table):
    one that no job carries would measure nothing, so it is a typo."""
    loras = lora_names(rows["loras"])
    triggers = sorted({t for cell in rows["embeddings"] for t in parse_names(cell)})
    for concept in models.concepts:
        if concept.name not in where or concept.name in triggers:
            continue
        if not any(concept_of(lora, [concept.name]) for lora in loras):
            known = sorted({*loras, *triggers})
            raise BatchgenError(
                f"{where[concept.name]}: no job of this run carries a LoRA or TI named '{concept.name}'"
                f"{did_you_mean(concept.name, known)}; found: {', '.join(known) or 'none'}"
            )


def _wanted(position: int, row: pd.Series, images: dict[str, Path], models: MetricModels) -> _Wanted | None:
    if row["job_id"] not in images:
        return None
    concepts = models.carried((e.name for e in parse_loras(row["loras"])), parse_names(row["embeddings"]))
    reference = row["reference"] if row["reference"] in images else None
    able = {
        "clip_t": models.clip is not None,
        "clip_i": models.clip is not None and bool(concepts),
        "dino_i": models.dino is not None and bool(concepts),
        "reference_clip_i": models.clip is not None and bool(concepts) and reference is not None,
        "reference_dino_i": models.dino is not None and bool(concepts) and reference is not None,
    }
    columns = tuple(c for c in COLUMNS if able[c] and not row[c])
    if not columns:
        return None
    text = plain_words(
        str(row["prompt"]),
        BY_NAME["prompt_syntax"].codec.parse(row["prompt_syntax"]),
        BY_NAME["steps"].codec.parse(row["steps"]),
        parse_names(row["embeddings"]),
    )
    return _Wanted(position, row["job_id"], reference, concepts, text, columns)


@dataclass(frozen=True)
class _Computed:
    """One model's normalized features: of job images by job_id, of texts (CLIP), of concept images by path."""

    images: dict[str, Any]
    texts: dict[str, Any]
    concepts: dict[Path, Any]


def _features(folder: Path | None, kind: str, wanted: list[_Wanted], images: dict[str, Path]) -> _Computed | None:
    """Everything `wanted` needs of one model, computed in batches, each image and text once."""
    if folder is None:
        return None
    from batchgen.semantic import ClipModel, DinoModel

    model = ClipModel(folder) if kind == "clip" else DinoModel(folder)
    jobs: dict[str, None] = {}
    texts: dict[str, None] = {}
    concepts: dict[Path, None] = {}
    for w in wanted:
        for column in w.columns:
            if (column == "clip_t") != (kind == "clip") and not column.endswith(f"{kind}_i"):
                continue
            jobs[w.reference if column.startswith("reference_") else w.job_id] = None
            if column == "clip_t":
                texts[w.text] = None
            else:
                concepts.update(dict.fromkeys(p for c in w.concepts for p in c.images))

    def computed(keys: dict, compute) -> dict:
        return dict(zip(keys, compute(list(keys)), strict=True)) if keys else {}

    return _Computed(
        images=computed(jobs, lambda ids: model.images([images[i] for i in ids])),
        texts=computed(texts, lambda found: model.texts(found)),
        concepts=computed(concepts, model.images),
    )


def _value(column: str, wanted: _Wanted, features: _Computed) -> str:
    import torch

    from batchgen.semantic import clip_score, mean_similarity

    image = features.images[wanted.reference if column.startswith("reference_") else wanted.job_id]
    if column == "clip_t":
        value = clip_score(image, features.texts[wanted.text])
    else:
        paths = dict.fromkeys(p for c in wanted.concepts for p in c.images)  # every image once, in concept order
        value = mean_similarity(image, torch.stack([features.concepts[p] for p in paths]))
    return format_value(round(value, DIGITS))

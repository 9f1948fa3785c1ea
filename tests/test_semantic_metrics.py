"""sweep.metrics: clip_t, clip_i, dino_i and the reference values in the manifest, each equal to what a short
transformers script computes from the PNGs as written (the reference side below imports no batchgen code); a run
without sweep.metrics has the columns empty and loads no CLIP or DINO; `batchgen report` fills them for a run
rendered without them; the prompt's plain words; the tiny models and concept images build the same bytes twice.
"""

from __future__ import annotations

import csv
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchgen.assets.metric_models import Concept, MetricModels, concept_of
from batchgen.cli import main
from batchgen.prompt_syntax.words import plain_words
from batchgen.tiny import ensure_tiny_metrics
from batchgen.tiny.metric_models import build_tiny_metrics

SWEEP = """# @package _global_
defaults:
  - /model@models.tiny_sd1: tiny_sd1
sweep:
  name: sem
  prompts: ["a portrait of <alf> in (ink drawing:1.2)", "[a castle:a forest:0.5] at night BREAK watercolor"]
  stacks: {none: {}, ink: {ink: [0.5, 1.0]}, ink_grain: {ink: 0.8, grain: 0.6}}
  seeds: [1]
  steps: 2
  width: 64
  height: 64
"""
# Each prompt's plain words, written out by hand: the text clip_t compares each image with.
TEXTS = {
    "a portrait of <alf> in (ink drawing:1.2)": "a portrait of in ink drawing",
    "[a castle:a forest:0.5] at night BREAK watercolor": "a forest at night watercolor",  # step 2 of 2: the forest
}
CONCEPTS = ("ink", "alf")  # grain has no images here: ink_grain's jobs carry ink only
COLUMNS = ("clip_t", "clip_i", "dino_i", "reference_clip_i", "reference_dino_i")


# --- the reference side: transformers, torch and Pillow only ------------------------------------------------------


def recomputed(run: Path, clip: Path, dino: Path, concepts: dict[str, Path]) -> dict[str, dict[str, float | None]]:
    """Every job's five values from its PNG, by the definitions in README's "Measures"."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    clip_model = CLIPModel.from_pretrained(clip, local_files_only=True).eval()
    clip_processor = AutoProcessor.from_pretrained(clip, local_files_only=True)
    dino_model = AutoModel.from_pretrained(dino, local_files_only=True).eval()
    dino_processor = AutoImageProcessor.from_pretrained(dino, local_files_only=True)

    def unit(features) -> torch.Tensor:
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        return (features / features.norm(dim=-1, keepdim=True))[0]

    @functools.cache
    @torch.no_grad()
    def clip_image(path: Path) -> torch.Tensor:
        pixels = clip_processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        return unit(clip_model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def clip_text(text: str) -> torch.Tensor:
        tokens = clip_processor(text=[text], padding=True, truncation=True, max_length=77, return_tensors="pt")
        return unit(
            clip_model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )

    @functools.cache
    @torch.no_grad()
    def dino_image(path: Path) -> torch.Tensor:
        pixels = dino_processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        return unit(dino_model(pixel_values=pixels).last_hidden_state[:, 0])

    with (run / "manifest.csv").open(newline="") as f:
        rows = {row["job_id"]: row for row in csv.DictReader(f)}
    images = {name: sorted(folder.glob("*.png")) for name, folder in concepts.items()}
    out = {}
    for job, row in rows.items():
        loras = {entry.split(":")[0] for entry in row["loras"].split(";") if entry}
        triggers = {t for t in row["embeddings"].split(";") if t}
        carried = [images[n] for n in sorted((loras | triggers) & set(concepts))]
        mine = [p for paths in carried for p in paths]
        reference = rows.get(row["reference"])

        def mean(embed, image: Path, concept_images=mine) -> float | None:
            features = embed(image)
            return sum(float(features @ embed(c)) for c in concept_images) / len(concept_images)

        png = run / row["image"]
        out[job] = {
            "clip_t": 100 * max(0.0, float(clip_image(png) @ clip_text(TEXTS[row["prompt"]]))),
            "clip_i": mean(clip_image, png) if mine else None,
            "dino_i": mean(dino_image, png) if mine else None,
            "reference_clip_i": mean(clip_image, run / reference["image"]) if mine and reference else None,
            "reference_dino_i": mean(dino_image, run / reference["image"]) if mine and reference else None,
        }
    return out


# --- batchgen's side -----------------------------------------------------------------------------------------------


def _cells(run: Path) -> dict[str, dict[str, str]]:
    with (run / "manifest.csv").open(newline="") as f:
        return {row["job_id"]: {c: row[c] for c in COLUMNS} for row in csv.DictReader(f)}


def _metric_args(root: Path) -> list[str]:
    concepts = ", ".join(f"{name}: {root / 'concepts' / name}" for name in CONCEPTS)
    return [
        f"sweep.metrics.clip={root / 'clip'}",
        f"sweep.metrics.dino={root / 'dinov2'}",
        f"+sweep.metrics.concepts={{{concepts}}}",
    ]


@pytest.fixture(scope="module")
def metrics_root(tiny_cache: Path) -> Path:
    return ensure_tiny_metrics(tiny_cache)


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("semantic-conf")
    (folder / "sweep").mkdir()
    (folder / "sweep" / "sem.yaml").write_text(SWEEP)
    return folder


@pytest.fixture(scope="module")
def measured(metrics_root: Path, conf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep rendered with sweep.metrics: the values are filled when the render ends."""
    run = tmp_path_factory.mktemp("semantic") / "with"
    assert main(["--config-dir", str(conf), "+sweep=sem", f"run.out_dir={run}", *_metric_args(metrics_root)]) == 0
    return run


def test_each_column_is_what_transformers_gives_from_the_pngs(measured: Path, metrics_root: Path) -> None:
    concepts = {name: metrics_root / "concepts" / name for name in CONCEPTS}
    expected = recomputed(measured, metrics_root / "clip", metrics_root / "dinov2", concepts)
    cells = _cells(measured)
    assert len(cells) == 8
    for job, values in expected.items():
        for column, value in values.items():
            if value is None:
                assert cells[job][column] == "", (job, column)
            else:
                assert abs(float(cells[job][column]) - value) <= 1e-4, (job, column, cells[job][column], value)
    filled = {c: sum(bool(cells[j][c]) for j in cells) for c in COLUMNS}
    # every job has clip_t; the portraits carry alf (all 4) and the LoRA jobs ink (6 of 8); the 6 LoRA jobs have
    # a reference with an image (the none stack's)
    assert filled == {"clip_t": 8, "clip_i": 7, "dino_i": 7, "reference_clip_i": 6, "reference_dino_i": 6}


def test_a_run_without_metrics_has_empty_columns_and_loads_no_clip_or_dino(
    conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cache: Path
) -> None:
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    def spy(*args, **kwargs):
        raise AssertionError("a measures model was loaded by a run without sweep.metrics")

    for cls in (CLIPModel, AutoModel, AutoProcessor, AutoImageProcessor):
        monkeypatch.setattr(cls, "from_pretrained", spy)
    monkeypatch.delitem(sys.modules, "batchgen.semantic", raising=False)
    run = tmp_path / "without"
    one_job = ["sweep.prompts=[a castle]", "~sweep.stacks.ink", "~sweep.stacks.ink_grain"]
    assert main(["--config-dir", str(conf), "+sweep=sem", f"run.out_dir={run}", *one_job]) == 0
    assert "batchgen.semantic" not in sys.modules  # the module that loads them was never imported
    with (run / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["status"] == "ok" and {rows[0][c] for c in COLUMNS} == {""}
    # `batchgen report` of such a run, in a process of its own: not even torch or transformers is imported.
    code = (
        "import sys; from batchgen.cli import main; code = main(['report', sys.argv[1]]); "
        "print(code, sorted(m for m in ('torch', 'transformers', 'batchgen.semantic') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr


def test_report_fills_the_columns_of_a_run_rendered_without_them(measured: Path, metrics_root: Path, tmp_path: Path):
    run = tmp_path / "older"
    shutil.copytree(measured, run)
    shutil.rmtree(run / ".batchgen")  # no recorded sweep.metrics: as rendered before it existed
    with (run / "manifest.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, [{**row, **dict.fromkeys(COLUMNS, "")} for row in reader]
    with (run / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    concepts = [a for name in CONCEPTS for a in ("--concept", f"{name}={metrics_root / 'concepts' / name}")]
    args = ["report", str(run), "--clip", str(metrics_root / "clip"), "--dino", str(metrics_root / "dinov2")]
    assert main([*args, *concepts]) == 0
    assert _cells(run) == _cells(measured)


def test_nothing_loads_when_every_cell_is_filled(measured: Path, metrics_root: Path, monkeypatch) -> None:
    from batchgen.assets.metric_models import MetricFolders, metric_models
    from batchgen.report.semantic import fill_semantic
    from batchgen.semantic import ClipModel, DinoModel

    def spy(self):
        raise AssertionError("loaded with nothing to fill")

    monkeypatch.setattr(ClipModel, "_load", spy)
    monkeypatch.setattr(DinoModel, "_load", spy)
    concepts = {name: metrics_root / "concepts" / name for name in CONCEPTS}
    models = metric_models(MetricFolders(metrics_root / "clip", metrics_root / "dinov2", concepts))
    assert fill_semantic(measured, models) == 0


@pytest.mark.parametrize(
    ("text", "syntax", "triggers", "words"),
    [
        ("a portrait of <alf> in <cartoona> style", "a1111", ["alf", "cartoona"], "a portrait of in style"),
        ("(castle:1.3), ((night)), [blurry]", "a1111", [], "castle, night, blurry"),
        ("[castle:forest:0.5] at night", "a1111", [], "forest at night"),
        ("[castle::0.5] at night", "a1111", [], "at night"),
        ("[forest:4] castle", "a1111", [], "forest castle"),
        ("[castle|forest|lake] at night", "a1111", [], "forest at night"),  # step 8 of 8: the 2nd of three
        ("castle BREAK night", "a1111", [], "castle night"),
        ("a \\(castle\\)   at\tnight", "a1111", [], "a (castle) at night"),
        ("(<alf>:0.7) in ink <lora:ink:0.5>", "a1111", ["alf"], "in ink"),
        ("a castle++ at (night)1.3", "compel", [], "a castle at night"),
        ('("a castle", "forest").blend(0.7, 0.3)', "compel", [], "a castle forest"),
        ('("a castle", "at night").and()', "compel", [], "a castle at night"),
        ("a <alf> (in ink)1.2", "compel", ["alf"], "a in ink"),
        ("(castle:1.3) , <alf>", "plain", ["alf"], "(castle:1.3),"),
        ("ink drawing, a castle", "a1111", [], "ink drawing, a castle"),
    ],
)
def test_plain_words(text: str, syntax: str, triggers: list[str], words: str) -> None:
    assert plain_words(text, syntax, 8, triggers) == words


def test_which_concepts_a_job_carries() -> None:
    def concept(name: str) -> Concept:
        return Concept(name, Path(name), (Path(name) / "1.png",))

    models = MetricModels(concepts=(concept("alf"), concept("mylora"), concept("ink")))
    assert [c.name for c in models.carried(["mylora-000004", "grain"], ["alf", "cartoona"])] == ["alf", "mylora"]
    assert concept_of("mylora", ["mylora"]) == "mylora"
    assert concept_of("mylora_3", ["mylora"]) == "mylora"
    assert concept_of("mylora2", ["mylora"]) is None  # another LoRA, not an epoch
    assert concept_of("ink-000002", ["ink", "ink-000002"]) == "ink-000002"  # a concept of its own wins


def test_the_tiny_models_and_concept_images_build_the_same_bytes(metrics_root: Path, tmp_path: Path) -> None:
    build_tiny_metrics(tmp_path)
    files = sorted(p.relative_to(metrics_root) for p in metrics_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 20  # clip/ 8, dinov2/ 3, concepts/ 3 x 3
    for file in files:
        assert (metrics_root / file).read_bytes() == (tmp_path / file).read_bytes(), file

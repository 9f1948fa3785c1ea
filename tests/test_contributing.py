"""CONTRIBUTING.md holds: its "Add a render setting" steps, followed literally in a copy of the package, give a
setting every consumer reads; and every base in the registry is in every table its "Add a base" steps name.

The setting is added to a copy (batchgen/, conf/ and tests/ under tmp_path, run in a subprocess): the schema, the
manifest columns, the axes and the grid axes are built from the settings table when their modules are imported, so
patching SETTINGS in this process would leave them as they were and prove nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from batchgen.assets import bases
from batchgen.assets.bases import BASES, DENOISERS, cross_attention_base, mmdit_checkpoint_base
from batchgen.assets.bases.record import SHIPPED_CONFIGS, Base
from batchgen.assets.block_weights import BLOCK_IDS, _presets_for
from batchgen.assets.module_table import clip_text_shapes, unet_shapes
from batchgen.assets.single_file import convert_transformer
from batchgen.engine.png import _checkpoint_sampler
from batchgen.errors import BatchgenError
from batchgen.tiny.build import TINY_MODELS, TRANSFORMER_TINY, UNET_TINY

ROOT = Path(__file__).resolve().parent.parent

# --- Add a render setting ------------------------------------------------------------------------------------------

# Step 1, as a contributor writes it: an int axis hashed only off its default, its column after the last one (columns
# never move), a grid and diff axis, and an A1111 key left out at the default.
FAKE_SETTING = """\
    Setting(
        name="fake_level",
        key="sweep.fake_level",
        type=int,
        check=functools.partial(ints, minimum=0),
        default=0,
        axis=True,
        job_id=JobId.OFF_DEFAULT,
        batch=True,
        column_after="reference_dino_i",
        grid=True,
        diff=True,
        a1111=A1111("Fake level", "{fake_level}", omit_at_default=True),
        empty_cell="0",
    ),
"""
# The job_id tests/test_settings.py's base sweep gets with fake_level=3 (its BASE_ID at the default).
FAKE_ID = "917030c52f182041"

# What a contributor checks beyond tests/test_settings.py: the one place each consumer reads the table, by name.
CONSUMERS = """\
import dataclasses
import io

from omegaconf import OmegaConf

from batchgen.axes import BASE_AXES
from batchgen.columns import DIFF_COLUMNS, EMPTY_CELLS, INDEX_COLUMNS, MANIFEST_COLUMNS, VOLATILE, png_job
from batchgen.config import SweepConfig
from batchgen.config.compose import compose_config
from batchgen.engine.png import a1111_parameters
from batchgen.engine.worker import batch_key
from batchgen.runner import dry_run
from batchgen.settings import AXES, GRID_AXES
from batchgen.spec import Job
from tests.test_plan import MODELS
from tests.test_settings import BASE_ID, BY_NAME, _plan

FAKE = BY_NAME["fake_level"]


def test_the_fake_setting_reaches_every_consumer() -> None:
    # config schema, and a command-line axis as a user writes it
    assert OmegaConf.to_container(OmegaConf.structured(SweepConfig(name="x")))["fake_level"] == 0
    assert list(compose_config(["+sweep=styles", "sweep.fake_level=[0,3]"]).config.sweep.fake_level) == [0, 3]
    # Job
    assert {f.name: f.default for f in dataclasses.fields(Job)}["fake_level"] == 0
    # planner axis and what --dry-run counts
    assert "fake_level" in AXES and "fake_level" in GRID_AXES and "fake_level" in BASE_AXES
    plan = _plan(FAKE, [0, 3])
    assert plan.axis_counts()["fake_level"] == 2 and len(plan.jobs) == 2
    out = io.StringIO()
    dry_run(compose_config(["+sweep=styles", "run.out_dir=dry"]), plan, out)
    assert "\\n  fake_level      2\\n" in out.getvalue()
    # job_id: as before at the default (written out or not), its own off it
    assert _plan().jobs[0].job_id == _plan(FAKE, 0).jobs[0].job_id == BASE_ID
    assert _plan(FAKE, 3).jobs[0].job_id == "{fake_id}"
    # manifest column in place, the plan's row, diff, the empty cell of an older manifest
    assert MANIFEST_COLUMNS[-2:] == ("reference_dino_i", "fake_level")
    row = _plan(FAKE, 3).table.iloc[0].to_dict()
    assert row["fake_level"] == 3
    assert "fake_level" in DIFF_COLUMNS and EMPTY_CELLS["fake_level"] == "0"
    assert "fake_level" not in INDEX_COLUMNS  # no index=Shown(...) given
    # batch key
    assert batch_key(_plan().jobs[0]) != batch_key(_plan(FAKE, 3).jobs[0])
    # PNG: the A1111 line off the default only, the JSON chunk always (a defining column)
    line = a1111_parameters(row, MODELS["sd1"]).split("\\n")[-1]
    assert "Fake level: 3" in line.split(", ")
    assert "Fake level" not in a1111_parameters(_plan().table.iloc[0].to_dict(), MODELS["sd1"])
    assert "fake_level" not in VOLATILE and png_job(row)["fake_level"] == 3
"""


def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "golden")
    for folder in ("batchgen", "conf", "tests"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def _edit(path: Path, anchor: str, insert: str, before: bool = True) -> None:
    """Insert `insert` at the one place `anchor` marks, as a contributor's edit would; a missing anchor means the
    file no longer reads as CONTRIBUTING.md describes it."""
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path.name}: expected one {anchor!r} to add the fake setting at"
    path.write_text(text.replace(anchor, insert + anchor if before else anchor + insert))


def _add_fake_setting(repo: Path) -> None:
    # Step 1: one Setting in SETTINGS (its column, index.html, PNG parameters and the rest come from there).
    _edit(repo / "batchgen" / "settings.py", ")\n\nAXES = ", FAKE_SETTING)
    # Step 2 (engine code using job.fake_level) and step 3 (png.py: only for a translated value or A1111's leading
    # keys) are nothing for a setting that changes no pixels and whose A1111 text is its value.
    # Step 4: tests/test_settings.py's OFF_DEFAULT and IDS_BEFORE, the pinned grid-axis order there (a grid axis
    # goes before `epoch`, which batchgen.axes adds last), and the pinned column order in tests/test_columns.py.
    test_settings = repo / "tests" / "test_settings.py"
    _edit(
        test_settings, '    "max_sequence_length": (77, None),\n', '    "fake_level": (3, "Fake level: 3"),\n', False
    )
    _edit(test_settings, '    "max_sequence_length": BASE_ID,', f'    "fake_level": "{FAKE_ID}",\n')
    _edit(test_settings, '        "epoch",\n    )', '        "fake_level",\n')
    test_columns = repo / "tests" / "test_columns.py"
    _edit(test_columns, ")\nRECORDED_BEFORE = ", '    "fake_level",\n')
    # and, there, the pinned diff columns and empty cells, as it has `diff` and `empty_cell`
    _edit(test_columns, "    )\n    assert columns.EMPTY_CELLS", '        "fake_level",\n')
    _edit(test_columns, 'columns.EMPTY_CELLS == {"clip_skip": "1"', ', "fake_level": "0"', False)
    (repo / "tests" / "test_fake_setting.py").write_text(CONSUMERS.replace("{fake_id}", FAKE_ID))


# tests/test_settings.py's cases per setting: each consumer the table feeds.
FAKE_CASES = (
    *("test_config_field_with_the_tables_default", "test_job_field_carries_the_value"),
    *("test_axis_and_manifest_column", "test_job_id", "test_batch_key_and_render_order", "test_grid_axis"),
    *("test_diff_setting", "test_png_parameter"),
)


def test_a_setting_added_as_contributing_says_reaches_every_consumer(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    _add_fake_setting(repo)
    # The setting's own cases of the table-walking tests, the tests pinning orders and lists, and the consumers.
    selected = "fake_level or every_setting or keep_their_order or test_columns or test_fake_setting"
    files = ["tests/test_fake_setting.py", "tests/test_settings.py", "tests/test_columns.py", "tests/test_cells.py"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:randomly", "-p", "no:cacheprovider", "-k", selected, *files],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # The copy, not this checkout, was tested: its fake setting's cases ran.
    # The copy's table, not this checkout's, was tested: the fake setting's own cases ran there.
    passed = set(re.findall(r"^(\S+) PASSED", done.stdout, re.M))
    own = [f"tests/test_settings.py::{name}[fake_level]" for name in FAKE_CASES]
    assert [case for case in own if case not in passed] == [], done.stdout[-3000:]
    assert "tests/test_cells.py::test_a_setting_cell_reads_back_as_its_value[fake_level]" in passed
    assert "tests/test_fake_setting.py::test_the_fake_setting_reaches_every_consumer" in passed


# --- Add a base ----------------------------------------------------------------------------------------------------


def _tiny_models() -> dict[str, str]:
    """base name -> tiny model name, from conf/model/tiny_*.yaml (`base:` and `builtin:`)."""
    found = {}
    for path in sorted((ROOT / "conf" / "model").glob("tiny_*.yaml")):
        conf = yaml.safe_load(path.read_text())
        assert conf["builtin"] == conf["checkpoint"] == path.stem, path
        found[conf["base"]] = path.stem
    return found


# Missing pieces known when this test was written, each with why; the test fails too when one gets fixed, so the
# entry goes with it.
KNOWN_GAPS = {
    # No tiny SD2 was ever built: SD2's own paths (1024-wide OpenCLIP, v-prediction) are tested from its shipped
    # configs and users' checkpoints only. Reported on issue 34.
    ("sd-2", "tiny model"): "tests/test_tiny.py",
}


def _missing(base: Base) -> list[str]:
    """What of CONTRIBUTING's "Add a base" steps the registries lack for `base`, one phrase each."""
    missing = []
    transformer = base.denoiser == "transformer"
    # Step 1: the record (tests/test_bases.py checks its fields against the shipped configs; its row of default
    # settings is tests/test_model_defaults.py SHIPPED, a KeyError there until it is added).
    if base.denoiser not in DENOISERS or base.denoiser not in ("unet", "transformer"):
        missing.append(f"denoiser '{base.denoiser}' (unet or transformer)")
    if base.block_ids:
        longest = base.block_ids[max(base.block_ids)]
        if any(not set(ids) <= set(longest) for ids in base.block_ids.values()):
            missing.append("block_ids: a shorter vector names ids the longest lacks")
        if transformer and base.module_block is None:
            missing.append("module_block (the CompVis UNet rule fits no transformer)")
        if BLOCK_IDS.get(base.name) != base.block_ids:
            missing.append("its block ids in block_weights.BLOCK_IDS")
        elif not _presets_for(base.name):
            missing.append("a LoRA Block Weight preset (block_weights.py, as FLUXALL)")
    if base.guidance not in ("cfg", "distilled"):
        missing.append(f"guidance '{base.guidance}' (cfg or distilled: Base.negative_pass reads it)")
    if transformer and not base.lora_block_names:
        missing.append("lora_block_names (a transformer LoRA's base is told by them)")
    if transformer and base.compel_clip_skips:
        missing.append("compel_clip_skips on a base whose pipeline encodes its prompts")
    # Step 2: the registry (tests/test_bases.py test_every_base_module_is_registered_once).
    if bases.BY_NAME.get(base.name) is not base:
        missing.append("BASES entry")
    # Step 3: shipped configs, read from its model_index.json (tests/test_bases.py checks the widths).
    index_path = base.shipped_configs / "model_index.json"
    if not index_path.is_file():
        return [*missing, f"shipped configs ({index_path})"]
    index = json.loads(index_path.read_text())
    if index.get("_class_name") != base.pipeline_class:
        missing.append(f"model_index.json _class_name {base.pipeline_class}")
    for component in (base.denoiser, *base.text_encoders, "vae", "scheduler"):
        if component not in index or not (base.shipped_configs / component).is_dir():
            missing.append(f"shipped configs of {component}")
    # Single files and checkpoint detection: a UNet base by its cross-attention width, an MMDiT by its block names.
    if transformer:
        if base.name not in {name for name, _ in bases._MMDIT_CHECKPOINT}:
            missing.append("_MMDIT_CHECKPOINT pattern (bases/__init__.py)")
    elif cross_attention_base(base.cross_attention_width) != base.name:
        missing.append("a cross_attention_width no other base has")
    # The PNG's Sampler from the shipped scheduler (the record's own_samplers or batchgen.schedulers).
    shipped = str(base.shipped_configs)
    if not (base.shipped_configs / "scheduler").is_dir() or _checkpoint_sampler(shipped, base.name) is None:
        missing.append("an A1111 sampler name for its scheduler (Base.own_samplers)")
    # Module table: a UNet base's from config files in plain Python (else a dry run imports torch); the
    # comparison with the meta build is tests/test_startup.py, which must list the configs.
    if not transformer:
        unet = json.loads((base.shipped_configs / "unet" / "config.json").read_text())
        if unet_shapes(unet) is None:
            missing.append("a module table for its UNet (assets/module_table.py)")
        for component in base.text_encoders:
            config = json.loads((base.shipped_configs / component / "config.json").read_text())
            if clip_text_shapes(config, config["architectures"] == ["CLIPTextModelWithProjection"]) is None:
                missing.append(f"a module table for {component} (assets/module_table.py)")
        if f'CONFIGS / "{base.name}"' not in (ROOT / "tests" / "test_startup.py").read_text():
            missing.append("its shipped configs in tests/test_startup.py _checkpoints")
    # Step 4: a tiny model, its name in TINY_MODELS and its builder's group, conf/model/tiny_<base>.yaml
    # (tests/test_tiny.py builds every TINY_MODELS entry). Step 5, its LoRA layouts, is the key tests' (lora_keys,
    # flux_lora_keys, sd3_lora_keys, mmdit); here only that its LoRAs can be told from other bases' (lora_block_names).
    tiny = _tiny_models().get(base.name)
    if tiny is None or tiny not in TINY_MODELS:
        missing.append("tiny model")
    elif tiny not in (TRANSFORMER_TINY if transformer else UNET_TINY):
        missing.append(f"{tiny} in {'TRANSFORMER_TINY' if transformer else 'UNET_TINY'} (tiny/build.py)")
    return missing


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
def test_every_base_is_in_every_registry_contributing_names(base: Base) -> None:
    missing = _missing(base)
    known = {piece for (name, piece) in KNOWN_GAPS if name == base.name}
    assert known <= set(missing), f"{base.name}: {sorted(known - set(missing))} now present; drop it from KNOWN_GAPS"
    unexpected = [piece for piece in missing if piece not in known]
    assert not unexpected, f"base {base.name} ({base.label}) lacks: " + "; ".join(unexpected)


def test_the_registries_tell_every_base_apart() -> None:
    # Two bases with the same TI widths, or two two-encoder TI bases, would read one base's TI as the other's
    # (bases.embedding_base; assets/embeddings.py names clip_l/clip_g files `sdxl`).
    widths = [b.embedding_widths for b in BASES if b.embedding_widths]
    assert len(set(widths)) == len(widths)
    assert [b.name for b in BASES if len(b.embedding_widths) == 2] == ["sdxl"]
    # Transformer LoRAs are told apart by names only their base has.
    names = [n for b in BASES for n in b.lora_block_names]
    assert len(set(names)) == len(names)
    assert BLOCK_IDS == {b.name: b.block_ids for b in BASES if b.block_ids}
    assert mmdit_checkpoint_base(["joint_blocks.0.x"]) == "sd-3"
    assert mmdit_checkpoint_base(["double_blocks.0.x"]) == "flux"


def test_every_transformer_base_has_its_single_file_converter() -> None:
    # convert_transformer converts by the record's converter: each transformer base names one that exists.
    for base in (b for b in BASES if b.denoiser == "transformer"):
        module, function = base.single_file_converter.split(":")
        assert callable(getattr(importlib.import_module(module), function)), base.name
        assert callable(importlib.import_module(module).transformer_keys), base.name


def test_a_base_without_a_single_file_converter_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, any base but FLUX.1 was converted as SD3, so a new base's file would have been read wrongly.
    fake = dataclasses.replace(bases.BY_NAME["sd-3"], name="fake", label="Fake", single_file_converter="")
    monkeypatch.setitem(bases.BY_NAME, "fake", fake)
    with pytest.raises(BatchgenError) as raised:
        convert_transformer("fake", {}, {})
    assert str(raised.value) == (
        "base 'fake' (Fake) has no single-file transformer converter (Base.single_file_converter); use a diffusers "
        "folder for it"
    )


def test_a_tiny_model_yaml_names_a_registered_base() -> None:
    assert set(_tiny_models()) <= set(bases.BASE_NAMES)
    assert sorted(_tiny_models().values()) == sorted(TINY_MODELS)
    assert sorted((*UNET_TINY, *TRANSFORMER_TINY)) == sorted(TINY_MODELS)


def test_a_base_missing_a_piece_is_named() -> None:
    """The checklist itself: a base record added without its configs or tiny model is reported by name."""
    import dataclasses

    fake = dataclasses.replace(bases.BY_NAME["flux"], name="fake-base", label="Fake")
    missing = _missing(fake)
    assert missing == [
        "its block ids in block_weights.BLOCK_IDS",
        "BASES entry",
        f"shipped configs ({SHIPPED_CONFIGS / 'fake-base' / 'model_index.json'})",
    ]


# --- Every name the guide gives ------------------------------------------------------------------------------------


def test_every_file_table_and_test_contributing_names_exists() -> None:
    """A step naming a file, a table or a test that was renamed or removed sends a contributor nowhere."""
    doc = re.sub(r"```.*?```", "", (ROOT / "CONTRIBUTING.md").read_text(), flags=re.S)  # the data-flow sketch
    spans = re.findall(r"`([^`\n]+)`", doc)
    source = "\n".join(p.read_text() for folder in ("batchgen", "tests") for p in (ROOT / folder).rglob("*.py"))
    found = {m.rstrip(".") for s in spans for m in re.findall(r"(?:batchgen|tests|conf)/[\w/.<>\-]+", s)}
    paths = {p for p in found if "<" not in p}  # `tests/test_<name>.py`: the contributor's own file
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []
    tables = {s for s in spans if re.fullmatch(r"_?[A-Z][A-Z0-9_]{2,}", s)}
    defined = [t for t in tables if re.search(rf'^\s*{t}\b[^\n=]*=|"{t}"', source, re.M)]
    assert sorted(tables - set(defined)) == []
    tests = {s for s in spans if re.fullmatch(r"test_\w+", s)}
    assert [t for t in sorted(tests) if f"def {t}(" not in source] == []
    assert len(paths) > 40 and len(tables) > 15  # the guide still names what it did when this was written

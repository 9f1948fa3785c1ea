"""LoRA globs: a training run's epoch files as one axis, in training order, labelled from kohya's metadata."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from batchgen.assets.epochs import epoch_label, epoch_order, final_name, is_glob, matching
from batchgen.spec import LoraFile
from tests.confs import SMALL, write_conf


def _file(name: str, epoch: int | None = None, steps: int | None = None) -> LoraFile:
    return LoraFile(name, Path(f"/l/{name}.safetensors"), epoch=epoch, steps=steps)


def test_globs_and_their_final_file() -> None:
    assert [is_glob(n) for n in ("mylora-*", "ep?", "a[12]", "ink")] == [True, True, True, False]
    assert final_name("mylora-*") == "mylora" and final_name("my_lora_e*") == "my_lora_e" and final_name("*") == ""
    names = ["mylora-000004", "mylora", "mylora-000008", "myloraxl", "other-000004"]
    assert matching("mylora-*", names) == ["mylora-000004", "mylora", "mylora-000008"]
    assert matching("MyLora-*", names) == []  # file names are matched as written


def test_training_order_and_labels() -> None:
    files = [_file("mylora", 10, 1900), _file("mylora-000008", 8, 1520), _file("mylora-000004", 4, 760)]
    assert [f.name for f in epoch_order(files)] == ["mylora-000004", "mylora-000008", "mylora"]
    # No metadata: the number in the name, then the name; files that have an epoch come first.
    bare = [_file("run-10"), _file("run-9"), _file("run-final"), _file("run-2", epoch=12)]
    assert [f.name for f in epoch_order(bare)] == ["run-2", "run-9", "run-10", "run-final"]
    assert epoch_order([_file("b", steps=200), _file("a", steps=100)])[0].name == "a"  # steps break ties
    assert epoch_label(_file("mylora-000004", 4, 760), "mylora-*") == "mylora e4 (760 steps)"
    assert epoch_label(_file("mylora-000004", 4), "mylora-*") == "mylora e4"
    assert epoch_label(_file("mylora-000004"), "mylora-*") == "mylora-000004"


def _epoch_files(folder: Path, source: Path, epochs: dict[str, tuple[int, int, float]]) -> None:
    """Copies of a tiny LoRA as the epochs of one training run: kohya's metadata, weights scaled per epoch so the
    images differ."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(source)
    for name, (epoch, steps, scale) in epochs.items():
        scaled = {k: v * scale if k.endswith("lora_up.weight") else v for k, v in tensors.items()}
        save_file(scaled, folder / f"{name}.safetensors", {"ss_epoch": str(epoch), "ss_steps": str(steps)})


@pytest.mark.slow
def test_an_epoch_sweep_orders_labels_and_renders_only_a_new_epoch(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    source = next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors"))
    _epoch_files(
        folder, source, {"mylora-000002": (2, 380, 0.5), "mylora": (6, 1140, 1.5), "mylora-000004": (4, 760, 1.0)}
    )
    main = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    body = "  prompts: ['a castle']\n  stacks: {epochs: {'mylora-*': 1.0}}\n  grid: {x: epoch, y: seed}\n" + SMALL
    conf = write_conf(tmp_path / "conf", "e", body, {"mine": f"base: sd-1\ncheckpoint: {main}\nloras: [{folder}]\n"})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=e", "--list")
    assert code == 0, err
    assert ", epoch 4, 760 steps" in next(line for line in out.splitlines() if "mylora-000004" in line)
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=e", "--dry-run")
    assert code == 0, err
    assert "  epoch           3\n" in out and "4 new" in out  # and the no-LoRA reference
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=e")
    assert code == 0, err
    rows = pd.read_csv(tmp_path / "runs/e/manifest.csv", dtype=str, keep_default_na=False)
    assert list(rows["stack"])[0] == "(reference)" and rows["epoch"][0] == ""  # the no-LoRA job renders first
    table = rows.iloc[1:]
    assert list(table["epoch"]) == ["mylora e2 (380 steps)", "mylora e4 (760 steps)", "mylora e6 (1140 steps)"]
    assert set(table["reference"]) == {rows["job_id"][0]} and (table["effect"] != "").all()
    assert list(table["loras"]) == ["mylora-000002:1", "mylora-000004:1", "mylora:1"]
    assert set(table["stack"]) == {"epochs"} and set(table["status"]) == {"ok"}
    assert table["image_sha256"].nunique() == 3
    assert sorted(p.name for p in (tmp_path / "runs/e/grids").iterdir()) == ["mine.png"]  # one grid, 3 columns
    assert (tmp_path / "runs/e/plots/strength-mine.png").is_file()  # a curve per epoch (one point each)
    # A new epoch file lands: the next run renders only its job.
    _epoch_files(folder, source, {"mylora-000005": (5, 950, 1.2)})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=e")
    assert code == 0, err
    assert "e: 1 to render, 4 already done, 0 skipped" in err
    table = pd.read_csv(tmp_path / "runs/e/manifest.csv", dtype=str, keep_default_na=False)
    assert table.iloc[-1]["epoch"] == "mylora e5 (950 steps)"


def test_a_glob_matching_nothing_names_the_pattern_and_the_folders(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    main = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    body = "  prompts: ['a castle']\n  stacks: {epochs: {'mylora-*': 1.0}}\n" + SMALL
    conf = write_conf(tmp_path / "conf", "e", body, {"mine": f"base: sd-1\ncheckpoint: {main}\nloras: [{folder}]\n"})
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=e", "--dry-run")
    assert code == 2
    assert err.strip() == (
        f"batchgen: error: sweep.stacks.epochs: 'mylora-*' matches no LoRA file in {folder}; check the pattern "
        "(a glob over file names without the extension, e.g. mylora-*)"
    )


def test_a_glob_matching_for_one_model_only_skips_the_other(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    _epoch_files(folder, next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors")), {"mylora-000002": (2, 380, 1.0)})
    main = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    body = "  prompts: ['a castle']\n  stacks: {epochs: {'mylora-*': 1.0}}\n" + SMALL
    models = {"mine": f"base: sd-1\ncheckpoint: {main}\nloras: [{folder}]\n", "tiny_sdxl": None}
    conf = write_conf(tmp_path / "conf", "e", body, models)
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=e", "--dry-run")
    assert code == 0, err
    assert "2 new" in out and "skipped 1: no LoRA file of model tiny_sdxl matches 'mylora-*'" in out

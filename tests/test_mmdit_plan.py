"""What SD3 and FLUX.1 models cannot render, refused before any model loads with one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchgen.tiny import tiny_root
from tests.confs import SMALL, write_conf

NO_LORAS = ("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.pastel")
FLUX_ONLY = ("+sweep=next", "sweep.models=[tiny_flux]", *NO_LORAS, "--dry-run")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sweep.prompts=['a (cat:1.2)']",
            "sweep.prompts[0]: 'a (cat:1.2)' uses a1111 syntax, but model tiny_flux is FLUX.1, whose pipeline reads "
            "each text as written (no weights, BREAK or prompt editing); set sweep.prompt_syntax=plain to pass it as "
            "written, or remove the syntax",
        ),
        (
            "sweep.scheduler=euler",
            "sweep.scheduler: 'euler' cannot render tiny_flux (FLUX.1), whose flow-matching scheduler is its own; "
            "use default, or a sweep without tiny_flux",
        ),
        (
            "sweep.clip_skip=2",
            "sweep.clip_skip: 2, but model tiny_flux is FLUX.1, whose pipeline encodes its prompts itself; use 1",
        ),
        (
            "sweep.prompt_syntax=compel",
            "model tiny_flux: prompt_syntax=compel is not set up for base 'flux'; use prompt_syntax=a1111 or plain",
        ),  # fmt: skip
        (
            "sweep.max_sequence_length=600",
            "sweep.max_sequence_length: 600 is more tokens than T5 reads in SD3 and FLUX.1; use 1 to 512",
        ),
    ],
)
def test_settings_a_flux_model_cannot_render_are_refused(run_cli, override: str, message: str) -> None:
    code, out, err = run_cli(*FLUX_ONLY, override)
    assert (code, out, err) == (2, "", f"batchgen: error: {message}\n")


def test_plain_syntax_passes_weights_through_as_text(run_cli) -> None:
    code, out, err = run_cli(*FLUX_ONLY, "sweep.prompts=['a (cat:1.2)']", "sweep.prompt_syntax=plain")
    assert code == 0, err
    assert "jobs: 2 to render in total" in out  # 1 prompt x 2 seeds on tiny_flux
    assert "  max_sequence_length  1\n" in out


def test_max_sequence_length_without_a_t5_model_is_a_warning_and_changes_no_job(run_cli) -> None:
    code, plain, err = run_cli("+sweep=styles", "--dry-run")
    assert code == 0, err
    code, out, err = run_cli("+sweep=styles", "sweep.max_sequence_length=77", "--dry-run")
    assert code == 0, err
    assert err == (
        "batchgen: warning: sweep.max_sequence_length: 77 has no effect here: no model of this sweep has T5 to read "
        "it (tiny_sd1 is SD1, tiny_sdxl is SDXL); its jobs render as at 0\n"
    )
    assert out == plain


def test_max_sequence_length_in_a_mixed_sweep_leaves_the_sdxl_jobs_as_they_were(run_cli) -> None:
    mixed = ("+sweep=styles", "+model@models.tiny_flux=tiny_flux", "sweep.models=[tiny_sdxl,tiny_flux]",
             "sweep.prompts=[a castle]", "~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.peft",
             "~sweep.stacks.lycoris", "sweep.seeds=[1]", "--dry-run")  # fmt: skip
    code, out, err = run_cli(*mixed)
    assert code == 0, err
    assert "jobs: 2 to render in total" in out
    code, out, err = run_cli(*mixed, "sweep.max_sequence_length=[0,77]")
    assert code == 0, err
    # 2 rows per model; the SDXL pair is one job (CLIP reads no max_sequence_length), FLUX.1's are two
    assert "combinations" in out and "jobs: 3 to render in total" in out


@pytest.mark.parametrize(
    ("base", "model", "dropped", "message"),
    [
        ("flux", "tiny_flux", "text_encoder_2", "has no text_encoder_2/ (T5-XXL), which FLUX.1 conditions on; copy "
         "text_encoder_2/ and tokenizer_2/ from black-forest-labs/FLUX.1-dev into it"),
        ("sd-3", "tiny_sd3", "text_encoder_2", "has no text_encoder_2/ (OpenCLIP-bigG), which SD3/SD3.5 conditions "
         "on; copy text_encoder_2/ and tokenizer_2/ from stabilityai/stable-diffusion-3.5-large into it"),
    ],
)  # fmt: skip
def test_a_folder_without_a_text_encoder_its_base_needs_is_refused(
    run_cli, tmp_path: Path, tiny_cache: Path, base: str, model: str, dropped: str, message: str
) -> None:
    source = tiny_root(model, tiny_cache) / "main" / model
    folder = tmp_path / "incomplete"
    folder.mkdir()
    for entry in source.iterdir():
        if entry.name != dropped:
            (folder / entry.name).symlink_to(entry)
    conf = write_conf(tmp_path / "conf", "probe", SMALL, {"broken": f"base: {base}\ncheckpoint: {folder}\n"})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=probe", "--dry-run")
    assert (code, out) == (2, "")
    assert err == f"batchgen: error: models.broken.checkpoint: {folder} {message}\n"


def test_a_base_that_disagrees_with_the_pipeline_class_is_refused(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    folder = tiny_root("tiny_flux", tiny_cache) / "main" / "tiny_flux"
    conf = write_conf(tmp_path / "conf", "probe", SMALL, {"wrong": f"base: sd-3\ncheckpoint: {folder}\n"})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=probe", "--dry-run")
    assert (code, out) == (2, "")
    assert err == (
        f"batchgen: error: models.wrong.base: 'sd-3' but {folder} is flux (its model_index.json); fix base\n"
    )


def test_flux_reads_no_negative_prompt_so_it_is_no_part_of_its_job(run_cli, tmp_path: Path) -> None:
    """Two jobs that differ only in their negative prompt are one FLUX.1 job (its guidance is distilled: no
    negative pass), recorded with none, and rendered once; on SD3, which runs a negative pass, they stay two."""
    import pandas as pd

    from batchgen.config import compose_config
    from batchgen.runner import prepare

    csv = tmp_path / "p.csv"
    csv.write_text("prompt,negative_prompt\na castle,blurry\na castle,\n")
    both = ("+sweep=next", *NO_LORAS, "sweep.prompts=[]", f"sweep.prompts_file={csv}", "sweep.seeds=[1]")
    table = prepare(compose_config(list(both))).table
    flux, sd3 = (table.loc[table["model"] == m] for m in ("tiny_flux", "tiny_sd3"))
    assert (len(flux), flux["job_id"].nunique(), set(flux["negative_prompt"])) == (2, 1, {""})
    assert (len(sd3), sd3["job_id"].nunique(), list(sd3["negative_prompt"])) == (2, 2, ["blurry", ""])
    # A FLUX.1 job with an empty negative prompt keeps the id it had when the negative was hashed, SD3 its ids.
    assert flux["job_id"].iloc[0] == "476e5b23b423f60a"  # its id on main at 762a4af
    assert list(sd3["job_id"]) == ["be64ea380193aa59", "ed5861de6abdbb2d"]
    code, out, err = run_cli(*both, "sweep.models=[tiny_flux]", "sweep.steps=1")
    assert code == 0, err
    manifest = pd.read_csv("runs/next/manifest.csv", dtype=str, keep_default_na=False)
    assert (list(manifest["status"]), list(manifest["negative_prompt"])) == (["ok"], [""])

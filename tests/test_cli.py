"""The command line end to end on the embedded tiny models: compose, dry-run, render, resume, errors."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from batchgen.config import compose_config, packaged_conf_dir
from batchgen.executors.registry import executor_options
from batchgen.tiny import ensure_tiny

CONF = packaged_conf_dir()
# One seed keeps the end-to-end renders small; the axis itself is tested by the dry-run counts.
SMALL = ("+sweep=styles", "sweep.seeds=[1]")
# Hydra merges a dict given on the command line into the composed one, so stacks are removed with ~.
NO_LORAS = ("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.peft", "~sweep.stacks.lycoris")


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_every_sweep_composes(sweep: str) -> None:
    composed = compose_config([f"+sweep={sweep}"])
    assert composed.config.sweep.name == sweep
    assert set(composed.config.sweep.models) <= set(composed.config.models)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_composes(model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHGEN_SD15", str(tmp_path / "sd15"))
    monkeypatch.setenv("BATCHGEN_SDXL", str(tmp_path / "sdxl"))
    composed = compose_config(["+sweep=styles", f"+model@models.extra={model}"])
    extra = composed.config.models["extra"]
    assert extra.base in ("sd-1", "sdxl", "sd-3", "flux")
    assert extra.checkpoint in (model, str(tmp_path / model.replace("15", "15")))


def test_every_executor_composes() -> None:
    for executor in sorted(p.stem for p in (CONF / "executor").glob("*.yaml")):
        section = compose_config(["+sweep=styles", f"executor={executor}"]).config.executor
        assert executor_options(section).name == executor


def test_cfg_prints_composed_config_with_axis(run_cli) -> None:
    code, out, _ = run_cli("+sweep=styles", "sweep.stacks.ink.ink=0.4,0.6,0.8", "--cfg")
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["sweep"]["stacks"]["ink"] == {"ink": [0.4, 0.6, 0.8]}
    assert printed["run"]["out_dir"] == "runs/styles"
    assert printed["executor"] == {"name": "local", "devices": "auto"}


def test_cfg_refuses_a_bad_executor_section(cli) -> None:
    code, out, err = cli("+sweep=styles", "+executor.nodes=4", "--cfg")
    assert (code, out) == (2, "")
    assert err.strip() == "batchgen: error: executor.nodes: not a setting of executor=local; it takes name, devices"


@pytest.mark.parametrize(
    ("overrides", "combinations", "skipped"),
    [
        ((), 72, 0),  # 2 models x 6 stack states x 3 prompts x 2 seeds
        (("sweep.stacks.ink.ink=0.4,0.6,0.8",), 84, 0),
        (("sweep.seeds=range(1,4)",), 108, 0),
        (("sweep.models=[tiny_sd1]", "sweep.width=64,128"), 72, 0),
    ],
)
def test_dry_run_counts(run_cli, overrides: tuple[str, ...], combinations: int, skipped: int) -> None:
    code, out, _ = run_cli("+sweep=styles", *overrides, "--dry-run")
    assert code == 0
    assert out.startswith(f"sweep styles: {combinations} combinations -> runs/styles\n")
    assert f"jobs: {combinations - skipped} to render in total, {combinations - skipped} new" in out
    assert not Path("runs").exists()


def test_dry_run_refuses_what_a_render_refuses_about_the_executor(run_cli) -> None:
    code, out, err = run_cli("+sweep=styles", "executor.devices=[0,1]", "--dry-run")
    assert (code, out) == (2, "")
    assert err == (
        "batchgen: error: executor.devices=[0, 1] names CUDA devices but none is visible; use executor.devices=2 "
        "for 2 CPU workers\n"
    )


def test_render_resume_and_new_weight(run_cli) -> None:
    code, out, err = run_cli(*SMALL)
    assert code == 0, err
    run = Path("runs/styles")
    table = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == 36 and set(table["status"]) == {"ok"}
    assert table["job_id"].is_unique
    for row in table.itertuples():
        with Image.open(run / row.image) as image:
            image.load()
            assert image.size == (64, 64)
            assert image.text["parameters"].startswith(row.prompt)
    assert "render: 36/36 images" in err  # plain progress lines when not on a terminal
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["tiny_sd1.png", "tiny_sdxl.png"]
    assert (run / "index.html").is_file()
    (run / "index.html").unlink()
    # x=seed, y=stack leaves model (2) x prompt (3) as the grids
    code, out, _ = run_cli("report", str(run), "--x", "seed", "--y", "stack")
    assert code == 0 and out == f"6 grids, 2 strength plots, {run / 'index.html'}\n"
    assert 'src="images/' in (run / "index.html").read_text()
    invocations = [p for p in (run / ".batchgen").iterdir() if p.is_dir()]  # beside them libraries.log
    assert len(invocations) == 1
    assert yaml.safe_load((invocations[0] / "overrides.yaml").read_text()) == list(SMALL)

    before = (run / "manifest.csv").read_bytes()
    code, out, _ = run_cli(*SMALL)
    assert code == 0
    assert "rendered 0, failed 0, skipped 0, already done 36" in out
    assert (run / "manifest.csv").read_bytes() == before

    code, out, _ = run_cli(*SMALL, "sweep.stacks.ink.ink=0.5,0.75,1.0")
    assert code == 0
    assert "rendered 6, failed 0, skipped 0, already done 36" in out  # 2 models x 3 prompts at ink 0.75
    table = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == 42
    assert set(table["loras"].iloc[36:]) == {"ink:0.75"}


def test_missing_image_is_rendered_again(run_cli) -> None:
    args = (*SMALL, *NO_LORAS, "sweep.models=[tiny_sd1]", "sweep.prompts=[a castle]")
    assert run_cli(*args)[0] == 0
    run = Path("runs/styles")
    first = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(first) == 1
    (run / first["image"][0]).unlink()
    code, out, _ = run_cli(*args)
    assert code == 0 and "rendered 1," in out
    second = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(second) == 2 and second["image_sha256"][1] == first["image_sha256"][0]


def test_png_parameters_follow_a1111(run_cli) -> None:
    args = (*SMALL, *NO_LORAS, "~sweep.stacks.none", "+sweep.stacks.s={ink: 0.5}", "sweep.models=[tiny_sd1]")
    args = (*args, "sweep.references=false")  # the one row is the LoRA job
    args = (*args, "sweep.prompts=['<alf> at night']")
    assert run_cli(*args)[0] == 0
    run = Path("runs/styles")
    row = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False).iloc[0]
    with Image.open(run / row["image"]) as image:
        text = image.text["parameters"]
        job = image.text["batchgen"]
    prompt, negative, fields = text.split("\n")
    assert prompt == "<alf> at night <lora:ink:0.5>"
    assert negative == "Negative prompt: blurry"
    # A1111's own key/value pattern for the last line
    pairs = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', fields))
    assert pairs["Steps"] == "8" and pairs["CFG scale"] == "7.5" and pairs["Seed"] == "1"
    assert pairs["Sampler"] == "DDIM"  # the tiny checkpoint's own scheduler, by its A1111 name
    assert pairs["Size"] == "64x64" and pairs["Model"] == "tiny_sd1" and len(pairs["Model hash"]) == 10
    assert re.fullmatch(r'"ink: [0-9a-f]{12}"', pairs["Lora hashes"])
    ink = (ensure_tiny("tiny_sd1") / "lora" / "ink.safetensors").read_bytes()
    addnet = hashlib.sha256(ink[8 + int.from_bytes(ink[:8], "little") :]).hexdigest()[:12]
    assert pairs["Lora hashes"] == f'"ink: {addnet}"'  # what A1111 writes for a safetensors LoRA: tensor data only
    assert re.fullmatch(r'"alf: [0-9a-f]{12}"', pairs["TI hashes"])
    assert f'"job_id": "{row["job_id"]}"' in job


def test_config_dir_adds_and_shadows(run_cli, tmp_path: Path) -> None:
    user = tmp_path / "myconf"
    (user / "sweep").mkdir(parents=True)
    (user / "sweep" / "mine.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - /model@models.tiny_sd1: tiny_sd1\n"
        "sweep:\n  name: mine\n  prompts: ['a cat']\n  stacks: {none: {}, g: {grain: [0.5, 1.0]}}\n"
        "  seeds: [1, 2, 3]\n  width: 64\n  height: 64\n  steps: 4\n"
    )
    (user / "sweep" / "styles.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /model@models.tiny_sd1: tiny_sd1\n"
        "sweep:\n  name: shadowed\n  prompts: ['a dog']\n"
    )
    code, out, _ = run_cli("--config-dir", str(user), "+sweep=mine", "--dry-run")
    assert code == 0 and out.startswith("sweep mine: 9 combinations -> runs/mine\n")
    code, out, _ = run_cli("--config-dir", str(user), "+sweep=styles", "--dry-run")
    assert code == 0 and out.startswith("sweep shadowed: 1 combinations")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("+sweep=nope",),
            "sweep config 'nope' not found; available: metrics_demo, next, styles (add your own folder with "
            "--config-dir)",
        ),
        (("+sweep=styles", "sweep.models=[sd3]"), "sweep.models: unknown model 'sd3'"),
        (
            ("+sweep=styles", "models.tiny_sd1.checkpoint=/nowhere/model"),
            "models.tiny_sd1.checkpoint: /nowhere/model does not exist; fix the path in model/tiny_sd1.yaml",
        ),
        (
            ("+sweep=styles", "+sweep.stacks.s={inky: 1.0}"),
            "sweep.stacks.s: LoRA 'inky' is not found for any model (did you mean 'ink'?)",
        ),
        (
            ("+sweep=styles", "sweep.prompts=['<alfa> cat']"),
            "sweep.prompts[0]: embedding <alfa> is not found for any model (did you mean <alf>?)",
        ),
        (("+sweep=styles", "sweep.stacks.ink.ink=heavy"), "sweep.stacks.ink.ink: weight 'heavy' is not a number"),
        (("+sweep=styles", "sweep.seeds=[]"), "sweep.seeds is empty; give at least one value"),
        (("+sweep=styles", "sweep.colour=red"), "override 'sweep.colour=red': sweep has no key 'colour'; its keys"),
        (("+sweep=styles", "sweep.colour=red,blue"), "override 'sweep.colour=red,blue': sweep has no key 'colour'"),
        (("+sweep=styles", "run.out_dir=a,b"), "override 'run.out_dir=a,b': a list of values is an axis only on"),
        (("+sweep=styles", "sweep.steps=[1"), "bad override 'sweep.steps=[1':"),
        (("+sweep=styles", "sweep.steps=0"), "sweep.steps: '0' is not an integer >= 1"),
        ((), "no sweep selected: add +sweep=NAME (available: metrics_demo, next, styles)"),
        (
            ("+sweep=styles", "sweep.negative_prompt=[a, b]"),
            "override 'sweep.negative_prompt=[a, b]': Cannot convert 'list' to string: '['a', 'b']'; give "
            "sweep.negative_prompt a value of its type",
        ),
        (
            ("+sweep=styles", "models.tiny_sd1.base=sd-9"),
            "models.tiny_sd1.base: 'sd-9' is not one of sd-1, sd-2, sdxl",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(run_cli, args: tuple[str, ...], message: str) -> None:
    code, out, err = run_cli(*args)
    assert code == 2
    assert err.startswith(f"batchgen: error: {message}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not Path("runs").exists()


def test_a_slot_given_on_the_command_line_that_no_prompt_uses_is_one_warning(run_cli) -> None:
    code, out, err = run_cli(*SMALL, "+sweep.slots.mood=[calm,angry]", "--dry-run")
    assert code == 0
    assert err == (
        "batchgen: warning: sweep.slots.mood: no prompt contains {mood}, so its values are never rendered; put {mood} "
        "in a prompt, or remove the slot (~sweep.slots.mood on the command line)\n"
    )
    assert run_cli(*SMALL, "--dry-run")[1] == out  # the same jobs as without it


OUTD = "<lora:ink:1:lbw=OUTD>"
VECTOR = "<lora:ink:0.5:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>"


@pytest.mark.parametrize(
    ("override", "prompts", "loras"),
    [
        (f"sweep.prompts=['a fox {OUTD}']", ["a fox " + OUTD], ["ink:1:lbw=OUTD"]),
        (  # the vector's commas stay in its prompt
            f"sweep.prompts=[\"a fox {VECTOR}\", 'a cat']",
            ["a fox " + VECTOR, "a cat"],
            ["", "ink:0.5:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"],
        ),
    ],
)
def test_a_quoted_lbw_tag_reads_as_written_in_a1111(run_cli, override: str, prompts: list, loras: list) -> None:
    args = ("+sweep=styles", "~sweep.slots.style", "sweep.models=[tiny_sd1]", *NO_LORAS, override)
    assert compose_config(list(args)).config.sweep.prompts == prompts
    code, out, err = run_cli(*args, "sweep.seeds=[1]", "sweep.steps=1", "sweep.references=false")
    assert code == 0, err
    assert sorted(pd.read_csv("runs/styles/manifest.csv", dtype=str, keep_default_na=False)["loras"]) == loras


def test_a_tagged_block_vector_of_another_bases_length_names_its_prompt(run_cli) -> None:
    code, out, err = run_cli("+sweep=styles", "~sweep.slots.style", f"sweep.prompts=['a fox {VECTOR}']", "--dry-run")
    assert (code, out) == (2, "")
    assert err.startswith("batchgen: error: sweep.prompts[0].ink.blocks: 17 block weights for sdxl (17 is the ")


@pytest.mark.parametrize(
    ("override", "what", "fixed", "value"),
    [
        (
            f"sweep.prompts=[a fox {OUTD}]",
            "each prompt",
            f"\"sweep.prompts=['a fox {OUTD}']\"",
            ["a fox " + OUTD],
        ),
        (
            f"sweep.prompts=[a fox's tail {VECTOR}, a cat]",
            "each prompt (Hydra splits a list at its commas)",
            f"\"sweep.prompts=['a fox\\\\'s tail {VECTOR}', 'a cat']\"",
            ["a fox's tail " + VECTOR, "a cat"],
        ),
        (
            "+sweep.slots.style=[<cartoona> style, (ink:1.2) drawing]",
            "each value (Hydra splits a list at its commas)",
            "\"+sweep.slots.style=['<cartoona> style', '(ink:1.2) drawing']\"",
            ["<cartoona> style", "(ink:1.2) drawing"],
        ),
        (
            f"sweep.negative_prompt=blurry, {OUTD}",
            "the text",
            f"\"sweep.negative_prompt='blurry, {OUTD}'\"",
            "blurry, " + OUTD,
        ),
    ],
)
def test_an_unquoted_prompt_override_says_exactly_how_to_quote_it(
    run_cli, override: str, what: str, fixed: str, value
) -> None:
    code, out, err = run_cli("+sweep=styles", override, "--dry-run")
    assert (code, out) == (2, "")
    assert err == (
        f"batchgen: error: bad override '{override}': Hydra reads prompt text with < > ( ) = only inside quotes; "
        f"quote {what}, and the whole override for the shell: {fixed}\n"
    )
    # What a POSIX shell passes on for the advice is the value meant, as Hydra reads it.
    (as_typed,) = shlex.split(fixed)
    key = override.split("=")[0].lstrip("+")
    node = compose_config(["+sweep=styles", as_typed]).config
    for part in key.split("."):
        node = getattr(node, part) if not isinstance(node, dict) else node[part]
    assert node == value


def test_models_missing_a_trigger_get_skipped_rows(run_cli) -> None:
    args = (*SMALL, *NO_LORAS, "sweep.prompts=['<grainy> cat']")
    code, out, _ = run_cli(*args)
    assert code == 0
    table = pd.read_csv("runs/styles/manifest.csv", dtype=str, keep_default_na=False)
    assert list(table["status"]) == ["skipped", "ok"]  # skipped rows are recorded before rendering starts
    assert table["error"][0] == "embedding <grainy> not found for model tiny_sdxl"
    assert run_cli(*args)[0] == 0
    assert len(pd.read_csv("runs/styles/manifest.csv", dtype=str)) == 2  # not recorded twice


def test_failed_job_is_recorded_and_exit_code_is_1(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgen.engine import worker

    real = worker.Renderer._generate

    def flaky(self, pipe, batch, embeds):
        if batch[0].seed == 2:
            raise RuntimeError("simulated fault")
        return real(self, pipe, batch, embeds)

    monkeypatch.setattr(worker.Renderer, "_generate", flaky)
    args = ("+sweep=styles", *NO_LORAS, "sweep.models=[tiny_sd1]", "sweep.prompts=[a castle]", "sweep.seeds=[1,2]")
    args = (*args, "sweep.batch_size=1")
    code, out, err = run_cli(*args)
    assert code == 1
    assert "rendered 1, failed 1" in out
    assert "RuntimeError: simulated fault" in err
    table = pd.read_csv("runs/styles/manifest.csv", dtype=str, keep_default_na=False)
    assert list(table["status"]) == ["ok", "failed"]
    assert table["error"][1] == "RuntimeError: simulated fault" and table["image"][1] == ""
    monkeypatch.setattr(worker.Renderer, "_generate", real)
    code, out, _ = run_cli(*args)  # failed jobs have no ok row, so the next run renders them
    assert code == 0 and "rendered 1, failed 0, skipped 0, already done 1" in out


def test_appending_is_accepted_where_the_user_fills_a_mapping(run_cli) -> None:
    # New stacks, slots, LoRA triggers, block presets and grid.z (a schema key) take '+'; the dry run plans them.
    code, out, err = run_cli(
        *SMALL,
        "+sweep.stacks.mine={ink: 0.3}",
        "+sweep.slots.light=[dusk]",
        "+sweep.lora_triggers.ink=ink drawing",
        "+sweep.block_presets.MINE='1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1'",
        "+sweep.grid.z=seed",
        "--dry-run",
    )
    assert code == 0, err
    # 6 stack labels + mine + (reference) for the prompts given trigger words; 3 prompts, 2 of them also with words
    assert "  stack           8\n" in out and "  prompt          5\n" in out

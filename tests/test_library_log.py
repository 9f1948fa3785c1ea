"""Libraries' warnings go to the run's .batchgen/libraries.log, not the console; the ones that change the images are
said again in batchgen's own one-line form."""

from __future__ import annotations

import io
import logging
import shutil
import warnings
from pathlib import Path

from safetensors.torch import load_file, save_file

from batchgen import library_log
from tests.confs import SMALL, write_conf

REPORT = (
    "\x1b[1mCLIPTextModel LOAD REPORT\x1b[0m from: /m/text_encoder\n"
    "Key | Status\n text_model.final_layer_norm.weight | MISSING\n"
)


def test_routed_warnings_reach_the_log_and_the_ones_that_matter_the_console(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(library_log.VERBOSE_ENV, raising=False)
    log, console = tmp_path / ".batchgen" / "libraries.log", io.StringIO()
    logger = logging.getLogger("transformers.modeling_utils")
    before = list(logging.getLogger("transformers").handlers)
    with library_log.routed(log, console):
        logger.warning("Some config attributes were passed but are not expected and will be ignored")
        logger.warning(REPORT)
        logger.warning(REPORT)  # said once
        warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=1)
    assert console.getvalue() == (
        "batchgen: warning: /m/text_encoder: CLIPTextModel lacks weights the model needs; they were initialised at "
        f"random, so its images will be noise: give a complete model folder or file (the list is in {log})\n"
    )
    text = log.read_text()
    assert "transformers.modeling_utils WARNING: Some config attributes were passed" in text
    assert "CLIPTextModel LOAD REPORT from: /m/text_encoder" in text and "\x1b" not in text
    assert "FutureWarning: `foo` is deprecated" in text
    assert set(logging.getLogger("transformers").handlers) == set(before)  # undone; a detached default returns last


def test_routing_leaves_the_libraries_verbosity_as_it_found_it(tmp_path: Path, monkeypatch) -> None:
    import transformers.utils.logging as transformers_logging

    monkeypatch.delenv(library_log.VERBOSE_ENV, raising=False)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # as a program embedding batchgen (the bench) may set it
    try:
        with library_log.routed(tmp_path / "libraries.log", io.StringIO()):
            library_log.settle()
            assert transformers_logging.get_verbosity() == logging.WARNING  # routed: warnings reach the log
        assert transformers_logging.get_verbosity() == logging.ERROR
    finally:
        transformers_logging.set_verbosity(before)


def test_verbose_leaves_the_libraries_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(library_log.VERBOSE_ENV, "1")
    log, console = tmp_path / "libraries.log", io.StringIO()
    with library_log.routed(log, console):
        logging.getLogger("diffusers.models").warning(REPORT)
    assert console.getvalue() == "" and not log.exists()


def test_a_text_encoder_missing_weights_is_said_on_the_console(run_cli, tiny_cache: Path, tmp_path: Path) -> None:
    tiny = next(tiny_cache.glob("*/tiny_sd1")) / "main" / "tiny_sd1"
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["final_layer_norm.weight"]
    save_file(tensors, weights)
    model = f"base: sd-1\ncheckpoint: {broken}\n"
    conf = write_conf(tmp_path / "conf", "b", "  prompts: ['a castle']\n" + SMALL, {"b": model})
    out_dir = tmp_path / "run"
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=b", f"run.out_dir={out_dir}")
    assert code == 0, err
    said = [line for line in err.splitlines() if line.startswith("batchgen: warning:")]
    assert said == [
        f"batchgen: warning: {broken / 'text_encoder'}: CLIPTextModel lacks weights the model needs; they were "
        "initialised at random, so its images will be noise: give a complete model folder or file (the list is in "
        f"{out_dir / '.batchgen' / 'libraries.log'})"
    ]
    assert "final_layer_norm.weight" in (out_dir / ".batchgen" / "libraries.log").read_text()


def test_the_engines_own_warnings_reach_the_console_each_time_and_the_log(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv(library_log.VERBOSE_ENV, raising=False)
    log, console = tmp_path / ".batchgen" / "libraries.log", io.StringIO()
    with library_log.routed(log, console):
        library_log.warn("prompt 'a castle...' is 80 tokens; the encoder reads the first 77")
        library_log.warn("prompt 'a castle...' is 80 tokens; the encoder reads the first 77")
    line = "batchgen: warning: prompt 'a castle...' is 80 tokens; the encoder reads the first 77\n"
    assert console.getvalue() == line * 2  # as printed before: once per encoding
    assert "batchgen.engine WARNING: prompt 'a castle...' is 80 tokens" in log.read_text()
    assert capsys.readouterr().err == ""
    library_log.warn("not routed")  # --verbose, or the engine used on its own: the same line on stderr
    assert capsys.readouterr().err == "batchgen: warning: not routed\n"
    assert not logging.getLogger(library_log.ENGINE).handlers

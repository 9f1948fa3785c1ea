"""Where diffusers', transformers', huggingface_hub's and Python's own warnings go: a log file in the run's
.batchgen/ folder (nowhere while a model is being built before any run directory exists), not the console, unless
`--verbose` (BATCHGEN_VERBOSE=1, which spawned workers inherit). The few that change what the user gets (a
checkpoint that lacks weights, so its images are noise) are also said on the console in batchgen's one-line form.

The libraries attach their own stderr handler when their logging module is first imported, which may happen after
routing starts (importing them just to route would cost a dry run two seconds); `settle` is called where they are
about to be used, so no notice slips through.

batchgen's own warnings from where it renders (a worker process, a Ray actor: a prompt cut by run.truncate_prompts)
go the same way through `warn`: into that log and on the console, as they are, in the one-line form.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

LOG = Path(".batchgen") / "libraries.log"
VERBOSE_ENV = "BATCHGEN_VERBOSE"
ENGINE = "batchgen.engine"  # batchgen's own warnings from where it renders
LOGGERS = ("transformers", "diffusers", "huggingface_hub", "py.warnings", ENGINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# (pattern on a library's message, what batchgen says instead); {name} groups fill the text.
RESAID: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        # transformers 5 reports missing keys as a table headed "<Class> LOAD REPORT from: <path>"
        re.compile(r"(?P<cls>\w+) LOAD REPORT from: (?P<path>\S+)(?=.*\bMISSING\b)", re.S),
        "{path}: {cls} lacks weights the model needs; they were initialised at random, so its images will be "
        "noise: give a complete model folder or file (the list is in {log})",
    ),
    (
        re.compile(r"Some weights of (?P<cls>\w+) were not initialized from the model checkpoint at (?P<path>\S+)"),
        "{path}: {cls} lacks weights the model needs; they were initialised at random, so its images will be "
        "noise: give a complete model folder or file (the list is in {log})",
    ),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


class _Resay(logging.Handler):
    """Says a library message that matters once, in batchgen's words."""

    def __init__(self, stream: TextIO, log: Path | None) -> None:
        super().__init__(logging.WARNING)
        self.stream, self.log, self.said = stream, log, set()

    def emit(self, record: logging.LogRecord) -> None:
        text = _ANSI.sub("", record.getMessage())
        if record.name == ENGINE:
            self.stream.write(f"batchgen: warning: {text}\n")  # already in batchgen's words, said each time
            self.stream.flush()
            return
        for pattern, template in RESAID:
            if (match := pattern.search(text)) is None:
                continue
            line = template.format(**match.groupdict(), log=self.log or "the output of --verbose")
            if line not in self.said:
                self.said.add(line)
                self.stream.write(f"batchgen: warning: {line}\n")
                self.stream.flush()
            return


def warn(text: str) -> None:
    """A warning from where batchgen renders: routed, into the run's log and on the console; unrouted (--verbose, a
    program using the engine itself), on stderr; either way as `batchgen: warning: <text>`."""
    logger = logging.getLogger(ENGINE)
    if any(isinstance(handler, _Resay) for handler in logger.handlers):
        logger.warning(text)
    else:
        sys.stderr.write(f"batchgen: warning: {text}\n")


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


def route(log: Path | None, stream: TextIO | None = None) -> Callable[[], None]:
    """Send the libraries' warnings to `log` (None: drop them) and re-say the ones in RESAID on `stream`
    (stderr). Returns the function that undoes it; a no-op under --verbose."""
    if verbose():
        return lambda: None
    stream = stream or sys.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        sink: logging.Handler = logging.FileHandler(log, encoding="utf-8", delay=True)
        sink.setFormatter(_Plain("%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"))
    else:
        sink = logging.NullHandler()
    resay = _Resay(stream, log)
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate))
        logger.addHandler(sink)
        logger.addHandler(resay)
        logger.propagate = False
    levels = {module: module.get_verbosity() for module in _library_modules()}  # a caller's choice survives
    detach_library_handlers()
    logging.captureWarnings(True)
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("default")  # each warning once per place, into the log; Python hides none of them

    def undo() -> None:
        catcher.__exit__(None, None, None)
        logging.captureWarnings(False)
        for logger, propagate in saved:
            logger.removeHandler(sink)
            logger.removeHandler(resay)
            logger.propagate = propagate
        for module in _library_modules():
            module.enable_default_handler()  # detached here or by a later detach_library_handlers
            if module in levels:
                module.set_verbosity(levels[module])
        sink.close()

    return undo


@contextlib.contextmanager
def routed(log: Path | None, stream: TextIO | None = None) -> Iterator[None]:
    undo = route(log, stream)
    try:
        yield
    finally:
        undo()


def detach_library_handlers() -> None:
    """Remove the stderr handlers diffusers and transformers attached on import (only those imported: importing
    them here would cost a second of start-up), keeping their level at warnings unless the user chose one. Only
    while routed: elsewhere (a test building a model, --verbose) the libraries keep their own handlers."""
    if not any(isinstance(h, _Resay) for h in logging.getLogger("transformers").handlers):
        return
    for module in _library_modules():
        module.disable_default_handler()
        if f"{module.__name__.split('.')[0].upper()}_VERBOSITY" not in os.environ:
            module.set_verbosity_warning()


def settle() -> None:
    """Where diffusers and transformers are about to be used: import their logging (attaching their handlers) and
    detach those handlers at once, before the first notice; their progress bars stay off either way."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.disable_progress_bar()  # batchgen reports progress itself
    detach_library_handlers()


def _library_modules() -> list:
    return [m for m in (sys.modules.get(f"{p}.utils.logging") for p in ("transformers", "diffusers")) if m]

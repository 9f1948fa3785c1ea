"""The render settings, each declared once: its config key, type and checks, default, and what it takes part in.

The config schema, the planner (axes, job_id), `Job`, the manifest columns, the batch key, the grid axes, the
A1111 parameters of a PNG and `batchgen diff` all read this table, so a new setting is one entry here plus the
engine code that uses its value. Pure: no torch, pandas or Hydra, so every layer may import it.
"""

from __future__ import annotations

import difflib
import enum
import functools
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchgen.errors import BatchgenError
from batchgen.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

PROMPT_SYNTAXES = ("a1111", "compel", "plain")  # batchgen.prompt_syntax reads them
MAX_SEQUENCE_LENGTH = 512  # what diffusers' SD3 and FLUX.1 pipelines accept
MAX_CLIP_SKIP = 12  # SD1's encoder has 12 layers; A1111's setting stops there too


# --- value checks (the planner's weight and batch-size checks use these too) ------------------------------------


def did_you_mean(name: str, options: list[str], fmt: str = "'{}'") -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def as_list(value: Any, key: str) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise BatchgenError(f"{key} is empty; give at least one value")
    return values


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def ints(value: Any, key: str, minimum: int) -> list[int]:
    values = as_list(value, key)
    for v in values:
        if not is_int(v) or v < minimum:
            raise BatchgenError(f"{key}: '{v}' is not an integer >= {minimum}")
    return [int(v) for v in values]


def floats(value: Any, key: str) -> list[float]:
    values = as_list(value, key)
    for v in values:
        if not is_number(v):
            raise BatchgenError(f"{key}: '{v}' is not a number")
    return [float(v) for v in values]


def sizes(value: Any, key: str) -> list[int]:
    values = ints(value, key, minimum=8)
    for v in values:
        if v % 8:
            raise BatchgenError(f"{key}: {v} is not a multiple of 8; use {v - v % 8} or {v - v % 8 + 8}")
    return values


def schedulers(value: Any, key: str) -> list[str]:
    values = as_list(DEFAULT_SCHEDULER if value is None else value, key)
    for v in values:
        if v != DEFAULT_SCHEDULER and v not in SCHEDULERS:
            raise BatchgenError(
                f"{key}: unknown scheduler '{v}'{did_you_mean(str(v), list(SCHEDULERS))}; "
                f"choose one of: {', '.join(SCHEDULERS)}"
            )
    return [str(v) for v in values]


def clip_skips(value: Any, key: str) -> list[int]:
    values = ints(value, key, minimum=1)
    for v in values:
        if v > MAX_CLIP_SKIP:
            raise BatchgenError(
                f"{key}: {v} skips more layers than SD's text encoders have; use 1 to {MAX_CLIP_SKIP} "
                "(A1111's count: 1 is no skip, 2 is the usual for anime models)"
            )
    return values


def syntaxes(value: Any, key: str) -> list[str]:
    values = as_list(value, key)
    for v in values:
        if v not in PROMPT_SYNTAXES:
            raise BatchgenError(
                f"{key}: unknown prompt syntax '{v}'{did_you_mean(str(v), list(PROMPT_SYNTAXES))}; "
                f"choose one of: {', '.join(PROMPT_SYNTAXES)}"
            )
    return [str(v) for v in values]


def sequence_lengths(value: Any, key: str) -> list[int]:
    values = ints(value, key, minimum=0)
    for v in values:
        if v > MAX_SEQUENCE_LENGTH:
            raise BatchgenError(
                f"{key}: {v} is more tokens than T5 reads in SD3 and FLUX.1; use 1 to {MAX_SEQUENCE_LENGTH}"
            )
    return values


def flag(value: Any, key: str) -> list[bool]:
    if not isinstance(value, bool):
        raise BatchgenError(f"{key}: '{value}' is neither true nor false")
    return [value]


# --- the table ---------------------------------------------------------------------------------------------------


class JobId(enum.Enum):
    """How a setting enters the job_id payload (under its name)."""

    ALWAYS = "always"
    # Only when off its default: a setting added later leaves every id from before it as it was.
    OFF_DEFAULT = "off_default"
    # Not under its own name: the planner hashes its effect (prompt_syntax: the parse of each text), so that a
    # value which changes nothing for a job leaves the job's id as it was.
    EFFECT = "effect"


@dataclass(frozen=True)
class A1111:
    """A key of the PNG `parameters` line. `text` is formatted with the manifest row (the scheduler already
    named as A1111's sampler); `omit_at_default`: A1111 leaves the key out at the default."""

    key: str
    text: str
    omit_at_default: bool = False


@dataclass(frozen=True)
class Shown:
    """A column of index.html's job table: its place from the left, its header where that is not the column's name,
    whether it sorts as a number, and its place among the filters above the table (None: no filter)."""

    place: int
    header: str = ""
    numeric: bool = False
    filter: int | None = None


@dataclass(frozen=True)
class Setting:
    name: str  # the Job field, the manifest column, the grid and diff axis, the job_id payload key
    key: str  # the config key: `sweep.seeds`, `run.truncate_prompts`
    type: type  # of one value (the Job field)
    check: Callable[[Any, str], list[Any]]  # config value, key -> the values, checked; one unless `axis`
    default: Any  # the config field's default
    axis: bool  # a list makes it an axis (the config field takes a scalar or a list)
    job_id: JobId  # every setting here changes pixels; this says how it is hashed
    batch: bool  # jobs differing in it cannot share a pipeline call
    column_after: str | None  # the manifest column it follows (columns never move); None: not in the manifest
    grid: bool  # a `sweep.grid` axis
    diff: bool  # `batchgen diff --by settings` matches rows on it
    a1111: A1111 | None = None
    empty_cell: str | None = None  # what an empty cell means in a manifest written before the column existed
    index: Shown | None = None  # how index.html's job table shows its column; None: it does not
    # Set: the config default (null) is the model's own value, which the planner resolves per model from its
    # checkpoint and base record (batchgen.assets.defaults), so that a job, its manifest row and its job_id hold
    # the value rendered. This value stands in where no model is at hand (a Job built without the setting, an
    # empty manifest cell): SD1's, every sweep's default before each base had its own.
    fallback: Any = None

    @property
    def model_own(self) -> bool:
        """Whether a sweep that gives no value renders the model's own (batchgen.assets.defaults)."""
        return self.fallback is not None

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        """The config field name, which need not be `name` (`sweep.seeds` sets `seed`)."""
        return self.key.split(".", 1)[1]

    @property
    def value_default(self) -> Any:
        """A job's value when the config keeps the default; for a model's own value, the fallback."""
        return self.check(self.fallback if self.model_own else self.default, self.key)[0]

    def read(self, cell: Any) -> Any:
        """A manifest cell or plan value as this setting's type; an empty one means the default."""
        if cell is None or cell == "":
            return self.value_default
        if self.type is bool and isinstance(cell, str):
            return cell.strip().lower() == "true"  # a CSV cell: bool("False") would be True
        return self.type(cell)

    def hashed(self, value: Any) -> bool:
        if self.job_id is JobId.EFFECT:
            return False
        return self.job_id is JobId.ALWAYS or value != self.value_default


SETTINGS: tuple[Setting, ...] = (
    Setting(
        name="seed",
        key="sweep.seeds",
        type=int,
        check=functools.partial(ints, minimum=0),
        default=(1,),
        axis=True,
        job_id=JobId.ALWAYS,
        batch=False,  # each image has its own generator
        column_after="loras",
        grid=True,
        diff=True,
        a1111=A1111("Seed", "{seed}"),
        index=Shown(4, numeric=True),
    ),
    Setting(
        name="steps",
        key="sweep.steps",
        type=int,
        check=functools.partial(ints, minimum=1),
        default=None,  # the model's own: its base's (28 for FLUX.1-dev, 20 for SD1)
        axis=True,
        job_id=JobId.ALWAYS,
        batch=True,
        column_after="seed",
        grid=True,
        diff=True,
        a1111=A1111("Steps", "{steps}"),
        index=Shown(5, numeric=True),
        fallback=20,
    ),
    Setting(
        name="guidance_scale",
        key="sweep.guidance_scale",
        type=float,
        check=floats,
        default=None,  # the model's own: its base's (3.5 for FLUX.1-dev, 7.5 for SD1)
        axis=True,
        job_id=JobId.ALWAYS,
        batch=True,
        column_after="steps",
        grid=True,
        diff=True,
        a1111=A1111("CFG scale", "{guidance_scale}"),
        index=Shown(6, numeric=True),
        fallback=7.5,
    ),
    Setting(
        name="width",
        key="sweep.width",
        type=int,
        check=sizes,
        default=None,  # the model's own: its denoiser's sample size times the VAE's scale, as diffusers computes it
        axis=True,
        job_id=JobId.ALWAYS,
        batch=True,
        column_after="guidance_scale",
        grid=True,
        diff=True,
        a1111=A1111("Size", "{width}x{height}"),
        index=Shown(7, header="size"),  # with the height: WxH
        fallback=512,
    ),
    Setting(
        name="height",
        key="sweep.height",
        type=int,
        check=sizes,
        default=None,  # the model's own: its denoiser's sample size times the VAE's scale, as diffusers computes it
        axis=True,
        job_id=JobId.ALWAYS,
        batch=True,
        column_after="width",
        grid=True,
        diff=True,
        # A1111 writes it with the width, as Size
        fallback=512,
    ),
    # A batchgen.schedulers name; default (null): the checkpoint's own.
    Setting(
        name="scheduler",
        key="sweep.scheduler",
        type=str,
        check=schedulers,
        default=None,
        axis=True,
        job_id=JobId.ALWAYS,
        batch=True,
        column_after="height",
        grid=True,
        diff=True,
        a1111=A1111("Sampler", "{scheduler}"),
    ),
    # A1111's count: 1 is the encoder's last layer, 2 the one before (diffusers' clip_skip is one less).
    Setting(
        name="clip_skip",
        key="sweep.clip_skip",
        type=int,
        check=clip_skips,
        default=1,
        axis=True,
        job_id=JobId.OFF_DEFAULT,
        batch=True,
        column_after="timings",
        grid=True,
        diff=True,
        a1111=A1111("Clip skip", "{clip_skip}", omit_at_default=True),
        empty_cell="1",
    ),
    # A prompt past the encoder's 77 tokens is chunked as A1111 does; true cuts it there, with a warning.
    Setting(
        name="truncate_prompts",
        key="run.truncate_prompts",
        type=bool,
        check=flag,
        default=False,
        axis=False,
        job_id=JobId.OFF_DEFAULT,
        batch=True,
        column_after=None,
        grid=False,
        diff=False,
    ),
    # How brackets, weights, BREAK and prompt editing in a prompt are read: A1111's grammar, InvokeAI's (compel),
    # or none. A prompt without such syntax renders the same under all three.
    Setting(
        name="prompt_syntax",
        key="sweep.prompt_syntax",
        type=str,
        check=syntaxes,
        default="a1111",
        axis=True,
        job_id=JobId.EFFECT,
        batch=False,  # each job's embeddings are its own; the schedule of prompt edits splits batches itself
        column_after="clip_skip",
        grid=True,
        # Off: runs from before the setting read every prompt as plain text, and matching on it would pair none
        # of their rows with a new run's; a changed reading shows as changed pixels instead.
        diff=False,
    ),
    # A1111's "Pad prompt/negative prompt": when the two have different numbers of 75-token chunks, pad the
    # shorter with empty chunks (true) or, A1111's default, condition each in its own UNet pass (false).
    Setting(
        name="pad_prompts",
        key="sweep.pad_prompts",
        type=bool,
        check=flag,
        default=False,
        axis=False,
        job_id=JobId.EFFECT,
        batch=True,
        column_after="prompt_syntax",
        grid=False,
        diff=False,
        a1111=A1111("Pad conds", "True", omit_at_default=True),
    ),
    # How many T5 tokens SD3 and FLUX.1 read (diffusers' max_sequence_length); 0 is the pipeline's own default
    # (512 FLUX.1, 256 SD3), and the model's own too unless its release differs (256 for FLUX.1-schnell). Bases
    # without T5 do not read it: hashed by its effect, so their jobs keep their ids.
    Setting(
        name="max_sequence_length",
        key="sweep.max_sequence_length",
        type=int,
        check=sequence_lengths,
        default=None,
        axis=True,
        job_id=JobId.EFFECT,
        batch=True,
        column_after="degenerate",
        grid=True,
        diff=False,
        fallback=0,
    ),
)

AXES = tuple(s.name for s in SETTINGS if s.axis)  # the planner's setting axes, counted by --dry-run
GRID_AXES = tuple(s.name for s in SETTINGS if s.grid)


def in_section(section: str) -> tuple[Setting, ...]:
    """The settings of one config section (`sweep`, `run`), in table order."""
    return tuple(s for s in SETTINGS if s.section == section)


def batch_values(job: Any) -> tuple:
    """A job's values of the settings that split batches, in table order."""
    return tuple(getattr(job, s.name) for s in SETTINGS if s.batch)


def job_id_payload(values: dict[str, Any]) -> dict[str, Any]:
    """The settings' part of a job_id payload, from a job's value of each setting."""
    return {s.name: s.type(values[s.name]) for s in SETTINGS if s.hashed(values[s.name])}

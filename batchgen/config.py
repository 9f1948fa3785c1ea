"""Structured configs, Hydra composition and override parsing.

Sweep values on `sweep.*` keys (`a=1,2`, `range(...)`, `choice(...)`) become list-valued axes of
this one run instead of a Hydra multirun, so they are taken out of the override list before
composition and written back into the composed config as lists.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra import compose
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from batchgen.errors import BatchgenError

SWEEP_PREFIX = "sweep."


@dataclass
class ModelConfig:
    base: str = MISSING  # sd-1 | sd-2 | sdxl
    checkpoint: str = MISSING  # diffusers folder or single file; relative to <root>/main when root is set
    root: str | None = None  # InvokeAI per-base layout: <root>/main, <root>/embedding, <root>/lora
    embeddings: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    builtin: str | None = None  # an embedded tiny model, built on first use when root is not given
    triggers: dict[str, str] = field(default_factory=dict)  # TI file name -> trigger, where the stem will not do
    variant: str | None = None  # diffusers folders: load the `*.fp16.safetensors` (etc.) weights beside the others
    # Single files only: a diffusers-layout folder of component configs (default: batchgen's for the base), the
    # tokenizer folder (default: the config folder's, else the Hugging Face cache), and the scheduler's prediction
    # type (default: the config's; v_prediction for sd-2, whose 768 models are the common ones).
    config: str | None = None
    tokenizer: str | None = None
    prediction_type: str | None = None


@dataclass
class GridConfig:
    # Axes: model, stack, prompt, a prompt slot, seed, steps, guidance_scale, width, height, scheduler, weight:LORA
    x: str = "stack"
    y: str = "prompt"
    z: str | None = None  # sub-grids side by side, one per value


@dataclass
class ReportConfig:
    max_grid_megapixels: float = 64.0  # a larger grid is split into pages


@dataclass
class SweepConfig:
    name: str = MISSING
    models: list[str] = field(default_factory=list)  # empty: every model the sweep selected
    prompts: list[str] = field(default_factory=list)  # and/or prompts_file; at least one prompt in all
    prompts_file: str | None = None  # .txt, one per line, or .csv: prompt[, negative_prompt][, seed], zipped
    slots: dict[str, list[str]] = field(default_factory=dict)
    negative_prompt: str = ""
    # Empty means a single stack with no LoRA; a default `none` here would be merged into every sweep's stacks.
    stacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Scalars or lists (a list is an axis); checked by the planner, which gives better messages than OmegaConf.
    seeds: Any = field(default_factory=lambda: [1])
    steps: Any = 20
    guidance_scale: Any = 7.5
    width: Any = 512
    height: Any = 512
    scheduler: Any = None
    clip_skip: Any = 1  # A1111's count: 1 is the encoder's last layer, 2 the one before (an axis as a list)
    # Words put before the prompt of every job whose stack has that LoRA: {ink: "ink drawing"}; "" adds none.
    lora_triggers: dict[str, str] = field(default_factory=dict)
    add_lora_triggers: bool = False  # also for LoRAs not in lora_triggers, from the file's training metadata
    batch_size: Any = "auto"
    grid: GridConfig = field(default_factory=GridConfig)


@dataclass
class RunConfig:
    out_dir: str = "runs/${sweep.name}"
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the UNet: slower start, faster steps on long GPU sweeps
    max_jobs: int = 10000  # a bigger sweep needs --yes: a typo in an axis should not start a week of rendering
    # Intra-op threads per CPU worker; null: the cores split between workers. CPU pixels depend on it (oneDNN
    # picks convolution kernels by thread count), so fix it to compare runs with different worker counts.
    threads: int | None = None
    # A prompt past the encoder's 77 tokens is chunked as A1111 does; true cuts it there instead, with a warning.
    truncate_prompts: bool = False


@dataclass
class LocalExecutorConfig:
    name: str = "local"
    devices: Any = "auto"  # auto | N | [0, 2]


@dataclass
class RayExecutorConfig:
    name: str = "ray"
    address: str | None = None  # null starts a local Ray; auto (`ray start --head`); ray://host:10001
    actors: Any = "auto"  # auto (one per GPU, else one per cpus_per_actor CPUs) | N
    cpus_per_actor: int = 1
    shared_fs: bool = False  # actors write PNGs into run.out_dir themselves (every node mounts it)


# Each executor has its own fields, so `executor` is typed here rather than by one schema for all of them.
EXECUTOR_SCHEMAS = {"local": LocalExecutorConfig, "ray": RayExecutorConfig}


@dataclass
class Config:
    models: dict[str, ModelConfig] = field(default_factory=dict)
    sweep: SweepConfig = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    # Filled from the executor group (conf/executor/*.yaml); typed by executor_config() once composed.
    executor: Any = field(default_factory=dict)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass(frozen=True)
class Composed:
    """The result of composition: the typed config and what produced it."""

    config: Config
    container: dict[str, Any]  # resolved plain-dict form, for --cfg and the run record
    overrides: list[str]


def packaged_conf_dir() -> Path:
    """conf/ inside an installed wheel, else the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise BatchgenError(f"batchgen's conf/ folder is missing next to {here}; reinstall batchgen")


def register_schemas() -> None:
    # Hydra's ConfigStore is process-wide by design; storing the same node again is harmless.
    ConfigStore.instance().store(name="batchgen_schema", node=Config)


def split_sweep_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """Separate `sweep.*` sweep values (which become axes) from overrides Hydra composes."""
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except OverrideParseException as e:
            raise BatchgenError(
                f"bad override '{line}': {_first_line(e)}; write key=value (Hydra's override grammar)"
            ) from None
    plain: list[str] = []
    axes: dict[str, list[Any]] = {}
    for override in parsed:
        if not override.key_or_group.strip("+~"):
            raise BatchgenError(f"override '{override.input_line}': no key before '='; write key=value")
        if not override.is_sweep_override():
            plain.append(override.input_line)
            continue
        key = override.get_key_element().lstrip("+~")
        if not key.startswith(SWEEP_PREFIX):
            raise BatchgenError(
                f"override '{override.input_line}': a list of values is an axis only on sweep.* keys; "
                "run one invocation per value of other keys"
            )
        try:
            values = list(override.sweep_iterator())
        except HydraException as e:
            raise BatchgenError(
                f"override '{override.input_line}': {e}; use a,b,c or range(start,stop,step)"
            ) from None
        axes[key] = values
    return plain, axes


def compose_config(overrides: list[str], config_dir: Path | None = None) -> Composed:
    """Compose conf/config.yaml with the user's overrides into a typed Config."""
    register_schemas()
    plain, axes = split_sweep_overrides(overrides)
    packaged = packaged_conf_dir()
    if config_dir is not None and not config_dir.is_dir():
        raise BatchgenError(f"--config-dir {config_dir}: not a directory")
    GlobalHydra.instance().clear()
    try:
        _init_hydra(packaged, config_dir)
        cfg = compose(config_name="config", overrides=plain)
    except MissingConfigException as e:
        raise BatchgenError(_missing_config_message(e, packaged, config_dir)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise BatchgenError(_override_message(e, plain) or f"config: {_first_line(e)}") from None
    except yaml.YAMLError as e:
        raise BatchgenError(_yaml_message(e)) from None
    except (ValueError, TypeError, AssertionError) as e:  # Hydra checks some override shapes with bare asserts
        raise BatchgenError(f"overrides {' '.join(plain)}: {_first_line(e)}; write key=value") from None
    finally:
        GlobalHydra.instance().clear()
    if OmegaConf.is_missing(cfg, "sweep"):
        available = ", ".join(_options("sweep", packaged, config_dir))
        raise BatchgenError(f"no sweep selected: add +sweep=NAME (available: {available})")
    for key, values in axes.items():
        _set_axis(cfg, key, values)
    _drop_hydra_node(cfg)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise BatchgenError(f"config key {_full_key(e)}: {_first_line(e)}") from None
    assert isinstance(typed, Config) and isinstance(container, dict)
    typed.executor = executor_config(container["executor"])
    return Composed(config=typed, container=container, overrides=list(overrides))


def executor_config(raw: Any) -> LocalExecutorConfig | RayExecutorConfig:
    """The executor section typed by its name; an unknown name or key is a config error naming the choices."""
    if not isinstance(raw, dict):
        raise BatchgenError(f"executor: {raw!r} is not a section; choose executor=local or executor=ray")
    name = raw.get("name", "local")
    schema = EXECUTOR_SCHEMAS.get(name)
    if schema is None:
        raise BatchgenError(f"executor={name}: unknown executor; use one of {', '.join(EXECUTOR_SCHEMAS)}")
    known = [f.name for f in dataclasses.fields(schema)]
    for key in raw:
        if key not in known:
            raise BatchgenError(f"executor.{key}: not a setting of executor={name}; it takes {', '.join(known)}")
    return schema(**raw)


def _init_hydra(packaged: Path, config_dir: Path | None) -> None:
    """A Hydra whose search path has the user's folder ahead of the packaged conf/.

    Hydra's public `hydra.searchpath` only appends after the primary folder, which would let the packaged files
    win on a name clash, so the search path is built here the way initialize_config_dir builds it.
    """
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    search_path = create_config_search_path(f"file://{packaged}")
    if config_dir is not None:
        search_path.prepend("batchgen-user", f"file://{config_dir.resolve()}", anchor="main")
    Hydra.create_main_hydra2(task_name="batchgen", config_search_path=search_path)  # registers itself globally


def _set_axis(cfg: DictConfig, key: str, values: list[Any]) -> None:
    if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        raise BatchgenError(f"override '{key}': unknown config key; check the spelling against --cfg")
    try:
        OmegaConf.update(cfg, key, values, merge=False)
    except OmegaConfBaseException as e:
        raise BatchgenError(f"override '{key}': {_first_line(e)}") from None


def _drop_hydra_node(cfg: DictConfig) -> None:
    # compose() leaves the hydra node out unless asked, but keep the printed config free of it either way.
    if "hydra" in cfg:
        with _open_struct(cfg):
            del cfg["hydra"]


class _open_struct:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> None:
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


_ABSENT = object()


def _options(group: str, packaged: Path, config_dir: Path | None) -> list[str]:
    names: set[str] = set()
    for root in (config_dir, packaged):
        if root is not None and (root / group).is_dir():
            names.update(p.stem for p in (root / group).glob("*.yaml"))
    return sorted(names)


def _missing_config_message(e: MissingConfigException, packaged: Path, config_dir: Path | None) -> str:
    match = re.search(r"Could not find '(\w+)/([^']+)'", str(e))
    if not match:
        return f"config: {_first_line(e)}"
    group, name = match.groups()
    options = ", ".join(_options(group, packaged, config_dir)) or "none"
    return f"{group} config '{name}' not found; available: {options} (add your own folder with --config-dir)"


def _override_message(e: BaseException, overrides: list[str]) -> str | None:
    """Hydra's messages for + on a key that exists and ~ on one that does not, said with the override."""
    text = str(e)
    merging = re.match(r"Error merging override (\S.*)", text)
    if merging and e.__cause__ is not None:
        # Hydra's line says only which override; OmegaConf's cause says what is wrong with its value.
        line = merging.group(1).strip()
        key = line.lstrip("+~").split("=", 1)[0]
        why = str(e.__cause__).splitlines()[0].rstrip(".")
        return f"override '{line}': {why}; give {key} a value of its type"
    exists = re.search(r"An item is already at '([^']+)'", text)
    missing = re.search(r"Could not delete from config\. '([^']+)' does not exist", text)
    for match, prefix in ((exists, "+"), (missing, "~")):
        if match is None:
            continue
        key = match.group(1)
        line = next((o for o in overrides if o.startswith(prefix) and o[1:].split("=", 1)[0] == key), prefix + key)
        if prefix == "+":
            return f"override '{line}': {key} already exists; drop the '+' to change it ({line[1:]})"
        return f"override '{line}': there is no {key} to remove"
    return None


def _yaml_message(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{mark.name}" if mark is not None else "a config file"
    problem = getattr(e, "problem", None) or _first_line(e)
    line = f", line {mark.line + 1}" if mark is not None else ""
    return f"{where}: not valid YAML ({problem}{line}); fix the file"


def _first_line(e: BaseException) -> str:
    """Hydra puts the what on the first line and the why on the second; keep both, on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("    ")]
    return " ".join(lines[:2]) if lines else type(e).__name__


def _full_key(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", "") or "?")

"""Hydra composition and override parsing.

Sweep values on `sweep.*` keys (`a=1,2`, `range(...)`, `choice(...)`) become list-valued axes of
this one run instead of a Hydra multirun, so they are taken out of the override list before
composition and written back into the composed config as lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra import compose
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from batchgen.config.hydra_errors import (
    config_options,
    first_line,
    full_key,
    missing_config_message,
    override_message,
    prompt_quoting_message,
    yaml_message,
)
from batchgen.config.override_keys import check_override_key
from batchgen.config.schema import Composed, Config
from batchgen.errors import BatchgenError

SWEEP_PREFIX = "sweep."


def packaged_conf_dir() -> Path:
    """conf/ inside an installed wheel, else the repository's top-level conf/."""
    here = Path(__file__).resolve().parent.parent  # batchgen/, beside which a wheel keeps conf/
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
                prompt_quoting_message(line)
                or f"bad override '{line}': {first_line(e)}; write key=value (Hydra's override grammar)"
            ) from None
    plain: list[str] = []
    axes: dict[str, list[Any]] = {}
    for override in parsed:
        if not override.key_or_group.strip("+~"):
            raise BatchgenError(f"override '{override.input_line}': no key before '='; write key=value")
        check_override_key(override.key_or_group.lstrip("+~"), override.input_line)
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
        raise BatchgenError(missing_config_message(e, packaged, config_dir)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise BatchgenError(override_message(e, plain) or _unplaced(first_line(e), plain)) from None
    except yaml.YAMLError as e:
        raise BatchgenError(yaml_message(e)) from None
    except (ValueError, TypeError, AssertionError) as e:  # Hydra checks some override shapes with bare asserts
        raise BatchgenError(f"overrides {' '.join(plain)}: {first_line(e)}; write key=value") from None
    finally:
        GlobalHydra.instance().clear()
    if OmegaConf.is_missing(cfg, "sweep"):
        available = ", ".join(config_options("sweep", packaged, config_dir))
        raise BatchgenError(f"no sweep selected: add +sweep=NAME (available: {available})")
    for key, values in axes.items():
        _set_axis(cfg, key, values)
    _drop_hydra_node(cfg)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise BatchgenError(f"config key {full_key(e)}: {first_line(e)}") from None
    if not isinstance(typed, Config) or not isinstance(container, dict):
        raise TypeError(f"composition gave {type(typed).__name__}, not batchgen's Config; the schema was not applied")
    return Composed(config=typed, container=container, overrides=list(overrides))


def _unplaced(reason: str, overrides: list[str]) -> str:
    """An error Hydra does not tie to one override: name the overrides given, which are where to look."""
    given = " ".join(overrides)
    return f"config: {reason}" + (f" (with the overrides {given})" if given else "")


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
        raise BatchgenError(f"override '{key}': {first_line(e)}") from None


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

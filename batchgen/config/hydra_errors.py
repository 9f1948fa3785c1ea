"""Hydra's and OmegaConf's exceptions said as one line that names the file or key and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from hydra.errors import MissingConfigException
from omegaconf.errors import OmegaConfBaseException


def config_options(group: str, packaged: Path, config_dir: Path | None) -> list[str]:
    names: set[str] = set()
    for root in (config_dir, packaged):
        if root is not None and (root / group).is_dir():
            names.update(p.stem for p in (root / group).glob("*.yaml"))
    return sorted(names)


def missing_config_message(e: MissingConfigException, packaged: Path, config_dir: Path | None) -> str:
    match = re.search(r"Could not find '(\w+)/([^']+)'", str(e))
    if not match:
        return f"config: {first_line(e)}"
    group, name = match.groups()
    options = ", ".join(config_options(group, packaged, config_dir)) or "none"
    return f"{group} config '{name}' not found; available: {options} (add your own folder with --config-dir)"


def override_message(e: BaseException, overrides: list[str]) -> str | None:
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


def yaml_message(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{mark.name}" if mark is not None else "a config file"
    problem = getattr(e, "problem", None) or first_line(e)
    line = f", line {mark.line + 1}" if mark is not None else ""
    return f"{where}: not valid YAML ({problem}{line}); fix the file"


def first_line(e: BaseException) -> str:
    """Hydra puts the what on the first line and the why on the second; keep both, on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("    ")]
    return " ".join(lines[:2]) if lines else type(e).__name__


def full_key(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", "") or "?")

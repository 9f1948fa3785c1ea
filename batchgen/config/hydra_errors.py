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


# Keys whose values are prompt text: A1111's `<trigger>`, `<lora:ink:1:lbw=OUTD>` and `(word:1.2)` use characters
# that Hydra's grammar reads only inside quotes. The first two hold lists of prompts.
_PROMPT_KEY = re.compile(
    r"^[+~]?sweep\.(?:(?P<list>prompts|slots\.[^.\s]+)|negative_prompt|prompts\.\d+|lora_triggers\.[^.\s]+)$"
)
_OPENS, _CLOSES = "<([{", ">)]}"


def prompt_quoting_message(line: str) -> str | None:
    """For an override of prompt text that Hydra could not parse: the override with each prompt quoted for Hydra
    and the whole for a POSIX shell, as one line that says so; None for any other override."""
    key, sep, value = line.partition("=")
    found = _PROMPT_KEY.match(key.strip())
    if not sep or found is None:
        return None
    value = value.strip()
    if found["list"]:
        inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        items = [item.strip() for item in _split_top_level(inner)]
        quoted = "[" + ", ".join(_hydra_quoted(item) for item in items) + "]"
        what = "each prompt" if found["list"] == "prompts" else "each value"
        what += " (Hydra splits a list at its commas)" if len(items) > 1 else ""
    else:
        quoted, what = _hydra_quoted(value), "the text"
    fixed = _shell_quoted(f"{key.strip()}={quoted}")
    return (
        f"bad override '{line}': Hydra reads prompt text with < > ( ) = only inside quotes; quote {what}, and the "
        f"whole override for the shell: {fixed}"
    )


def _split_top_level(text: str) -> list[str]:
    """`text` cut at the commas outside brackets and quotes (an lbw vector's commas stay in its tag)."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote and text[i - 1] != "\\" else quote
        elif char in "'\"" and not text[start:i].strip():  # a quoted prompt; an apostrophe inside one is text
            quote = char
        elif char in _OPENS:
            depth += 1
        elif char in _CLOSES:
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def _hydra_quoted(text: str) -> str:
    """`text` as a single-quoted Hydra string (already quoted text is kept): a quote is escaped, and so is a run of
    backslashes before a quote or at the end, the only places Hydra reads a backslash as an escape."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def _shell_quoted(text: str) -> str:
    """`text` in double quotes as a POSIX shell reads them: only \\, ", $ and ` need a backslash there."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


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

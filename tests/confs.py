"""Config folders written by tests: a sweep that selects its models, and the model files it may need."""

from __future__ import annotations

from pathlib import Path

SMALL = "  seeds: [1]\n  steps: 2\n  width: 64\n  height: 64\n"  # a render in well under a second per image


def write_conf(conf: Path, sweep: str, body: str, models: dict[str, str | None]) -> Path:
    """conf/sweep/SWEEP.yaml selecting `models` (name -> a model file's YAML written to conf/model/NAME.yaml, or
    None for a packaged one such as tiny_sd1), with `body` (indented lines) under `sweep:`. Returns conf."""
    (conf / "sweep").mkdir(parents=True, exist_ok=True)
    (conf / "model").mkdir(exist_ok=True)
    for name, text in models.items():
        if text is not None:
            (conf / "model" / f"{name}.yaml").write_text(text)
    defaults = "".join(f"  - /model@models.{name}: {name}\n" for name in models)
    (conf / "sweep" / f"{sweep}.yaml").write_text(
        f"# @package _global_\ndefaults:\n{defaults}sweep:\n  name: {sweep}\n{body}"
    )
    return conf

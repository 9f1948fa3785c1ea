"""Config: the schema, Hydra composition, and Hydra's errors said as one line."""

from batchgen.config.compose import compose_config, packaged_conf_dir, split_sweep_overrides
from batchgen.config.schema import (
    Composed,
    Config,
    GridConfig,
    MetricsConfig,
    ModelConfig,
    ReportConfig,
    RunConfig,
    SweepConfig,
)

__all__ = [
    "Composed",
    "Config",
    "GridConfig",
    "MetricsConfig",
    "ModelConfig",
    "ReportConfig",
    "RunConfig",
    "SweepConfig",
    "compose_config",
    "packaged_conf_dir",
    "split_sweep_overrides",
]

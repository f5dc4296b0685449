"""Configuration: typed sections that check themselves (`schema`), strict YAML + override
loading (`loader`), and the reference table the README shows (`reference`)."""

from s2l_ray.config.loader import dump_config, load_config, parse_override
from s2l_ray.config.reference import field_docs, reference_table
from s2l_ray.config.schema import (
    SELECTION_METHODS,
    ClusterConfig,
    ConfigError,
    EvalConfig,
    S2LConfig,
    SelectConfig,
    TrainConfig,
    check_budget,
)

__all__ = [
    "SELECTION_METHODS", "ClusterConfig", "ConfigError", "EvalConfig", "S2LConfig",
    "SelectConfig", "TrainConfig", "check_budget", "dump_config", "field_docs", "load_config",
    "parse_override", "reference_table",
]

"""The engine: config schema, dist info, strategies, trainer, checkpoints, metrics, evaluation and reports."""
from .config import Config, ConfigError, load_config, save_config
from .dist import DistInfo, read_dist_info
from .strategies import STRATEGIES, build_strategy

__all__ = ["Config", "ConfigError", "load_config", "save_config", "DistInfo", "read_dist_info", "STRATEGIES",
           "build_strategy"]

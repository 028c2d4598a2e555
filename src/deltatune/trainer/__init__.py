"""The trainer behind `deltatune train`: a TrainConfig in, an adapter (or a full model), metrics and a plot out."""

from deltatune.trainer.config import ConfigError, TrainConfig, load_config
from deltatune.trainer.loop import TrainingStopped, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingStopped", "load_config", "train"]

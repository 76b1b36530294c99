"""Training: the Trainer loop, run configs, AdamW and schedules, LoRA, metrics, checkpoints and parallelism."""

from .config import ConfigError, RunConfig, load_config
from .lora import merge_lora
from .parallel import ParallelConfig
from .trainer import Trainer, TrainingDiverged, run

__all__ = ["ConfigError", "ParallelConfig", "RunConfig", "Trainer", "TrainingDiverged", "load_config", "merge_lora",
           "run"]

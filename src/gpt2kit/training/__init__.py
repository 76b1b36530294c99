"""Training: the Trainer loop, run configs, AdamW and schedules, LoRA, metrics and checkpoints."""

from .config import ConfigError, RunConfig, load_config
from .lora import merge_lora
from .trainer import Trainer, TrainingDiverged, run

__all__ = ["ConfigError", "RunConfig", "Trainer", "TrainingDiverged", "load_config", "merge_lora", "run"]

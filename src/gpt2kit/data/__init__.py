"""Data: corpus preprocessing into token shards, and the datasets training reads."""

from .datasets import (ChatDataset, ClassificationDataset, InstructionDataset, PretrainingDataset, ResumableSampler,
                       alpaca_prompt, collate, load_tokenizer, read_meta)
from .preprocess import preprocess
from .readers import DataError

__all__ = [
    "ChatDataset", "ClassificationDataset", "DataError", "InstructionDataset", "PretrainingDataset",
    "ResumableSampler", "alpaca_prompt", "collate", "load_tokenizer", "preprocess", "read_meta",
]

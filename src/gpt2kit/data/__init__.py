"""Data: corpus preprocessing into token shards, and the datasets training reads."""

from .datasets import (ChatDataset, ClassificationDataset, InstructionDataset, PretrainingDataset, ResumableSampler,
                       alpaca_prompt, collate, load_tokenizer, read_meta)
from .preprocess import output_is_current, preprocess
from .readers import DataError

__all__ = [
    "ChatDataset", "ClassificationDataset", "DataError", "InstructionDataset", "PretrainingDataset",
    "ResumableSampler", "alpaca_prompt", "collate", "load_tokenizer", "output_is_current", "preprocess", "read_meta",
]

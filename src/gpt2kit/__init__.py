"""gpt2kit: the GPT-2 family in plain PyTorch — tokenize, train, fine-tune, evaluate, generate, serve, export."""

from .config import PRESETS, GPT2Config
from .model import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model, KVCache
from .tokenizer import GPT2Tokenizer

__all__ = [
    "PRESETS", "GPT2Config", "GPT2ForSequenceClassification", "GPT2LMHeadModel", "GPT2Model", "GPT2Tokenizer",
    "KVCache",
]
__version__ = "0.1.0"

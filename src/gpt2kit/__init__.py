"""gpt2kit: the GPT-2 family in plain PyTorch — tokenize, train, fine-tune, evaluate, generate, serve, export."""

from .config import PRESETS, GPT2Config
from .evaluation import evaluate_classification, evaluate_lambada, evaluate_perplexity
from .generation import GenerationConfig, generate, stream_generate
from .model import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model, KVCache
from .pipeline import pipeline
from .tokenizer import GPT2Tokenizer
from .training import Trainer

__all__ = [
    "PRESETS", "GPT2Config", "GPT2ForSequenceClassification", "GPT2LMHeadModel", "GPT2Model", "GPT2Tokenizer",
    "KVCache", "GenerationConfig", "generate", "stream_generate", "pipeline",
    "Trainer", "evaluate_classification", "evaluate_lambada", "evaluate_perplexity",
]
__version__ = "0.1.0"

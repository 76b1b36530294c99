"""Shared fixtures: small random models, gpt2kit's and transformers', saved in HF format."""

import os
from pathlib import Path

import pytest
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.data.preprocess import preprocess
from gpt2kit.generation import AUTOTUNE_ENV
from gpt2kit.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"

# Compiled decoding without autotuning unless a test asks for it (`autotuned`): it halves the compile time of the
# many tests that compile, and the tests marked so check the autotuned step. Processes the tests start inherit it.
os.environ[AUTOTUNE_ENV] = "0"


# The files that take minutes (several processes training, compiling), longest first: `make test` runs whole files
# on two workers in collection order (--dist loadfile --no-loadscope-reorder), and these started last would leave
# one worker running them alone at the end.
LONGEST_FIRST = ("test_parallel_cli.py", "test_train.py", "test_gguf.py", "test_compiled_decode.py",
                 "test_parallel.py", "test_speculative.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def autotuned(monkeypatch):
    """Compile the decode step with autotuning, as users do by default."""
    monkeypatch.setenv(AUTOTUNE_ENV, "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


HF_VOCAB = 512  # the vocabulary of hf_pair's models; its last id is EOS


def random_hf_pair(path: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
    """A random transformers GPT-2 (vocabulary HF_VOCAB, 128 positions) saved at `path`, and the same weights
    loaded through gpt2kit."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=128,
                                     vocab_size=HF_VOCAB, bos_token_id=HF_VOCAB - 1, eos_token_id=HF_VOCAB - 1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(path)
    return hf, GPT2LMHeadModel.from_pretrained(path)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """random_hf_pair's 2-layer, 64-wide model."""
    return random_hf_pair(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture
def tiny_config() -> GPT2Config:
    """Two layers, small vocab: fast enough for any test."""
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=512, bos_token_id=511,
                      eos_token_id=511)


@pytest.fixture
def tiny_model(tiny_config) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(tiny_config).eval()


@pytest.fixture
def tiny_model_dir(tiny_model, tmp_path) -> Path:
    """tiny_model saved as an HF-format directory."""
    tiny_model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared CPU: one thread avoids OpenMP threads spinning against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_text_model(path: Path, n_positions: int = 128) -> Path:
    """A random 2-layer model saved with a 512-token BPE vocabulary trained on a bundled text, so that
    generated ids decode to short words (tests of text, stop strings and streaming need that)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=n_positions, vocab_size=512,
                            bos_token_id=0, eos_token_id=0)
        GPT2LMHeadModel(config).save_pretrained(path)
    train_bpe([DATA / "the-verdict" / "the-verdict.txt"], 512, path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """the-verdict with a 320-token BPE trained on it, preprocessed with a validation split (training tests)."""
    verdict = DATA / "the-verdict" / "the-verdict.txt"
    root = tmp_path_factory.mktemp("corpus")
    train_bpe([verdict], 320, root / "tokenizer")
    preprocess([verdict], root / "data", format="paragraphs", tokenizer=str(root / "tokenizer"), val_fraction=0.1,
               progress=False)
    return root / "data"

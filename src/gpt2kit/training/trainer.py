"""Trainer: pretraining, full finetuning, LoRA and text-classification finetuning of GPT-2 from a RunConfig.

One optimizer step = `grad_accum` micro-batches; the loss of each is weighted by its share of the step's target
tokens (or examples), so accumulation gives exactly the gradient of one big batch even when batches are padded.

Parallelism (training/parallel.py, launched with torchrun; docs/distributed.md) plugs in at a few points:
- `_wrap_model`: activation checkpointing, tensor parallel, FSDP2/HSDP or DDP (`parallelize`), torch.compile.
- `_grad_sync(is_last_micro_step)`: gradients are synchronised only on the last micro-step of a step.
- `backward` weights each micro-batch by its share of the step's scored tokens summed over the data-parallel
  ranks, and scales the loss by their number against DDP's / FSDP's gradient averaging.
- `_save_checkpoint` / `_load_checkpoint`: all training state goes through these two; when ranks hold different
  parts of the model (FSDP, TP) model and optimizer go through a distributed checkpoint (DCP) instead.
`self.rank` / `self.world_size` are the data-parallel rank and size (what the sampler splits by); `self.parallel`
holds the global rank, the device mesh and the degrees. `self.model` is the model without a DDP wrapper (FSDP
and TP shard it in place), which is what gets saved.

Checkpoints (out_dir/checkpoints/step-00000100/) are HF model directories (or PEFT adapter directories with
LoRA; sharded runs keep model and optimizer in `training_state/dcp/`) plus `training_state/` (optimizer,
scheduler, sampler, RNG states, step) and a `COMPLETE` manifest
of file sizes and SHA-256 digests written last; the directory is assembled under a temporary name and renamed,
so a crash at any moment leaves either a complete checkpoint or one that is detected and skipped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..allocator import allocator_in_use
from ..checkpoint import (CheckpointError, hf_to_gpt2kit, is_adapter_dir, is_saved_model_file, load_config,
                          load_state_dict, resolve_model_dir, save_pretrained)
from ..cpu_matmul import onednn_supports
from ..config import PRESETS, GPT2Config
from ..conversation import ALPACA
from ..data.datasets import INSTRUCTION_FORMATS, examples_fingerprint
from ..files import atomic_write_text, remove_abandoned, replace_directory, replaced_directory, standard_json
from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel, eval_mode
from ..quantization import check_trainable
from ..tokenizer import GPT2Tokenizer, has_tokenizer_files
from . import lora as lora_lib
from .checkpoints import (CHECKPOINTS_DIR, DCP_DIR, STATE_DIR, find_resume_checkpoint, hash_files, prune_checkpoints,
                          remove_checkpoints_after, restore_interrupted_swaps, resume_candidates, rewrite_trainer_state,
                          verify_checkpoint, write_manifest)
from .config import DataArgs, RunConfig, load_config as load_run_config, save_config
from .distributed_checkpoint import (gather_full_state, load_distributed_checkpoint, load_full_state,
                                     save_distributed_checkpoint, unwrap)
from .logging import MetricsLogger, flops_per_token, peak_flops, plot_losses, read_metrics
from .optim import build_optimizer, build_scheduler, configured_hyperparameters
from .parallel import clip_grad_norm_, grad_sync, init_distributed, parallelize, raise_if_any_rank_failed



class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


# ---- models -------------------------------------------------------------------------------------------------
def enable_tf32(device: torch.device) -> None:
    """On a CUDA device, float32 matmuls and convolutions on TF32 tensor cores (fp32 runs, master-weight math):
    several times the fp32 rate on Ampere and newer, with an error far below training noise. Process-wide."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CPU with AVX512-BF16 or AMX (oneDNN's bf16 kernels), a GPU
    from Ampere on. Elsewhere bf16 is emulated, many times slower than float32. (torch.cuda.is_bf16_supported asks
    about the current device, and by default says yes on V100 and T4, which only emulate bf16.)"""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and onednn_supports(torch.bfloat16)


def _set_labels(config: GPT2Config, num_labels: int, id2label: dict[int, str] | None) -> None:
    """A classifier config's label count and names (the label indices as names when none are given). gpt2kit's
    classification data has one integer class per example: a problem_type from an earlier training (a regression
    or multi-label checkpoint) would pick the wrong loss."""
    config.extra.pop("problem_type", None)
    config.id2label = id2label or {i: str(i) for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.num_labels = num_labels


def load_classifier(model_dir: str | os.PathLike, *, num_labels: int, id2label: dict[int, str] | None = None,
                    **config_overrides: Any) -> GPT2ForSequenceClassification:
    """A GPT2ForSequenceClassification whose transformer comes from an HF directory (an LM or a classifier).
    The `score` head is kept when the directory has one of the right size, else freshly initialised."""
    model_dir = Path(model_dir)
    config = load_config(model_dir).replace(**config_overrides)
    _set_labels(config, num_labels, id2label)
    model = GPT2ForSequenceClassification(config)
    if is_adapter_dir(model_dir):  # a LoRA run's output: the weights of the model it adapts, merged
        state = lora_lib.load_merged(model_dir).state_dict()
    else:
        state = hf_to_gpt2kit(load_state_dict(model_dir), model)
    state.pop("lm_head.weight", None)
    if "score.weight" in state and state["score.weight"].shape[0] != num_labels:
        print(f"{model_dir}: classification head has {state['score.weight'].shape[0]} labels, the data "
              f"{num_labels}: starting a new head", file=sys.stderr)
        del state["score.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"score.weight"}:
        raise CheckpointError(f"{model_dir}: weights do not fit GPT2ForSequenceClassification: missing "
                              f"{sorted(set(missing) - {'score.weight'})[:5]}, unexpected {unexpected[:5]}")
    return model


class Split(Subset):
    """Some examples of a data set, with the data set's own attributes (a classifier's num_labels, id2label)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "dataset":  # not set yet: while unpickling in a loader worker
            raise AttributeError(name)
        return getattr(self.dataset, name)


def held_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, val): a seeded random `fraction` of the examples (at least one) held out for validation, the rest
    for training, each in the data set's order."""
    n = len(dataset)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"data.val_fraction: {fraction} of {n} examples leaves none to train on")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[chosen] = True
    return (Split(dataset, torch.nonzero(~is_val).flatten().tolist()),
            Split(dataset, torch.nonzero(is_val).flatten().tolist()))


BEST_DIR = "best"  # checkpoint.keep_best: the model of the best whole-set evaluation


# ---- trainer ------------------------------------------------------------------------------------------------
def _is_dataset(value: Any) -> bool:
    """A map-style dataset of gpt2kit.data's items: a torch Dataset, or any sized, indexable object that is not a
    path (a list of items, a Hugging Face datasets.Dataset of token lists)."""
    return isinstance(value, Dataset) or (not isinstance(value, (str, bytes, os.PathLike))
                                          and hasattr(value, "__len__") and hasattr(value, "__getitem__"))


def _not_model_files(name: str) -> bool:
    """Whether an entry of a directory that save_model writes into is none of the files a saved model consists of
    (those are replaced, so that no shard or tokenizer file of an earlier save lingers beside the new ones)."""
    return not (is_saved_model_file(name) or name == "val_metrics.json")


def _resume_option(resume: str | None, resume_from_checkpoint: bool | str | None, configured: str | None
                   ) -> str | None:
    """What to resume from: gpt2kit's `resume` ("auto" or a checkpoint directory), or transformers'
    resume_from_checkpoint (True: the latest checkpoint), else the config's checkpoint.resume. A checkpoint
    directory that does not exist is an error now, before any data is tokenized."""
    if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
        if resume is not None:
            raise ValueError("give resume or transformers' resume_from_checkpoint, not both")
        resume = "auto" if resume_from_checkpoint is True else str(resume_from_checkpoint)
    resume = resume or configured
    if resume not in (None, "auto"):
        resume_candidates(".", resume)  # a path is checked alone (no out_dir is read)
    return resume


class Trainer:
    """Train, finetune, evaluate and predict with a GPT-2 from a run config (see configs/ and docs/training.md).

    `Trainer(task="text_generation", model="gpt2-tiny", train_dataset="data/shakespeare").train()`;
    `args` is a RunConfig, a YAML path or None (defaults); the keyword arguments override it. `model` may be a
    preset name, an HF directory or an nn.Module; datasets may be paths or torch Datasets yielding the
    items of gpt2kit.data (`input_ids` + `targets` or `labels`).
    """

    def __init__(self, task: str | None = None, model: str | os.PathLike | nn.Module | None = None,
                 train_dataset: str | os.PathLike | Dataset | Sequence | None = None,
                 eval_dataset: str | os.PathLike | Dataset | Sequence | None = None, *,
                 args: RunConfig | str | os.PathLike | None = None, tokenizer: GPT2Tokenizer | None = None,
                 pet_method: str | None = None, out_dir: str | os.PathLike | None = None) -> None:
        if args is None or isinstance(args, (str, os.PathLike)):
            config = load_run_config(args)
        else:
            config = args
        if task is not None:
            config.task = task
        if pet_method is not None:
            config.pet_method = pet_method
        if out_dir is not None:
            config.out_dir = str(out_dir)
        self._model_arg = None
        self._weights: str | None = None  # the pretrained directory finetune starts from
        if isinstance(model, nn.Module):
            self._model_arg = model
        elif model is not None:
            config.model.name = str(model)
        self._datasets: dict[str, Dataset | None] = {"train": None, "val": None}
        # Datasets passed in were tokenized by the caller: the tokenizer then only pads and is saved.
        self._given_datasets = _is_dataset(train_dataset)
        for split, name, value in (("train", "train_dataset", train_dataset), ("val", "eval_dataset", eval_dataset)):
            if _is_dataset(value):
                self._datasets[split] = value
            elif isinstance(value, (str, os.PathLike)):
                setattr(config.data, split, str(value))
            elif value is not None:
                raise TypeError(f"{name}: expected a path or a map-style dataset (len() and [i]), got "
                                f"{type(value).__name__}")
        config.validate()
        if config.data.tokenizer_vocab_size is not None and config.data.tokenizer is None:
            config.data.tokenizer = str(Path(config.out_dir) / "tokenizer")  # the run's own, wherever out_dir is
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.tokenizer = tokenizer
        self._given_tokenizer = tokenizer
        # Under torchrun: join the job (one GPU per local rank); alone: rank 0 of 1 on the chosen device.
        self.parallel = init_distributed(config.parallel, device=self._pick_device(config.train.device))
        self.device = self.parallel.device
        self.precision = self._pick_precision(config.train.precision)
        self.rank, self.world_size = self.parallel.data_parallel_rank, self.parallel.data_parallel_size
        self.model: nn.Module | None = None
        self.forward_model: nn.Module | None = None
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.last_checkpoint: Path | None = None

    # ---- environment --------------------------------------------------------------------------------------
    @staticmethod
    def _pick_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from ..pipeline import parse_device

        try:
            return parse_device(name)
        except ValueError as err:
            raise ValueError(f"train.device: {err}") from None

    def _pick_precision(self, name: str) -> str:
        native = native_bf16(self.device)
        if name == "auto":
            return "bf16" if native else "fp16" if self.device.type == "cuda" else "fp32"
        if name == "bf16" and self.device.type == "cuda" and not native:
            raise ValueError("train.precision: this GPU has no bf16; use fp16")
        if name == "bf16" and self.device.type == "cpu" and not native:
            warnings.warn("train.precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 "
                          "products are emulated, many times slower than fp32; precision auto picks fp32 here",
                          stacklevel=2)
        return name

    @property
    def is_main(self) -> bool:
        """Rank 0 of the whole job: the one process that prints and writes files."""
        return self.parallel.is_main

    @property
    def _sharded(self) -> bool:
        """Ranks hold different parts of the model (FSDP / TP): saving and sampling need every rank."""
        return self.parallel.distributed and self.parallel.config.shards_model

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- data ---------------------------------------------------------------------------------------------
    @property
    def _kind(self) -> str:
        """pretrain (token windows) | instruction (prompt-masked: Alpaca records or chat conversations) |
        classification."""
        if self.config.task == "text_classification":
            return "classification"
        return "instruction" if self.config.data.format in INSTRUCTION_FORMATS else "pretrain"

    def _corpus_dir(self, path: str, name: str, val_fraction: float, tokenizer: str) -> Path:
        """A preprocessed token directory for `path`: itself when it already is one, else tokenized once with
        `tokenizer` into out_dir/<name> (reused on later runs and on resume)."""
        if (Path(path) / "meta.json").is_file():
            if val_fraction:  # it would be ignored: the directory's splits are already made
                raise ValueError(f"data.val_fraction holds out documents of raw text as it is tokenized, but {path} "
                                 "is already tokenized: its own 'val' split is used (preprocess --val-fraction); "
                                 "remove data.val_fraction")
            return Path(path)
        from ..data.preprocess import output_is_current, preprocess  # imported here: only raw-text runs need it

        d, target = self.config.data, self.out_dir / name
        settings = dict(format=d.format, text_key=d.text_key, tokenizer=tokenizer, val_fraction=val_fraction,
                        errors=d.errors)
        if output_is_current(target, [path], **settings):
            return target
        if (target / "meta.json").is_file():
            print(f"{target}: the data settings, the tokenizer or the input files changed; tokenizing again",
                  file=sys.stderr)
        preprocess([path], target, overwrite=True, **settings)
        return target

    def _tokenizer_source(self) -> str:
        """data.tokenizer (trained first when asked); unset: the tokenizer object given (saved into the run, as
        preprocessing reads files), else the model directory's tokenizer, else GPT-2's."""
        d = self.config.data
        if d.tokenizer_vocab_size is not None:
            self._train_tokenizer()
        if d.tokenizer is not None:
            return d.tokenizer
        if self._given_tokenizer is not None:
            return str(self._saved_given_tokenizer())
        sources = [self._weights, self.config.model.checkpoint, self.config.model.name]
        return next((s for s in sources if s and has_tokenizer_files(s)), "gpt2")

    def _saved_given_tokenizer(self) -> Path:
        target = self.out_dir / "tokenizer"
        if not (has_tokenizer_files(target) and
                GPT2Tokenizer.from_file(target).fingerprint() == self._given_tokenizer.fingerprint()):
            self._given_tokenizer.save_pretrained(target)  # once: later ranks and runs find it current
        return target

    def _required_tokenizer(self) -> str | None:
        """The tokenizer token data must have been made with, where the run has one: data.tokenizer, the one given,
        or that of the weights it finetunes (their embedding rows are its ids). None when random weights name
        none: they take the data's."""
        if self.config.data.tokenizer is not None:
            return self.config.data.tokenizer
        if self._given_tokenizer is not None:
            return "the tokenizer given"
        return self._weights if self._weights is not None and has_tokenizer_files(self._weights) else None

    def _train_tokenizer(self) -> None:
        """Train a byte-level BPE tokenizer on the training text into `data.tokenizer` (default out_dir/tokenizer);
        reused by later runs while the vocabulary size and the training files stay the same."""
        from ..data.tokenizer_training import tokenizer_is_current, train_tokenizer

        d = self.config.data
        if d.train is None:
            raise ValueError("data.tokenizer_vocab_size: no data.train to train the tokenizer on")
        if (Path(d.train) / "meta.json").is_file():
            raise ValueError(f"data.tokenizer_vocab_size: data.train {d.train} is already tokenized; a tokenizer "
                             "is trained on raw text")
        # Classification and instruction files are learned from as they are, as text (their formats are not
        # corpus formats).
        fmt = d.format if self._kind == "pretrain" else "text"
        settings = dict(vocab_size=d.tokenizer_vocab_size, format=fmt, text_key=d.text_key, errors=d.errors)
        if tokenizer_is_current(d.tokenizer, [d.train], **settings):
            return
        train_tokenizer([d.train], d.tokenizer, **settings)

    def _get_tokenizer(self) -> GPT2Tokenizer:
        if self.tokenizer is None:
            self.tokenizer = GPT2Tokenizer.from_pretrained(self._tokenizer_source())
        return self.tokenizer

    def _load_datasets(self) -> None:
        d, kind = self.config.data, self._kind
        train, val = self._datasets["train"], self._datasets["val"]
        context = self._model_config().n_positions
        for key, length in (("data.seq_len", d.seq_len), ("data.max_length", d.max_length)):
            if length is not None and length > context:  # checked before any tokenizing or checkpoint cleanup
                raise ValueError(f"{key}: {length} is longer than the model's context (n_positions={context})")
        for key, path in (("data.train", d.train if train is None else None),
                          ("data.val", d.val if val is None else None)):
            if path is not None and not Path(path).exists():  # before any tokenizing
                raise FileNotFoundError(f"{key}: {path} not found")
        # Raw text is split as it is tokenized (by document); examples, and datasets passed in, below.
        held_out_here = d.val_fraction and (kind != "pretrain" or self._given_datasets)
        if d.val_fraction and (val is not None or d.val is not None):  # the held-out share would be lost
            raise ValueError("data.val_fraction holds out validation examples when there is no data.val: give one "
                             "of the two")
        if kind == "pretrain":
            with self.parallel.main_first():  # raw text is tokenized (and a tokenizer trained) by rank 0 alone
                train, val = self._pretraining_datasets(train, val)
        else:
            with self.parallel.main_first():  # a tokenizer to train (or save) is written by rank 0 alone
                self._get_tokenizer()
            if kind == "classification":
                from ..data import ClassificationDataset

                if train is None and d.train is not None:
                    train = ClassificationDataset(d.train, self._get_tokenizer(), format=d.format,
                                                  max_length=self._max_length(), text_columns=self._text_columns())
                if val is None and d.val is not None:
                    names = list(train.id2label.values()) if hasattr(train, "id2label") else None
                    val = ClassificationDataset(d.val, self._get_tokenizer(), format=d.format,
                                                max_length=self._max_length(), label_names=names,
                                                text_columns=self._text_columns())
            else:
                # Alpaca records teach the Alpaca prompt: the tokenizer records that format (a copy: not the caller's
                # object), so chat, the server and the pipeline prompt it the same way (gpt2kit.conversation).
                # Conversations are written in the tokenizer's own chat format, which it keeps.
                if d.format == "alpaca":
                    self.tokenizer = copy.copy(self._get_tokenizer())
                    self.tokenizer.chat_template = ALPACA.template
                max_length = self._max_length()
                if train is None and d.train is not None:
                    train = self._instructions("data.train", d.train, max_length)
                if val is None and d.val is not None:
                    val = self._instructions("data.val", d.val, max_length)
        if held_out_here:
            train, val = held_out(train, d.val_fraction, self.config.seed)
        self._datasets = {"train": train, "val": val}

    def _pretraining_datasets(self, train: Dataset | None, val: Dataset | None) -> tuple[Dataset, Dataset | None]:
        """Token windows of data.train / data.val: preprocessed directories, or raw text tokenized into out_dir
        first (reused while its settings, tokenizer and files stay the same)."""
        from ..data import PretrainingDataset, load_tokenizer, read_meta

        d = self.config.data
        seq_len = d.seq_len or self._model_config().n_positions
        tokenizer = None
        if train is None:
            if d.train is None:
                raise ValueError("data.train: no training data given")
            train_dir = self._corpus_dir(d.train, "data", d.val_fraction, self._tokenizer_source())
            spec = read_meta(train_dir)["tokenizer"]  # validation text gets the tokenizer of the training data
            tokenizer = "gpt2" if spec["name"] == "gpt2" else str(train_dir / spec["file"])
            required = self._required_tokenizer()
            if required is None:
                self.tokenizer = self.tokenizer or load_tokenizer(train_dir)
            elif spec.get("fingerprint") not in (None, self._get_tokenizer().fingerprint()):
                # Ids of another vocabulary: finetuning would run, and save that vocabulary beside the weights.
                raise ValueError(f"data.train: {train_dir} was tokenized with another tokenizer than the model's "
                                 f"({required}); preprocess the text with that tokenizer (preprocess --tokenizer)")
            train = PretrainingDataset(train_dir, seq_len, "train")
            if val is None and d.val is None and "val" in read_meta(train_dir)["splits"]:
                val = PretrainingDataset(train_dir, seq_len, "val")
        if val is None and d.val is not None:
            val_dir = self._corpus_dir(d.val, "data-val", 0.0, tokenizer or self._tokenizer_source())
            expected = (read_meta(train_dir)["tokenizer"].get("fingerprint") if tokenizer
                        else self._get_tokenizer().fingerprint())
            found = read_meta(val_dir)["tokenizer"].get("fingerprint")
            if expected and found and expected != found:  # its ids would index another vocabulary
                raise ValueError(f"data.val: {val_dir} was tokenized with another tokenizer than the training "
                                 f"data (tokenizer fingerprints {found[:12]} and {expected[:12]})")
            splits = read_meta(val_dir)["splits"]
            val = PretrainingDataset(val_dir, seq_len, "val" if "val" in splits else "train")
        return train, val

    def _instructions(self, key: str, path: str, max_length: int) -> Dataset:
        """An InstructionDataset or ChatDataset (data.format alpaca or chat), saying how many examples it leaves out
        (a prompt longer than max_length tokens leaves nothing to learn) and refusing one that leaves out all."""
        from ..data import ChatDataset, InstructionDataset

        kind = ChatDataset if self.config.data.format == "chat" else InstructionDataset
        dataset = kind(path, self._get_tokenizer(), max_length=max_length)
        if dataset.skipped:
            message = (f"{key}: {dataset.skipped} of {dataset.skipped + len(dataset)} examples have no response token "
                       f"within their first {max_length} tokens (data.max_length) and are left out")
            if not len(dataset):
                raise ValueError(f"{message}: none is left; raise data.max_length (at most the model's context)")
            if self.is_main:
                print(message, file=sys.stderr)
        return dataset

    def _text_columns(self) -> list[str] | None:
        """The classification file's text columns: data.text_key when set (and data.text_pair_key), else found
        by name."""
        d = self.config.data
        if d.text_pair_key is not None:
            return [d.text_key, d.text_pair_key]
        return None if d.text_key == DataArgs.text_key else [d.text_key]

    def _max_length(self) -> int:
        """Classification / instruction examples are cut to data.max_length, by default the model's context."""
        return self.config.data.max_length or self._model_config().n_positions

    def _collate(self):
        from ..data import collate

        # Padding is masked and never scored, but it is looked up: an id the model lacks (GPT-2's 50256 beside a
        # small vocabulary of the caller's data set) would fail in the embedding.
        pad = self._get_tokenizer().pad_token_id
        vocab = (self.model.config if self.model is not None else self._model_config()).vocab_size
        return partial(collate, pad_token_id=pad if pad < vocab else 0)

    def _loader(self, dataset: Dataset, sampler=None, *, batch_size: int) -> DataLoader:
        # A private generator: the DataLoader must not draw from the global RNG, whose state is part of
        # exact resume (dropout), at each new epoch.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                          collate_fn=self._collate(), num_workers=self.config.data.num_workers,
                          drop_last=sampler is not None, generator=torch.Generator(),
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=self.config.data.num_workers > 0)

    # ---- model --------------------------------------------------------------------------------------------
    def _model_config(self) -> GPT2Config:
        m = self.config.model
        if self._model_arg is not None:
            return self._model_arg.config
        if self._weights is not None:  # finetuning: the architecture of the weights it starts from
            config = load_config(self._weights)
        elif m.name in PRESETS:
            config = GPT2Config.from_name(m.name)
        elif Path(m.name).is_dir():
            config = load_config(m.name)
        else:
            raise ValueError(f"model.name: {m.name!r} is neither a preset ({', '.join(PRESETS)}) nor a model "
                             "directory")
        try:
            return config.replace(**m.config)
        except ValueError as err:
            raise ValueError(f"model.config: {err}") from None

    def _build_model(self, weights: str | None) -> nn.Module:
        """The raw model: `weights` (an HF dir) loaded, or random initialisation from the config."""
        if self._model_arg is not None:
            return self._model_arg
        config = self._model_config()
        tokenizer = self._get_tokenizer()
        if weights is None and self.config.model.name in PRESETS and "vocab_size" not in self.config.model.config \
                and tokenizer.vocab_size != config.vocab_size:
            # A preset with another tokenizer (e.g. one trained on the corpus): take its vocabulary.
            config.vocab_size = tokenizer.vocab_size
            config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        if tokenizer.vocab_size > config.vocab_size and not self._given_datasets:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}"
                             " (model.config.vocab_size); for a tokenizer with added tokens, pass the model after "
                             "model.resize_token_embeddings(len(tokenizer))")
        if self.config.task == "text_classification":
            # Named in the saved tokenizer: transformers' classification pipeline pads a batch only with a pad token.
            tokenizer.pad_token_id = tokenizer.pad_token_id
            train = self._datasets["train"]
            num_labels = getattr(train, "num_labels", config.num_labels)
            id2label = getattr(train, "id2label", None)
            if weights is not None:
                overrides = {**self.config.model.config, "pad_token_id": tokenizer.pad_token_id}
                return load_classifier(weights, num_labels=num_labels, id2label=id2label, **overrides)
            _set_labels(config, num_labels, id2label)
            config.pad_token_id = tokenizer.pad_token_id
            return GPT2ForSequenceClassification(config)
        if weights is not None:  # float32 master weights whatever the checkpoint stores: bf16/fp16 is autocast's
            return GPT2LMHeadModel.from_pretrained(weights, dtype=torch.float32, **self.config.model.config)
        return GPT2LMHeadModel(config)

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """The module that runs forward/backward. Order matters: activation checkpointing inside, then
        tensor parallel and FSDP / DDP (training/parallel.py), torch.compile outermost."""
        # FSDP computes in bf16 on GPUs from bf16 copies of its float32 shards; autocast covers the rest.
        param_dtype = torch.bfloat16 if self.precision == "bf16" and self.device.type == "cuda" else None
        model = parallelize(model, self.parallel, recompute=self.config.train.recompute, param_dtype=param_dtype)
        self._parallel_module = model
        if self.config.train.compile:
            model = torch.compile(model)
        return model

    def _grad_sync(self, is_last_micro_step: bool):
        """Context for one micro-step's backward; data parallelism skips the all-reduce unless it is the last."""
        return grad_sync(self._parallel_module, is_last_micro_step)

    def _matmul_params(self) -> int:
        """Parameters used in matmuls: all but the position embedding, and the token embedding when it is only
        looked up (no tied LM head)."""
        model = self.model
        n = model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())
        n -= model.transformer.wpe.weight.numel()
        if getattr(getattr(model, "lm_head", None), "weight", None) is not model.transformer.wte.weight:
            n -= model.transformer.wte.weight.numel()  # an untied head is counted as its own weight
        return n

    # ---- setup --------------------------------------------------------------------------------------------
    def _setup(self, weights: str | None) -> None:
        c = self.config
        # A Trainer trained before starts over: its step, tokens, best loss and checkpoint were the last run's.
        self.step, self.tokens_seen, self.best_val_loss, self.last_checkpoint = 0, 0, math.inf, None
        self._seed_everything(c.seed)
        self._load_datasets()
        if self._datasets["train"] is None:
            raise ValueError("data.train: no training data given")
        if c.checkpoint.keep_best and self._datasets["val"] is None:
            raise ValueError("checkpoint.keep_best: no validation data to choose the best model by (give data.val, "
                             "data.val_fraction or eval_dataset)")
        if c.task == "text_generation" and c.sample.prompt:  # found now, not after the whole run
            context, prompt = self._model_config().n_positions, len(self._get_tokenizer().encode(c.sample.prompt))
            if prompt >= context:
                raise ValueError(f"sample.prompt: {prompt} tokens leave no room in the model's context of {context}")
        self.model = self._build_model(weights)
        check_trainable(self.model, "model")
        if c.pet_method == "lora":
            # The adapters' base is the weights they were trained on: none for a random start (merging then
            # needs an explicit base), an absolute path so the adapter merges from any directory.
            base = str(Path(weights).resolve()) if weights and self._model_arg is None else None
            # Tokens added to the tokenizer for this run get embedding rows of their own to train (the rest of the
            # embedding stays frozen), saved with the adapters.
            tokenizer = self._get_tokenizer()
            new_tokens = sorted(tokenizer.convert_tokens_to_ids(t) for t in tokenizer.added_since_loading)
            self._lora_config = lora_lib.lora_config(c.lora, task=c.task, base_model=base, new_tokens=new_tokens)
            self._lora_base = lora_lib.base_fingerprint(self.model)  # on the CPU, before any training
            lora_lib.apply_lora(self.model, self._lora_config)
        enable_tf32(self.device)
        self.model.to(self.device).train()
        self.forward_model = self._wrap_model(self.model)
        self.optimizer = build_optimizer(self.model, c.optim)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]  # what gets clipped
        self._plan_batches()
        self.scheduler = build_scheduler(self.optimizer, c.optim, self.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        from ..data import ResumableSampler

        train = self._datasets["train"]
        self.sampler = ResumableSampler(len(train), seed=c.seed, shuffle=True, rank=self.rank,
                                        world_size=self.world_size, batch_size=self.global_batch)
        self.train_loader = self._loader(train, self.sampler, batch_size=c.train.micro_batch_size)
        self._batches = None

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _plan_batches(self) -> None:
        """Gradient-accumulation steps and max_steps from the global batch and the dataset size."""
        t = self.config.train
        train = self._datasets["train"]
        per_micro = t.micro_batch_size * self.world_size
        if t.global_batch_tokens is not None:
            seq_len = getattr(train, "seq_len", None)
            if seq_len is None:
                raise ValueError("train.global_batch_tokens needs fixed-length pretraining windows; use "
                                 "train.global_batch_size for this data")
            accum, rest = divmod(t.global_batch_tokens, per_micro * seq_len)
            what = f"global_batch_tokens ({t.global_batch_tokens})"
            unit = f"micro_batch_size x seq_len x devices = {per_micro * seq_len}"
        elif t.global_batch_size is not None:
            accum, rest = divmod(t.global_batch_size, per_micro)
            what, unit = f"global_batch_size ({t.global_batch_size})", f"micro_batch_size x devices = {per_micro}"
        else:
            accum, rest, what, unit = 1, 0, "", ""
        if accum < 1 or rest:
            raise ValueError(f"train: {what} must be a positive multiple of {unit}")
        self.grad_accum = accum
        self.global_batch = per_micro * accum  # examples per optimizer step
        if len(train) < self.global_batch:
            raise ValueError(f"data.train: {len(train)} examples, fewer than one optimizer step's batch of "
                             f"{self.global_batch} (micro-batch x accumulation x devices); lower the batch size")
        self.steps_per_epoch = len(train) // self.global_batch  # each epoch's last partial batch is left out
        # Exact decimal arithmetic: 0.07 epochs of 100 steps is 7 steps, where the float product rounds up to 8.
        self.max_steps = (t.max_steps if t.max_steps is not None else
                          math.ceil(Fraction(str(t.epochs)) * self.steps_per_epoch))

    # ---- the loop -----------------------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, torch.Tensor]:
        while True:
            if self._batches is None:
                self._batches = iter(self.train_loader)
            try:
                batch = next(self._batches)
            except StopIteration:  # end of epoch: the next permutation, from its start
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self._batches = None
                continue
            self.sampler.advance(len(batch["input_ids"]))
            return batch

    def _forward(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None):
        model = model if model is not None else self.forward_model
        # Checked on the loader's host tensor: on the device it would wait for the GPU at every micro-step.
        unpadded = "labels" not in batch and bool(batch["attention_mask"].all())
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if "labels" in batch:
            return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        mask = None if unpadded else batch["attention_mask"]
        return model(batch["input_ids"], attention_mask=mask, targets=batch["targets"], return_logits=False)

    @staticmethod
    def _loss_weight(batch: dict[str, torch.Tensor]) -> int:
        """How many terms the batch's mean loss averages: scored targets, or examples."""
        if "targets" in batch:
            return int((batch["targets"] != -100).sum())
        return len(batch["labels"])

    def _step_counts(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
        """(scored targets, real tokens) of the step's micro-batches on all data-parallel ranks: one all-reduce
        (the ranks' counts differ when rows are padded)."""
        local = [sum(self._loss_weight(b) for b in micro_batches),
                 sum(int(b["attention_mask"].sum()) for b in micro_batches)]
        if not self.parallel.distributed:
            return local[0], local[1]
        total, tokens = self.parallel.all_reduce_sum(torch.tensor(local, device=self.device)).tolist()  # NCCL: device
        return int(total), int(tokens)

    def backward(self, micro_batches: list[dict[str, torch.Tensor]], total: int | None = None) -> torch.Tensor:
        """Forward and backward over the micro-batches of one step. Each mean loss is weighted by its batch's
        share of all scored targets (examples for classification), so the accumulated gradient equals that of
        the micro-batches' union as one batch. Returns that union's mean loss. `total`: the step's scored
        targets on all ranks when already counted (train_step counts them with its tokens, in one all-reduce)."""
        weights = [self._loss_weight(b) for b in micro_batches]
        # The step's scored targets on all data-parallel ranks; DDP / FSDP average gradients over those ranks,
        # so each rank's share is scaled back up by their number.
        total = self._step_counts(micro_batches)[0] if total is None else total
        if total == 0:
            raise ValueError(f"step {self.step + 1}: the batch has no scored tokens (all targets are -100)")
        loss_sum = torch.zeros((), device=self.device)
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            with self._grad_sync(i == len(micro_batches) - 1):
                with self._autocast():
                    loss = self._forward(batch).loss * (weight / total)
                self.scaler.scale(loss * self.world_size).backward()
            loss_sum += loss.detach().float()
        return self.parallel.all_reduce_sum(loss_sum)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics."""
        micro_batches = [self._next_batch() for _ in range(self.grad_accum)]
        total, tokens = self._step_counts(micro_batches)
        loss_sum = self.backward(micro_batches, total)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self._params, self.config.train.grad_clip or float("inf"))
        # One device-to-host copy for both numbers, not one sync each.
        grad_norm = grad_norm.to(loss_sum.device, torch.float32)
        loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm]).tolist()
        if not math.isfinite(loss_value) or (self.precision != "fp16" and not math.isfinite(norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            last = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint \
                else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"step {self.step + 1}: {what} is {loss_value if what == 'loss' else norm_value}; training "
                f"stopped without applying this update ({last}). Lower optim.lr, raise optim.warmup_steps or "
                f"use train.precision fp32, then resume with --resume auto")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += tokens
        width = max(b["input_ids"].shape[1] for b in micro_batches)
        return {"train_loss": loss_value, "lr": lr, "grad_norm": norm_value, "tokens": tokens, "seq_len": width}

    def _run(self, resume: str | None) -> dict[str, Any]:
        c = self.config
        if resume:
            self._resume(resume)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            save_config(c, self.out_dir / "config.yaml")
            stale = remove_checkpoints_after(self.out_dir, self.step)
            if stale:
                print(f"removed {len(stale)} checkpoint(s) past step {self.step} left by an earlier run in "
                      f"{self.out_dir / CHECKPOINTS_DIR} ({stale[0].name} to {stale[-1].name})", file=sys.stderr)
        if self.parallel.broadcast(self.is_main and self._remove_later_best()):
            self.best_val_loss = math.inf  # the best model up to this step is gone: the next evaluation is it
        logger = MetricsLogger(self.out_dir, tensorboard=c.log.tensorboard, resume_step=self.step,
                               enabled=self.is_main)
        peak, peak_source = peak_flops(self.device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.precision, torch.float32))  # the peak of the dtype the matmuls run in
        peak *= self.parallel.world_size
        matmul_params = self._matmul_params()
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        start_step = self.step
        if self.is_main:
            print(f"{c.task} {'LoRA ' if c.pet_method == 'lora' else ''}on {self.device} ({self.precision}): "
                  f"{self.model.num_parameters() / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
                  f"{len(self._datasets['train'])} examples, micro-batch {c.train.micro_batch_size} x "
                  f"{self.grad_accum} accumulation x {self.world_size} data-parallel ranks "
                  f"({self.parallel.config.describe()}), {self.max_steps} steps; "
                  f"MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_source})", file=sys.stderr)
        bar = None
        if self.is_main and c.log.progress:
            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)
        started = time.perf_counter()
        train_time = 0.0
        if c.train.eval_interval and self.step == 0 and self._datasets["val"] is not None:
            self._log_eval(logger, c.train.eval_batches)  # where the curve starts
        try:
            self.model.train()
            while self.step < self.max_steps:
                tick = time.perf_counter()
                metrics = self.train_step()
                elapsed = time.perf_counter() - tick
                train_time += elapsed
                tokens_per_sec = metrics["tokens"] / elapsed
                mfu = tokens_per_sec * flops_per_token(self.model.config, matmul_params, metrics["seq_len"]) / peak
                metrics.update(tokens_per_sec=tokens_per_sec, mfu=mfu, tokens_seen=self.tokens_seen)
                metrics.pop("seq_len")
                if self.step % c.train.log_interval == 0 or self.step == self.max_steps:
                    logger.log(self.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{tokens_per_sec:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
                if c.train.eval_interval and self.step % c.train.eval_interval == 0 and self.step < self.max_steps:
                    self._log_eval(logger, c.train.eval_batches)
                if c.checkpoint.save_interval and self.step % c.checkpoint.save_interval == 0:
                    self._save_checkpoint()  # before the final evaluation too: a crash there loses no training
        finally:
            if bar is not None:
                bar.close()
        # A finished run resumed trains nothing: its final evaluation is in the log already, unless the run stopped
        # between its last checkpoint and that evaluation.
        final_eval = (self._log_eval(logger, None, log=self.step > start_step or not self._val_logged(logger))
                      if self._datasets["val"] is not None else {})
        own = self.out_dir / CHECKPOINTS_DIR / f"step-{self.step:08d}"
        if self.last_checkpoint is None or self.last_checkpoint.resolve() != own.resolve():
            self._save_checkpoint()  # also after resuming from another run's checkpoint: that one is not touched
        elif final_eval and self.is_main:  # saved before the final evaluation: a run continued from it knows its best
            rewrite_trainer_state(self.last_checkpoint, {"best_val_loss": self._recorded_best_val_loss()})
        final_dir = self._save_model_dir("final")
        logger.close()
        summary = {
            "steps": self.step, "steps_this_run": self.step - start_step, "tokens_seen": self.tokens_seen,
            "train_seconds": round(train_time, 2), "wall_seconds": round(time.perf_counter() - started, 2),
            "allocator": allocator_in_use(),
            "best_val_loss": self._recorded_best_val_loss(), **final_eval,
            "checkpoint": str(self.last_checkpoint), "final_model": str(final_dir),
            # Not when a resumed run, with keep_best new to it, never beat the best it resumed with.
            **({"best_model": str(self.out_dir / BEST_DIR)} if (self.out_dir / BEST_DIR).is_dir()
               and c.checkpoint.keep_best else {}),
            "metrics": str(logger.path),
        }
        if self.is_main and c.log.plot:
            unit = "example" if c.task == "text_classification" else "token"
            plot = plot_losses(logger.path, self.out_dir / "loss.png",
                               title=f"{self.config.model.name}, {self.out_dir.name}", unit=unit)
            summary["loss_plot"] = str(plot) if plot else None
        self._write_summary(summary)  # before the sample: a sample that fails loses neither summary nor plot
        if c.task == "text_generation" and c.sample.prompt and (self.is_main or self._sharded):
            summary["sample"] = self._sample()  # a sharded model needs every rank for each forward
            self._write_summary(summary)
        if self.is_main:
            print(self._summary_line(summary), file=sys.stderr)
        return summary

    def _remove_later_best(self) -> bool:
        """Remove out_dir/best when an earlier run chose it after this run's step (resumed from an earlier
        checkpoint, this run would otherwise report that abandoned model as its best); whether it did."""
        best = self.out_dir / BEST_DIR
        try:
            chosen_at = json.loads((best / "val_metrics.json").read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if chosen_at <= self.step:
            return False
        shutil.rmtree(best)
        print(f"removed {best}: chosen at step {chosen_at} by an earlier run, past this run's step {self.step}",
              file=sys.stderr)
        return True

    def _write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_text(self.out_dir / "summary.json",
                              json.dumps(standard_json(summary), indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    @staticmethod
    def _summary_line(s: dict[str, Any]) -> str:
        parts = [f"done: {s['steps']} steps ({s['steps_this_run']} this run), {s['tokens_seen']:,} tokens in "
                 f"{s['wall_seconds']:.0f}s"]
        if s.get("val_loss") is not None:
            parts.append(f"val loss {s['val_loss']:.4f}" + (f" (ppl {s['val_ppl']:.2f})" if "val_ppl" in s else ""))
        if s.get("val_accuracy") is not None:
            parts.append(f"val accuracy {s['val_accuracy']:.2%}")
        if s.get("best_val_loss") is not None:
            parts.append(f"best val loss {s['best_val_loss']:.4f}")
        parts.append(f"model in {s['final_model']}")
        return ", ".join(parts)

    # ---- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate_dataset(self, dataset: Dataset, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss over the scored targets (or examples) of `dataset`, in order; accuracy for classification."""
        model = self.forward_model if self.forward_model is not None else self.model
        loader = self._loader(dataset, batch_size=self.config.train.micro_batch_size)
        loss_sum, count, correct = 0.0, 0, 0
        with eval_mode(self.model):
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                with self._autocast():
                    out = self._forward(batch, model)
                weight = self._loss_weight(batch)
                loss_sum += float(out.loss) * weight
                count += weight
                if "labels" in batch:
                    correct += int((out.logits.argmax(-1).cpu() == batch["labels"]).sum())
        if not count:  # training refuses such data too; a loss of 0 would read as a perfect score
            raise ValueError("the validation data has no scored targets (every target is ignored, -100)")
        result = {"val_loss": loss_sum / count}
        if self.config.task == "text_classification":
            result["val_accuracy"] = correct / count
        else:
            from ..evaluation.scoring import exp_or_inf

            result["val_ppl"] = exp_or_inf(result["val_loss"])
        return result

    def _val_logged(self, logger: MetricsLogger) -> bool:
        """Whether the metrics log holds a validation record at this step (rank 0 reads it; all ranks agree)."""
        logged = self.is_main and any(r.get("step") == self.step and "val_loss" in r for r in read_metrics(logger.path))
        return self.parallel.broadcast(logged)

    def _log_eval(self, logger: MetricsLogger, max_batches: int | None, log: bool = True) -> dict[str, float]:
        val = self._datasets["val"]
        result = self._evaluate_dataset(val, max_batches) if val else {}
        # A periodic evaluation of eval_batches scores a subset, not comparable, unless those batches cover it all.
        whole = max_batches is None or max_batches * self.config.train.micro_batch_size >= len(val or ())
        if result and whole:
            if result["val_loss"] < self.best_val_loss and self.config.checkpoint.keep_best:
                self._save_model_dir(BEST_DIR, {"step": self.step, **result})  # every rank: it may gather shards
            self.best_val_loss = min(self.best_val_loss, result["val_loss"])
        if result and log:
            # Logged apart (val_subset_loss, ...): one curve through subset and whole-set scores would draw the
            # change of set as a change of the model.
            logger.log(self.step, result if whole else {k.replace("val_", "val_subset_"): v for k, v in result.items()})
            if self.is_main:
                extra = (f", accuracy {result['val_accuracy']:.2%}" if "val_accuracy" in result
                         else f", ppl {result['val_ppl']:.2f}")
                scored = "" if whole else f" (first {max_batches} batches)"
                tqdm.write(f"step {self.step}: val loss{scored} {result['val_loss']:.4f}{extra}", file=sys.stderr)
        return result

    def _room(self, text: str) -> int:
        """sample.max_new_tokens, cut to the room the model's context leaves after `text` (a text that fills the
        context keeps it whole, for generate's error saying so)."""
        room = self.model.config.n_positions - len(self._get_tokenizer().encode(text))
        return min(self.config.sample.max_new_tokens, room) if room > 0 else self.config.sample.max_new_tokens

    def _sample(self) -> str:
        s = self.config.sample
        text = self._continue(s.prompt, max_new_tokens=self._room(s.prompt), do_sample=True,
                              temperature=s.temperature, top_k=s.top_k, seed=self.config.seed, full_text=True)
        if self.is_main:
            print(f"--- sample ---\n{text}\n--------------", file=sys.stderr)
        return text

    def _continue(self, text: str, *, full_text: bool = False, **options: Any) -> str:
        """The model's continuation of `text` (with `text` in front if `full_text`), ending at EOS; ids the
        tokenizer cannot decode are never drawn. Under tensor parallelism every rank must draw the same tokens:
        an unseeded sample gets rank 0's seed, and the KV cache is off (it is sized for all the heads, a rank
        holds some)."""
        from ..generation import generate
        from ..pipeline import text_options

        tokenizer = self._get_tokenizer()
        options = text_options(tokenizer, self.model.config.vocab_size, options)
        if self._sharded:
            # Every rank calls this and each forward is collective, so all must sample the same tokens: one seed
            # (their random states differ after batches of other widths). No KV cache: its size and dtype come
            # from the local shards (a TP rank holds some of the heads, FSDP's bf16 compute writes bf16 keys
            # beside float32 shards).
            options.update(seed=self.parallel.shared_seed(options.get("seed")), use_cache=False)
        ids = torch.tensor([tokenizer.encode(text)], device=self.device)
        self.model.eval()
        out = generate(self.model, ids, **options)
        return tokenizer.decode(out[0, 0 if full_text else ids.shape[1]:].tolist(), skip_special_tokens=True)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _save_model_files(self, directory: Path) -> None:
        """Model (or LoRA adapters) + tokenizer into a directory that does not exist yet."""
        if self.config.pet_method == "lora":
            lora_lib.save_adapter(self.model, directory)
        else:
            self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    def _rng_state(self) -> dict[str, Any]:
        """This process's torch, Python, NumPy (and its GPU's) random states."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        np_state = np.random.get_state()
        rng["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _layout(self) -> list[int]:
        """This job's parallel degrees: data, shard, tensor."""
        c = self.parallel.config
        return [c.data, c.shard, c.tensor]

    def _training_state(self, rngs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors and primitives for torch.save, JSON-able trainer state); `rngs`: every rank's random states,
        by rank. Ranks are seeded alike but their states drift apart (dropout draws as many numbers as a batch,
        padded to each rank's own width, has elements), so each is kept; rank 0's also stands alone for a resume on
        another number of processes."""
        tensors = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs[0]}
        if len(rngs) > 1:
            tensors["rng_ranks"], tensors["rng_layout"] = rngs, self._layout()
        if not self._sharded:  # a sharded optimizer goes into the distributed checkpoint instead
            tensors["optimizer"] = self.optimizer.state_dict()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                 "best_val_loss": self._recorded_best_val_loss(),
                 "max_steps": self.max_steps, "grad_accum": self.grad_accum, "world_size": self.world_size,
                 "train_examples": len(self._datasets["train"]), "train_fingerprint": self._train_fingerprint(),
                 "pet_method": self.config.pet_method, "config": self.config.to_dict()}
        if self.config.pet_method == "lora":
            state["lora_base_fingerprint"] = self._lora_base
        return tensors, state

    def _train_fingerprint(self) -> str | None:
        """examples_fingerprint of the training data read from data.train (datasets passed in may draw anew on
        every read, e.g. random crops: none is recorded for them)."""
        return None if self._given_datasets else examples_fingerprint(self._datasets["train"])

    def _recorded_best_val_loss(self) -> float | None:
        """best_val_loss as JSON holds it: None before any whole-set evaluation."""
        return self.best_val_loss if math.isfinite(self.best_val_loss) else None

    def _save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint; with a sharded model every rank also writes its part of the model and
        optimizer into training_state/dcp, with config.json (the top level then holds the tokenizer only)."""
        root = self.out_dir / CHECKPOINTS_DIR
        final = root / f"step-{self.step:08d}"
        tmp = root / f".step-{self.step:08d}.partial-{self.parallel.broadcast(os.getpid())}"
        rngs = self.parallel.all_gather(self._rng_state())
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if self._sharded:
                tmp.mkdir()
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
            else:
                self._save_model_files(tmp)
            tensors, state = self._training_state(rngs)
            (tmp / STATE_DIR).mkdir()
            torch.save(tensors, tmp / STATE_DIR / "state.pt")
            (tmp / STATE_DIR / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        hashed = {}
        if self._sharded:
            save_distributed_checkpoint(tmp / STATE_DIR / DCP_DIR, self.model, self.optimizer)
            for share in self.parallel.all_gather(hash_files(tmp, self.parallel.rank, self.parallel.world_size)):
                hashed.update(share)
        if self.is_main:
            write_manifest(tmp, self.step, hashed)
            replace_directory(tmp, final)
            prune_checkpoints(self.out_dir, self.config.checkpoint.keep_last)
        self.last_checkpoint = final
        return final

    def _save_model_dir(self, name: str | Path, metrics: dict[str, Any] | None = None, *,
                        keep_others: bool = False) -> Path:
        """The model (or LoRA adapters) and tokenizer in out_dir/<name> (or at the path `name`), swapped in whole;
        `metrics` (the evaluation that chose it) beside them in val_metrics.json. With `keep_others` the directory's
        other files and folders stay (save_model into a directory of the user's)."""
        target = replaced_directory(self.out_dir / name)  # never the working directory or one above it
        full_state = gather_full_state(self.model) if self._sharded else None  # collective: every rank
        if self.is_main:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned(target, ("partial", "old"))  # of a run killed while writing it
            tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            if full_state is not None:
                save_pretrained(self.model, tmp, state=full_state)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
            else:
                self._save_model_files(tmp)
            if metrics is not None:
                atomic_write_text(tmp / "val_metrics.json", json.dumps(standard_json(metrics), indent=2) + "\n")
            replace_directory(tmp, target, keep=_not_model_files if keep_others else None)
        return target

    def _resume(self, resume: str) -> None:
        def verify_together(path: Path) -> None:
            # Each rank hashes a share of the files, and a checkpoint is valid when every share is.
            error = None
            try:
                verify_checkpoint(path, self.parallel.rank, self.parallel.world_size)
            except (CheckpointError, OSError, ValueError) as err:
                error = err
            failed = [message for message in self.parallel.all_gather(None if error is None else str(error))
                      if message is not None]
            if failed:
                raise CheckpointError(failed[0])

        # Rank 0 lists the candidates (ranks whose view of a shared file system lags would try others), and all
        # ranks verify each in turn.
        candidates, error = None, None
        if self.is_main:
            try:
                restore_interrupted_swaps(self.out_dir)  # a checkpoint a kill took out of its place is one
                candidates = resume_candidates(self.out_dir, resume)
            except (OSError, ValueError) as err:
                error = err
        raise_if_any_rank_failed(error, "finding the checkpoint to resume from", CheckpointError)
        path, error = None, None
        try:
            path = find_resume_checkpoint(self.out_dir, resume, verify_together, report=self.is_main,
                                          candidates=self.parallel.broadcast(candidates))
        except (CheckpointError, OSError, ValueError) as err:
            error = err
        raise_if_any_rank_failed(error, "finding the checkpoint to resume from", CheckpointError)
        if path is None:
            if self.is_main:
                print(f"resume: no complete checkpoint in {self.out_dir / CHECKPOINTS_DIR}; starting from step 0",
                      file=sys.stderr)
            return
        self._load_checkpoint(path)
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / STATE_DIR / "trainer_state.json").read_text())
        if state.get("pet_method", "none") != self.config.pet_method:
            raise CheckpointError(f"{path}: saved with pet_method {state.get('pet_method')!r}, this run uses "
                                  f"{self.config.pet_method!r}")
        # The data position it resumes at counts the examples of the epoch's permutation already used (so another
        # batch size continues with the next ones); another set of examples (other data, or another data.seq_len
        # cutting other windows) has another permutation, and the run would go on anywhere in it.
        saved, now = state.get("train_examples"), len(self._datasets["train"])
        advice = ("so it would not continue that run. Resume with the data it was trained on, or start a new run "
                  "(another out_dir) from its weights (model.checkpoint)")
        if saved is not None and saved != now:
            raise CheckpointError(f"{path}: saved from a run over {saved} training examples; this run has {now} "
                                  f"(other data, or another data.seq_len), {advice}")
        fingerprint = state.get("train_fingerprint")
        if fingerprint is not None and fingerprint != self._train_fingerprint():
            raise CheckpointError(f"{path}: saved from a run over other training examples than this run's (as many, "
                                  f"{now}, but other content: other data, or another data.format or tokenizer), "
                                  f"{advice}")
        # weights_only: only tensors and plain containers, never code from the file.
        tensors = torch.load(path / STATE_DIR / "state.pt", map_location="cpu", weights_only=True)
        with configured_hyperparameters(self.optimizer, self.scheduler):
            if (path / STATE_DIR / DCP_DIR).is_dir():  # saved sharded: loads into any layout, this one included
                self._check_saved_shape(path / STATE_DIR / DCP_DIR)  # its config.json lies beside the shards
                self._check_lora_base(state, path)
                load_distributed_checkpoint(path / STATE_DIR / DCP_DIR, self.model, self.optimizer)
            elif self.config.pet_method == "lora":
                self._check_saved_shape(path)  # the adapted model's config lies beside the adapters
                self._check_lora_base(state, path)
                lora_lib.load_adapter_weights(self.model, path)
                self.optimizer.load_state_dict(tensors["optimizer"])
            else:  # saved whole, by one process or DDP
                self._check_saved_shape(path)
                weights = hf_to_gpt2kit(load_state_dict(path), self.model)
                if self._sharded:  # resumed sharded: each rank keeps its part
                    load_full_state(self.model, self.optimizer, weights, tensors["optimizer"])
                else:
                    self.model.load_state_dict(weights, strict=True)
                    if hasattr(self.model, "tie_weights"):
                        self.model.tie_weights()
                    self.optimizer.load_state_dict(tensors["optimizer"])
            self.scheduler.load_state_dict(tensors["scheduler"])
        if tensors["scaler"]:  # empty when saved without fp16 (a disabled scaler): this run's fresh one stays
            self.scaler.load_state_dict(tensors["scaler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val_loss = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        self.sampler.load_state_dict(self._sampler_state(state, path))
        self._batches = None
        # Every rank's own states, where this run has the layout that saved them; else rank 0's for all: under
        # another layout a tensor-parallel group would get different states, and its replicated weights (whose
        # dropout must draw alike on every rank of the group) would drift apart.
        ranks = tensors.get("rng_ranks", [])
        same_layout = len(ranks) == self.parallel.world_size and tensors.get("rng_layout") == self._layout()
        rng = ranks[self.parallel.rank] if same_layout else tensors["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        if "cuda" in rng and self.device.type == "cuda":
            state = rng["cuda"]  # older checkpoints hold one state per visible GPU
            torch.cuda.set_rng_state(state[0] if isinstance(state, (list, tuple)) else state, self.device)
        self.last_checkpoint = path

    def _check_saved_shape(self, path: Path) -> None:
        """One error naming what changed when the run's model config no longer matches the checkpoint's (its
        weights would fail to load with torch's list of every mismatched tensor)."""
        model = unwrap(self.model)
        changed = load_config(path).shape_changes(model.config,
                                                  classifier=isinstance(model, GPT2ForSequenceClassification))
        if changed:
            raise CheckpointError(f"{path}: saved from another model shape than this run's ({', '.join(changed)}); "
                                  f"resume with the model config it was trained with, or use a new out_dir")

    def _check_lora_base(self, state: dict[str, Any], path: Path) -> None:
        """One error when a LoRA checkpoint's adapters were trained on other base weights than this run's (they
        would load, and training go on from a jump in the loss)."""
        if self.config.pet_method == "lora" and state.get("lora_base_fingerprint", self._lora_base) != self._lora_base:
            raise CheckpointError(f"{path}: its adapters were trained on another base model than this run's (other "
                                  "weights in model.name or model.checkpoint, or for a random base another seed); "
                                  "resume with the base it was trained on")

    def _sampler_state(self, state: dict[str, Any], path: Path) -> dict[str, int]:
        """The sampler state for this run's data-parallel size. Ranks consume the epoch's permutation in
        interleaved slices, so after `position` samples per rank on W ranks exactly its first position x W
        samples are used, whatever W was: the position carries over when that number divides evenly. A position
        at or past this run's epoch (a checkpoint from another world size or an older version, whose epochs kept
        more samples) continues with the next epoch."""
        sampler = dict(state["sampler"])
        saved = state.get("world_size", 1)
        if saved != self.world_size:
            consumed = sampler["position"] * saved
            if consumed % self.world_size:
                raise CheckpointError(f"{path}: {consumed} samples of the epoch were consumed on {saved} data-parallel"
                                      f" ranks, which {self.world_size} ranks cannot split evenly")
            sampler["position"] = consumed // self.world_size
        if sampler["position"] >= self.sampler.per_rank:  # the epoch's whole steps are done (its tail is skipped)
            sampler.update(epoch=sampler["epoch"] + 1, position=0)
        return sampler

    # ---- public API ---------------------------------------------------------------------------------------
    def train(self, resume: str | None = None, *, resume_from_checkpoint: bool | str | None = None
              ) -> dict[str, Any]:
        """Pretrain from randomly initialised weights (or continue: resume="auto" or a checkpoint dir;
        transformers' resume_from_checkpoint=True or a checkpoint dir says the same)."""
        resume = _resume_option(resume, resume_from_checkpoint, self.config.checkpoint.resume)
        self.config.check_training()  # before any data is tokenized
        if self.config.pet_method == "lora" and self._model_arg is None and self.is_main:
            print("note: train starts LoRA from randomly initialised weights; `gpt2kit finetune` (Trainer.finetune) "
                  "adds the adapters to pretrained ones", file=sys.stderr)
        self._setup(weights=None)
        return self._run(resume)

    def finetune(self, finetune_checkpoint: str | os.PathLike | None = None,
                 resume: str | None = None, *, resume_from_checkpoint: bool | str | None = None) -> dict[str, Any]:
        """Train starting from pretrained weights: `finetune_checkpoint`, else model.checkpoint, else model.name
        when it is a directory or a name in the local HF cache. With pet_method "lora" only the adapters train.
        `resume` / `resume_from_checkpoint` as in train."""
        resume = _resume_option(resume, resume_from_checkpoint, self.config.checkpoint.resume)
        self.config.check_training()  # before any data is tokenized
        weights = finetune_checkpoint or self.config.model.checkpoint
        if weights is None and self._model_arg is None:
            try:  # a model directory or a name in the local HF cache
                weights = resolve_model_dir(self.config.model.name)
            except CheckpointError:
                raise ValueError(f"finetune needs pretrained weights: model.name {self.config.model.name!r} is "
                                 "neither a model directory nor in the local HF cache; set model.name or "
                                 "model.checkpoint to a model directory (Python: or pass finetune_checkpoint)"
                                 ) from None
        self._weights = str(resolve_model_dir(weights)) if weights is not None else None  # a dir or HF cache name
        self._setup(weights=self._weights)
        return self._run(resume)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """transformers' call: the model (or LoRA adapters) and tokenizer, as out_dir/final holds them, into
        `output_dir` (default out_dir/final; its other files and folders stay, as in transformers; never the
        working directory or one above it). Every rank calls it when the model is sharded."""
        if self.model is None:
            raise ValueError("save_model: no model yet; train, finetune or evaluate first")
        if output_dir is None:
            return self._save_model_dir("final")
        return self._save_model_dir(Path(output_dir).resolve(), keep_others=True)

    def _ensure_model(self) -> None:
        if self.model is not None:
            return
        name = self.config.model.name
        if self._model_arg is not None:
            self.model = self._model_arg
        elif not Path(name).is_dir():
            raise ValueError(f"model.name {name!r}: evaluate/predict need a trained model directory")
        elif self.config.task == "text_classification":
            self.model = GPT2ForSequenceClassification.from_pretrained(name)
        else:
            self.model = GPT2LMHeadModel.from_pretrained(name)
        self._get_tokenizer()
        self.model.to(self.device).eval()

    def evaluate(self, eval_dataset: str | os.PathLike | Dataset | Sequence | None = None) -> dict[str, Any]:
        """Validation metrics of the current (or given directory's) model: loss and perplexity for text
        generation (a raw text file is scored with gpt2kit.evaluation's document perplexity, an instruction file
        on its responses, as training does); for a classification file, gpt2kit.evaluation's accuracy,
        Matthews correlation and per-class counts."""
        self._ensure_model()
        data = eval_dataset if eval_dataset is not None else (self._datasets["val"] or self.config.data.val)
        if data is None:
            raise ValueError("evaluate: no evaluation data (eval_dataset or data.val)")
        if _is_dataset(data):
            return self._evaluate_dataset(data)
        if self.config.task == "text_classification":
            from ..evaluation.classification import evaluate_classification

            # The evaluation suite's code (accuracy, MCC, per-class counts), as `gpt2kit eval` reports it.
            id2label = self.model.config.id2label or {}
            labels = [id2label[i] for i in sorted(id2label)] or None  # in output order, as config.json may not be
            result = evaluate_classification(self.model, self.tokenizer, data, format=self.config.data.format,
                                             text_columns=self._text_columns(),
                                             max_length=self.config.data.max_length, label_names=labels,
                                             batch_size=self.config.train.micro_batch_size, progress=False)
            return {"val_accuracy": result["accuracy"], **result}
        if self.config.data.format in INSTRUCTION_FORMATS:  # scored as training scores it: the responses' tokens
            return self._evaluate_dataset(self._instructions("eval_dataset", data, self._max_length()))
        if (Path(data) / "meta.json").is_file():
            from ..data import PretrainingDataset, read_meta

            meta = read_meta(data)
            found, expected = meta["tokenizer"].get("fingerprint"), self.tokenizer.fingerprint()
            vocab = meta["tokenizer"].get("vocab_size") or 0
            if (found and found != expected) or vocab > self.model.config.vocab_size:  # ids of another vocabulary
                raise ValueError(f"evaluate: {data} was tokenized with another tokenizer than the model's "
                                 f"({vocab} tokens; the model has {self.model.config.vocab_size})")
            split = "val" if "val" in meta["splits"] else "train"
            seq_len = self.config.data.seq_len or self.model.config.n_positions
            return self._evaluate_dataset(PretrainingDataset(data, seq_len, split))
        from ..evaluation.perplexity import FORMATS, evaluate_perplexity

        fmt = self.config.data.format if self.config.data.format in FORMATS else "auto"
        return evaluate_perplexity(self.model, self.tokenizer, data, format=fmt, text_key=self.config.data.text_key)

    @torch.no_grad()
    def predict(self, inputs: str | list[str] | None = None, *, input_data: str | list[str] | None = None,
                **generation_options: Any) -> list[str]:
        """Generated continuations (text generation; options as gpt2kit.generation.generate) or predicted
        label names (classification) for one text or a list; `input_data` is MindFormers' name for `inputs`."""
        if (inputs is None) == (input_data is None):
            raise ValueError("predict: give the texts as inputs (or input_data), once")
        inputs = inputs if input_data is None else input_data
        self._ensure_model()
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        self.model.eval()
        if self.config.task == "text_classification":
            from ..evaluation.classification import classify

            logits = classify(self.model, self.tokenizer, texts, max_length=self._max_length(),  # as in training
                              batch_size=self.config.train.micro_batch_size)
            id2label = self.model.config.id2label or {}
            return [id2label.get(int(i), str(int(i))) for i in logits.argmax(-1)]
        if "max_length" in generation_options:  # prompt + new tokens, checked against the context by generate
            return [self._continue(text, **generation_options) for text in texts]
        return [self._continue(text, **{"max_new_tokens": self._room(text), **generation_options}) for text in texts]


def run(mode: str, config_path: str | os.PathLike | None, overrides: list[tuple[str, str]] | None = None,
        resume: str | None = None) -> dict[str, Any]:
    """`gpt2kit train|finetune --config FILE [--section.key value ...] [--resume auto|PATH]`."""
    # --resume replaces the config's checkpoint.resume before that is checked (a stale one must not stop it); a
    # missing PATH is an error naming --resume before tokenizing (see _resume_option).
    replaced = {} if resume is None else {"checkpoint": {"resume": None}}
    config = load_run_config(config_path, overrides, training=True, **replaced)
    if resume is not None:
        config.checkpoint.resume = resume
    trainer = Trainer(args=config)
    return trainer.train() if mode == "train" else trainer.finetune()

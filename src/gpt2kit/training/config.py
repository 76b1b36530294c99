"""Run configuration: dataclasses for every section of a training YAML, loading, and `--section.key value` overrides.

A run config is one YAML mapping whose top-level keys are the fields of `RunConfig` (task, pet_method, out_dir,
seed) and its sections (model, data, train, optim, checkpoint, lora, log, sample, parallel). Every key is checked
against the dataclasses: an unknown or mistyped key is an error that names the key, its file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from ..config import PRESETS, GPT2Config
from ..files import atomic_write_text
from .parallel import ParallelConfig, ParallelConfigError, launched_world_size

TASKS = ("text_generation", "text_classification")


class ConfigError(ValueError):
    """A run config that cannot be used, naming the file, line and key."""


@dataclass
class ModelArgs:
    """Which network to train."""

    name: str = "gpt2-tiny"  # a preset (gpt2, gpt2-medium, ..., gpt2-tiny) or an HF-format model directory
    checkpoint: str | None = None  # finetune: weights to start from; default `name` when it is a directory
    config: dict[str, Any] = field(default_factory=dict)  # GPT2Config fields to override, e.g. resid_pdrop


@dataclass
class DataArgs:
    """Where the examples come from and how they are cut."""

    train: str | None = None  # preprocessed dir, or raw text/jsonl/tsv files (preprocessed into out_dir/data)
    val: str | None = None  # validation/dev set; pretraining: default the "val" split of `train`
    format: str = "auto"  # preprocess: auto|text|jsonl|wikitext...; txtcls: auto|sst2|cola|agnews|csv; alpaca|chat
    text_key: str = "text"  # jsonl field holding the text; txtcls: the csv/tsv text column (default: found by name)
    text_pair_key: str | None = None  # txtcls: the column of a sentence pair's second sentence (GLUE's sentence2)
    tokenizer: str | None = None  # "gpt2", a tokenizer file/dir (or where `tokenizer_vocab_size` writes one,
    # default out_dir/tokenizer); unset: the one saved in the model directory, else GPT-2's
    tokenizer_vocab_size: int | None = None  # train a byte-level BPE of this size on `train` first
    seq_len: int | None = None  # pretraining window; default the model's context (n_positions)
    max_length: int | None = None  # txtcls / instruction: truncate examples to this many tokens
    val_fraction: float = 0.0  # share held out as "val": documents of raw text, examples of other data
    errors: str = "strict"  # raw text: invalid UTF-8 is an error naming file, line and byte; "replace": U+FFFD
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class TrainArgs:
    """The loop: steps, batch, precision and memory/speed switches."""

    max_steps: int | None = None  # optimizer steps; exactly one of max_steps / epochs
    epochs: float | None = None
    micro_batch_size: int = 8  # sequences per forward/backward on one device
    global_batch_tokens: int | None = None  # tokens per optimizer step over all devices (pretraining)
    global_batch_size: int | None = None  # sequences per optimizer step; default micro_batch_size x devices
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler; for GPUs without bf16) | auto
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    recompute: bool = False  # activation checkpointing of every transformer block
    compile: bool = False  # torch.compile the model
    grad_clip: float | None = 1.0  # max global L2 norm of the gradients; null disables clipping
    eval_interval: int = 0  # evaluate on the validation set every N steps (0: only at the end)
    eval_batches: int | None = None  # batches per periodic evaluation; null: the whole set
    log_interval: int = 1  # steps between metric records


@dataclass
class OptimArgs:
    """AdamW and the learning-rate schedule."""

    lr: float = 6e-4
    min_lr: float = 0.0  # floor reached at the end of the decay
    weight_decay: float = 0.1  # applied to matrices and embeddings only; biases and LayerNorm are not decayed
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int | None = None  # linear warmup from 0; or give warmup_rate (fraction of the decay steps)
    warmup_rate: float = 0.0
    decay: str = "cosine"  # cosine | linear | constant
    decay_steps: int | None = None  # steps until min_lr (warmup included); default max_steps

    def warmup_for(self, decay_steps: int) -> int:
        """Warmup steps of a schedule decaying over `decay_steps`; ValueError if the warmup would not fit."""
        # The rate as the decimal it was written as: int(0.29 * 100) is 28 in binary floating point.
        warmup = (self.warmup_steps if self.warmup_steps is not None
                  else math.floor(Fraction(str(self.warmup_rate)) * decay_steps))
        if warmup > decay_steps and self.decay != "constant":
            raise ValueError(f"{warmup} warmup steps are longer than the {decay_steps} decay steps "
                             "(optim.decay_steps, default train.max_steps)")
        return warmup


@dataclass
class CheckpointArgs:
    save_interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int | None = 3  # keep the newest K checkpoints; null keeps all
    resume: str | None = None  # null | auto (newest complete checkpoint in out_dir) | a checkpoint directory
    # Also keep the model of the best whole-set evaluation so far in out_dir/best (as final/ is written).
    keep_best: bool = False


@dataclass
class LoraArgs:
    """LoRA adapters (used when pet_method is lora)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])


@dataclass
class LogArgs:
    tensorboard: bool = True
    plot: bool = True  # loss curve PNG at the end
    progress: bool = True  # tqdm progress bar


@dataclass
class SampleArgs:
    """A text sample generated at the end of a text-generation run."""

    prompt: str | None = None
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 50


@dataclass
class RunConfig:
    task: str = "text_generation"
    pet_method: str = "none"  # none | lora
    out_dir: str = "runs/default"
    seed: int = 1234
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    log: LogArgs = field(default_factory=LogArgs)
    sample: SampleArgs = field(default_factory=SampleArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # torchrun layout (docs/distributed.md)

    def check_training(self, source: str = "config", lines: dict[str, int] | None = None) -> None:
        """What training needs beyond a valid config (evaluation and prediction need neither): a run length and
        an existing checkpoint to resume from, checked before any data is tokenized."""
        t, resume = self.train, self.checkpoint.resume
        if t.max_steps is None and t.epochs is None:
            raise ConfigError(f"{_locate(source, lines or {}, 'train.max_steps')}: give train.max_steps or "
                              "train.epochs (how long to train)")
        if resume not in (None, "auto") and not Path(resume).is_dir():
            raise ConfigError(f"{_locate(source, lines or {}, 'checkpoint.resume')}: no checkpoint directory "
                              f"{resume} (give a checkpoint directory or auto)")

    def validate(self, source: str = "config", lines: dict[str, int] | None = None) -> None:
        """Check values and their combinations; `lines` (key path -> line in `source`) locates the errors."""
        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(f"{_locate(source, lines or {}, key)}: {message}")

        if self.task not in TASKS:
            raise bad("task", f"expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pet_method not in ("none", "lora"):
            raise bad("pet_method", f"expected none or lora, got {self.pet_method!r}")
        if not 0 <= self.seed < 2 ** 32:  # what NumPy's generator takes
            raise bad("seed", f"must lie in [0, 2**32), got {self.seed}")
        for key, value in [("out_dir", self.out_dir), ("model.name", self.model.name),
                           ("model.checkpoint", self.model.checkpoint), ("data.train", self.data.train),
                           ("data.val", self.data.val), ("data.tokenizer", self.data.tokenizer),
                           ("checkpoint.resume", self.checkpoint.resume)]:
            if value is not None and not str(value).strip():  # "" would mean the current directory
                raise bad(key, "must not be empty (null leaves it unset)" if key != "out_dir" else "must not be empty")
        t, o = self.train, self.optim
        if t.max_steps is not None and t.epochs is not None:
            raise bad("train.max_steps", "give only one of train.max_steps and train.epochs")
        if t.global_batch_tokens is not None and t.global_batch_size is not None:
            raise bad("train.global_batch_tokens", "give at most one of global_batch_tokens and global_batch_size")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):  # whether this machine has it is checked at the start
            raise bad("train.device", f"expected auto, cpu, cuda or cuda:N, got {t.device!r}")
        if t.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise bad("train.precision", f"expected fp32, bf16, fp16 or auto, got {t.precision!r}")
        if o.decay not in ("cosine", "linear", "constant"):
            raise bad("optim.decay", f"expected cosine, linear or constant, got {o.decay!r}")
        if not o.lr > 0:
            raise bad("optim.lr", f"must be positive, got {o.lr}")
        if not 0 <= o.min_lr <= o.lr:
            raise bad("optim.min_lr", f"must lie in [0, lr={o.lr}], got {o.min_lr}")
        if not 0 <= o.warmup_rate < 1:
            raise bad("optim.warmup_rate", f"must lie in [0, 1), got {o.warmup_rate}")
        if o.warmup_rate and o.warmup_steps is not None:
            raise bad("optim.warmup_rate", "give only one of optim.warmup_steps and optim.warmup_rate")
        d, lora, sample = self.data, self.lora, self.sample
        from ..data.datasets import CLASSIFICATION_FORMATS, INSTRUCTION_FORMATS
        from ..data.readers import FORMATS

        formats = CLASSIFICATION_FORMATS if self.task == "text_classification" else (*FORMATS, *INSTRUCTION_FORMATS)
        if d.errors not in ("strict", "replace"):
            raise bad("data.errors", f"expected strict or replace, got {d.errors!r}")
        if d.format != "auto" and d.format not in formats:
            raise bad("data.format", f"expected auto or one of {', '.join(formats)} for {self.task}, got "
                                     f"{d.format!r}")
        if d.text_pair_key is not None and self.task != "text_classification":
            raise bad("data.text_pair_key", "sentence pairs are text_classification data")
        for key, value, least in [
                ("train.max_steps", t.max_steps, 1), ("train.micro_batch_size", t.micro_batch_size, 1),
                ("train.global_batch_tokens", t.global_batch_tokens, 1),
                ("train.global_batch_size", t.global_batch_size, 1), ("train.log_interval", t.log_interval, 1),
                ("train.eval_batches", t.eval_batches, 1), ("train.eval_interval", t.eval_interval, 0),
                ("checkpoint.keep_last", self.checkpoint.keep_last, 1),
                ("checkpoint.save_interval", self.checkpoint.save_interval, 0),
                ("optim.warmup_steps", o.warmup_steps, 0), ("optim.decay_steps", o.decay_steps, 1),
                ("data.seq_len", d.seq_len, 1), ("data.max_length", d.max_length, 1),
                ("data.num_workers", d.num_workers, 0), ("data.tokenizer_vocab_size", d.tokenizer_vocab_size, 257),
                ("lora.rank", lora.rank, 1), ("sample.max_new_tokens", sample.max_new_tokens, 1),
                ("sample.top_k", sample.top_k, 0)]:
            if value is not None and value < least:
                raise bad(key, f"must be at least {least}, got {value}")
        for key, value in [("train.grad_clip", t.grad_clip), ("train.epochs", t.epochs),
                           ("optim.eps", o.eps), ("lora.alpha", lora.alpha)]:
            if value is not None and not value > 0:  # a negative grad_clip would flip the gradients' sign
                raise bad(key, f"must be positive{' (null disables clipping)' * (key == 'train.grad_clip')}, "
                               f"got {value}")
        for key, value in [("optim.weight_decay", o.weight_decay), ("sample.temperature", sample.temperature)]:
            if value < 0:
                raise bad(key, f"must not be negative, got {value}")
        if not (lora.target_modules and all(isinstance(m, str) and m for m in lora.target_modules)):
            raise bad("lora.target_modules", f"expected a non-empty list of module names (c_attn, attn.c_proj, c_fc, "
                                             f"mlp.c_proj), got {lora.target_modules!r}")
        for key, value in [("data.val_fraction", d.val_fraction), ("lora.dropout", lora.dropout),
                           ("optim.betas", o.betas[0]), ("optim.betas", o.betas[1])]:
            if not 0 <= value < 1:
                raise bad(key, f"must lie in [0, 1), got {value}")
        if o.decay_steps or t.max_steps:  # known before the data is read (unlike an epochs-long run's)
            try:
                o.warmup_for(o.decay_steps or t.max_steps)
            except ValueError as err:
                raise bad("optim.warmup_steps", str(err)) from None
        try:
            layout = self.parallel.resolve(launched_world_size())  # under torchrun: this job's processes
        except ParallelConfigError as err:  # its message starts with the key: "parallel.data must be ..."
            key = re.match(r"parallel(\.\w+)?", str(err)).group(0)
            raise bad(key, str(err).removeprefix(key).lstrip(" :=")) from None
        if self.pet_method == "lora" and layout.shards_model:
            raise bad("parallel", "LoRA trains a few adapter weights: use data parallelism (DDP), not shard/tensor")
        hints = _model_config_hints()
        for key, value in self.model.config.items():
            if key not in hints:
                raise bad(f"model.config.{key}", f"not a GPT2Config field{_suggest(key, hints, MODEL_PEER_KEYS)}")
            self.model.config[key] = _coerce(value, hints[key], _locate(source, lines or {}, f"model.config.{key}"))
        if self.model.name in PRESETS and self.model.checkpoint is None:  # else the config is read from a directory
            try:
                GPT2Config.from_name(self.model.name, **self.model.config)
            except ValueError as err:  # e.g. n_layer 0, or an n_embd the heads do not divide
                # Blame a field the message names, one from the command line first, else the section.
                named = sorted((f"model.config.{key}" for key in self.model.config
                                if re.search(rf"\b{key}\b", str(err))),
                               key=lambda name: (lines or {}).get(name) != COMMAND_LINE)
                raise bad(named[0] if named else "model.config", str(err)) from None
        # The global batch must split into whole micro-batches on every data-parallel rank (checked again, with the
        # data's window length, once the data is read: global_batch_tokens of a checkpoint's model).
        per_micro = t.micro_batch_size * layout.data_parallel_size
        devices = f" x {layout.data_parallel_size} data-parallel ranks" if layout.data_parallel_size > 1 else ""
        seq_len = d.seq_len or (GPT2Config.from_name(self.model.name, **self.model.config).n_positions
                                if self.model.name in PRESETS and self.model.checkpoint is None else None)
        if self.task != "text_generation" or d.format in INSTRUCTION_FORMATS:
            seq_len = None  # no fixed-length windows: refused with its own reason once the data is read
        for key, value, unit, what in [
                ("train.global_batch_size", t.global_batch_size, per_micro, f"micro_batch_size {t.micro_batch_size}"),
                ("train.global_batch_tokens", t.global_batch_tokens, per_micro * (seq_len or 0),
                 f"micro_batch_size {t.micro_batch_size} x seq_len {seq_len}")]:
            if value is not None and unit and (value < unit or value % unit):
                raise bad(key, f"must be a positive multiple of {what}{devices} = {unit}, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# ---- building from mappings ---------------------------------------------------------------------------------
COMMAND_LINE = 0  # the "line" of a key given as a --section.key override


def _locate(source: str, lines: dict[str, int], key: str) -> str:
    """"file:line: key" for error messages ("file: key" for a key that is not in the file, "command line: --key"
    for an override)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # the key, or a mapping around it, given whole on the command line
        given = ".".join(parts[:n])
        if lines.get(given) == COMMAND_LINE:
            return f"command line: --{key}" if given == key else f"command line: --{given}: {key}"
    line = lines.get(key)
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


def _model_config_hints() -> dict[str, Any]:
    """GPT2Config field -> type, for `model.config` overrides."""
    hints = typing.get_type_hints(GPT2Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(GPT2Config) if f.name != "extra"}


def _plain(value: Any) -> Any:
    """Tuples become lists so the dict is YAML/JSON friendly."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# What other GPT-2 trainers (nanoGPT's train.py, transformers' TrainingArguments and run_clm.py, MindFormers'
# YAML) call a setting, for an unknown key's error: gpt2kit's key, and how to write it when it is not one value.
PEER_KEYS = {
    "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay", "warmup_iters": "optim.warmup_steps",
    "warmup_steps": "optim.warmup_steps", "warmup_ratio": "optim.warmup_rate", "lr_decay_iters": "optim.decay_steps",
    "lr_scheduler_type": "optim.decay", "beta1": "optim.betas", "beta2": "optim.betas", "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas", "adam_epsilon": "optim.eps", "min_lr": "optim.min_lr",
    "max_iters": "train.max_steps", "num_train_epochs": "train.epochs", "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (= micro_batch_size x accumulation x devices)",
    "grad_clip": "train.grad_clip", "max_grad_norm": "train.grad_clip", "gradient_checkpointing": "train.recompute",
    "dtype": "train.precision", "bf16": "train.precision", "fp16": "train.precision", "compile": "train.compile",
    "eval_iters": "train.eval_batches", "eval_steps": "train.eval_interval", "logging_steps": "train.log_interval",
    "log_interval": "train.log_interval", "eval_interval": "train.eval_interval",
    "save_steps": "checkpoint.save_interval", "save_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": "checkpoint.resume", "load_best_model_at_end": "checkpoint.keep_best",
    "always_save_checkpoint": "checkpoint.keep_best (its opposite)", "init_from": "model.name",
    "model_name_or_path": "model.name", "load_checkpoint": "model.checkpoint", "output_dir": "out_dir",
    "block_size": "data.seq_len", "train_file": "data.train", "validation_file": "data.val",
    "validation_split_percentage": "data.val_fraction (a fraction, not a percentage)",
    "dataset_text_field": "data.text_key",
    "n_layer": "model.config.n_layer", "n_head": "model.config.n_head", "n_embd": "model.config.n_embd",
    "dropout": "model.config.resid_pdrop (and embd_pdrop, attn_pdrop)",
}


# The same inside model.config, where nanoGPT's GPTConfig names are model fields.
MODEL_PEER_KEYS = {"block_size": "n_positions", "dropout": "resid_pdrop (and embd_pdrop, attn_pdrop)"}


def _suggest(key: str, choices: typing.Iterable[str], peers: dict[str, str] = PEER_KEYS) -> str:
    if key in peers:
        return f"; gpt2kit's key for it is {peers[key]}"
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is None:
        return getattr(annotation, "__name__", str(annotation))
    return str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; numbers written as strings ("1e-3") become numbers."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 in YAML
        if isinstance(value, str):
            try:
                number = float(value)
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # PyYAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf / .nan in YAML, "inf" on the command line
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # --lora.target_modules c_attn,c_proj
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",")]
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def _build(cls: type, values: Any, prefix: str, lines: dict[str, int], source: str) -> Any:
    def where(key: str) -> str:
        return _locate(source, lines, key)

    if not isinstance(values, dict):
        raise ConfigError(f"{where(prefix.rstrip('.') or '(top level)')}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where(path)}: unknown key{_suggest(str(key), fields)}; "
                              f"expected one of {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{path}.", lines, source)
        else:
            kwargs[key] = _coerce(value, hint, where(path))
    return cls(**kwargs)


def _key_lines(text: str, source: str) -> dict[str, int]:
    """1-based line of every key path ("train.max_steps") in a YAML document, for error messages. A key given
    twice in one mapping is an error (YAML would silently keep the last)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                path = f"{prefix}{key_node.value}"
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise ConfigError(f"{source}:{line}: {path}: given twice (first on line {lines[path]}); "
                                      "merge the two")
                seen.add(key_node.value)
                lines[path] = line
                walk(value_node, f"{path}.")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _text_field(dotted_key: str) -> bool:
    """Whether a key path names a text field of RunConfig (`str` or `str | None`)."""
    cls: Any = RunConfig
    for part in dotted_key.split("."):
        hint = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None:
            return False
        cls = hint
    return cls in (str, str | None)


def set_override(values: dict[str, Any], dotted_key: str, raw_value: str) -> None:
    """Apply one `--a.b.c value` override to a nested dict. The value is parsed as YAML (numbers, lists, null),
    except for a text field, which takes it as typed (YAML would cut "Chapter #1" at its comment, read "ROMEO:" as
    a mapping and 2024-01-01 as a date); null (or ~) still unsets an optional one."""
    if _text_field(dotted_key) and raw_value not in ("null", "Null", "NULL", "~"):
        value: Any = raw_value
    else:
        try:
            value = yaml.safe_load(raw_value) if raw_value != "" else ""
        except yaml.YAMLError:
            value = raw_value
    parts = dotted_key.split(".")
    node = values
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted_key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """`--train.max_steps 10 --optim.lr=3e-4` -> [("train.max_steps", "10"), ("optim.lr", "3e-4")]."""
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            hint = "; a config file is given as --config FILE" if arg.endswith((".yaml", ".yml")) else ""
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value{hint}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key}: missing value")
            value = argv[i + 1]
            if value.startswith("--") and len(value) > 2:  # the value was left out, not a value beginning with --
                raise ConfigError(f"--{key}: missing value (the next argument, {value}, is an option); a value "
                                  f"that starts with -- is written --{key}=VALUE")
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def load_config(path: str | os.PathLike | None = None, overrides: list[tuple[str, str]] | None = None, *,
                training: bool = False, **values: Any) -> RunConfig:
    """Read a YAML run config, apply `--section.key value` overrides and keyword sections, validate (with
    `training`, also what a training run needs: RunConfig.check_training).

    `load_config("configs/gpt2_small.yaml", [("train.max_steps", "10")])`;
    `load_config(train={"max_steps": 10}, model={"name": "gpt2-tiny"})`.
    """
    source = "config"
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory; expected a YAML run config (e.g. configs/tiny_shakespeare.yaml)"
                              ) from None
        except UnicodeDecodeError as err:
            line = path.read_bytes()[:err.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        lines = _key_lines(text, source)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    for key, raw in overrides or []:
        set_override(data, key, raw)
        lines[key] = COMMAND_LINE
    config = _build(RunConfig, data, "", lines, source)
    config.validate(source, lines)
    if training:
        config.check_training(source, lines)
    return config


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so every run records exactly what it ran."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))

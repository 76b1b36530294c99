"""`gpt2kit SUBCOMMAND ...`: each subcommand parses its flags and calls one library function, nothing else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import CheckpointError, convert, load_config
from .config import PRESETS, GPT2Config

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]


def model_summary(name_or_path: str) -> str:
    """Shape and exact parameter count of a preset or an HF directory, computed on the meta device."""
    from .model import GPT2LMHeadModel

    if name_or_path in PRESETS:
        config = GPT2Config.from_name(name_or_path)
    elif Path(name_or_path).is_dir():
        config = load_config(name_or_path)
    else:
        raise ValueError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    with torch.device("meta"):
        n_params = GPT2LMHeadModel(config).num_parameters()
    return "\n".join([
        f"model        {name_or_path}",
        f"layers       {config.n_layer}",
        f"hidden       {config.n_embd}",
        f"heads        {config.n_head} x {config.head_dim}",
        f"mlp          {config.mlp_dim}",
        f"context      {config.n_positions}",
        f"vocab        {config.vocab_size}",
        f"parameters   {n_params:,} ({n_params / 1e6:,.1f}M, LM head tied to wte)",
        f"fp32 / bf16  {n_params * 4 / 2**30:,.2f} GiB / {n_params * 2 / 2**30:,.2f} GiB of weights",
    ])


# ---- info ---------------------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or an HF-format model directory")


def _info(args: argparse.Namespace) -> None:
    print(model_summary(args.model))


# ---- convert ------------------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="HF-format model directory (safetensors or .bin, sharded or not)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors", dest="weights_format")
    p.add_argument("--max-shard-size", default=None, help="shard the weights, e.g. 2GB; default: one file")


def _convert(args: argparse.Namespace) -> None:
    out = convert(args.input, args.output, weights_format=args.weights_format, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")


COMMANDS: dict[str, tuple[str, Command]] = {
    "info": ("print a model's shape and parameter count", (_info_args, _info)),
    "convert": ("convert HF weights between .bin and safetensors, shard or merge", (_convert_args, _convert)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2kit", description="GPT-2 models in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, (add_args, _)) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1][1](args) or 0
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as err:
        # One clear line for bad input; tracebacks are for bugs.
        print(f"gpt2kit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

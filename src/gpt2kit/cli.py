"""`gpt2kit SUBCOMMAND ...`: each subcommand parses its flags and calls one library function, nothing else."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .allocator import ALLOCATORS, restart_with_allocator
from .checkpoint import CheckpointError, convert, named_config
from .config import PRESETS
from .files import check_output_directory

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]


def model_summary(name_or_path: str) -> str:
    """Shape and exact parameter count of a preset or an HF directory, computed on the meta device."""
    from .model import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

    config = named_config(name_or_path)
    architectures = config.extra.get("architectures") or []
    if "GPT2ForSequenceClassification" in architectures:
        architecture, head = GPT2ForSequenceClassification, f"classification head of {config.num_labels} labels"
    elif architectures == ["GPT2Model"]:  # the transformer alone, as transformers' GPT2Model loads it
        architecture, head = GPT2Model, "no LM head"
    else:
        architecture = GPT2LMHeadModel
        head = f"LM head {'tied to wte' if config.tie_word_embeddings else 'separate from wte'}"
    n_params = architecture.count_parameters(config)
    return "\n".join([
        f"model        {name_or_path}",
        f"layers       {config.n_layer}",
        f"hidden       {config.n_embd}",
        f"heads        {config.n_head} x {config.head_dim}",
        f"mlp          {config.mlp_dim}",
        f"context      {config.n_positions}",
        f"vocab        {config.vocab_size}",
        f"parameters   {n_params:,} ({n_params / 1e6:,.1f}M, {head})",
        f"fp32 / bf16  {n_params * 4 / 2**30:,.2f} GiB / {n_params * 2 / 2**30:,.2f} GiB of weights",
    ])


# ---- info ---------------------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or an HF-format model directory")
    p.add_argument("--parallel", default=None, metavar="data=N,shard=N,tensor=N",
                   help="also estimate training memory per GPU for this layout (degrees not named are 1)")
    # Defaults None: given without --parallel they would be silently ignored, so that is an error.
    p.add_argument("--micro-batch-size", type=int, default=None, help="memory estimate: sequences per GPU per "
                   "step (default: 1)")
    p.add_argument("--seq-len", type=int, default=None, help="memory estimate: tokens per sequence (default: context)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="memory estimate: compute dtype (default: bf16)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="memory estimate: activation checkpointing of every block (default: on)")


def _info(args: argparse.Namespace) -> None:
    estimate_flags = {"--micro-batch-size": args.micro_batch_size, "--seq-len": args.seq_len,
                      "--precision": args.precision, "--recompute": args.recompute}
    for flag in ("--micro-batch-size", "--seq-len"):
        if estimate_flags[flag] is not None and estimate_flags[flag] < 1:
            raise ValueError(f"{flag} must be at least 1, got {estimate_flags[flag]}")
    given = [flag for flag, value in estimate_flags.items() if value is not None]
    if args.parallel is None and given:
        raise ValueError(f"{', '.join(given)}: options of the memory estimate; add --parallel (e.g. --parallel data=1)")
    report = None
    if args.parallel is not None:  # before anything is printed: a bad option is the only output
        from .training.memory import memory_report

        report = memory_report(args.model, args.parallel, micro_batch_size=args.micro_batch_size or 1,
                               seq_len=args.seq_len, precision=args.precision or "bf16",
                               recompute=args.recompute is not False)
    print(model_summary(args.model))
    if report is not None:
        print(report)


# ---- convert ------------------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="HF-format model directory (safetensors or .bin, sharded or not)")
    source.add_argument("--from-dcp", metavar="DIR", help="a distributed (DCP) checkpoint written by any number of "
                        "ranks in any layout: merge its model weights into one HF directory, on one process")
    source.add_argument("--from-nanogpt", metavar="CKPT", help="a nanoGPT checkpoint (out/ckpt.pt, or its out_dir): "
                        "its model as an HF directory (GPT-2's tokenizer files included for GPT-2's vocabulary)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors", dest="weights_format")
    p.add_argument("--max-shard-size", default=None, help="shard the weights, e.g. 2GB; default: one file")
    p.add_argument("--config", default=None, help="--from-dcp: config.json or model directory describing the "
                   "model (default: the config.json beside the shards or in the parent directory)")


def _convert(args: argparse.Namespace) -> None:
    if args.input and Path(args.output).resolve() == Path(args.input).resolve():  # before: "pass --overwrite"
        raise ValueError("--output must differ from --input")
    check_output_directory(args.output, overwrite=args.overwrite)
    if args.config is not None and not args.from_dcp:
        raise ValueError("--config applies to --from-dcp only")
    source_flag = "--from-dcp" if args.from_dcp else "--from-nanogpt" if args.from_nanogpt else None
    if source_flag and args.weights_format != "safetensors":
        raise ValueError(f"{source_flag} writes safetensors; convert the result with --input to get .bin files")
    if args.from_dcp:
        from .training.distributed_checkpoint import dcp_to_pretrained

        out = dcp_to_pretrained(args.from_dcp, args.output, config=args.config, max_shard_size=args.max_shard_size)
    elif args.from_nanogpt:
        from .nanogpt import nanogpt_to_pretrained

        out = nanogpt_to_pretrained(args.from_nanogpt, args.output, max_shard_size=args.max_shard_size)
    else:
        out = convert(args.input, args.output, weights_format=args.weights_format,
                      max_shard_size=args.max_shard_size)
    print(f"wrote {out}")


# ---- generate / chat ----------------------------------------------------------------------------------------
def _model_loading_args(p: argparse.ArgumentParser, model_help: str = "HF-format model directory, local HF "
                        "cache name, or a preset with --random-init") -> None:
    """Flags of every command that loads a model (generate, chat, eval, serve)."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--tokenizer", default=None, help="tokenizer file/dir or 'gpt2'; default: the model directory's "
                   "vocabulary files, else GPT-2's")
    p.add_argument("--random-init", action="store_true", help="random weights of the preset named by --model "
                   "(seeded; for smoke tests and benchmarks)")
    p.add_argument("--dtype", default=None, help="cast weights: float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8: weight-only int8 projections and LM "
                   "head, multiplied in bf16 (batch-1 decoding on a CPU about 2x transformers' float32, 3x or more "
                   "with --compile)")
    p.add_argument("--pack-weights", action="store_true", help="keep the float weights in oneDNN's packed layout "
                   "(CPU, same precision; up to 1.7x faster float32 decoding where PyTorch multiplies float32 with "
                   "MKL, nothing on AMD CPUs with AVX-512, which already use oneDNN)")
    p.add_argument("--device", default="cpu")


def _model_and_sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate and chat; unset ones keep the library's defaults."""
    _model_loading_args(p)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample (--do-sample) or take the most likely token (--no-do-sample)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float, help="sampling: keep tokens at least this times as likely as the top one")
    p.add_argument("--typical-p", type=float, help="sampling: locally typical sampling's probability mass")
    p.add_argument("--epsilon-cutoff", type=float, help="sampling: drop tokens less likely than this")
    p.add_argument("--eta-cutoff", type=float, help="sampling: eta sampling's epsilon (an entropy-scaled cutoff)")
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--no-repeat-ngram-size", type=int, metavar="N", help="never repeat an N-gram (greedy too)")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI's, in [-2, 2]: lowers a token's score by this "
                   "times the number of times it was generated")
    p.add_argument("--presence-penalty", type=float, help="OpenAI's, in [-2, 2]: lowers the score of every token "
                   "generated so far by this")
    p.add_argument("--logit-bias", type=_logit_bias, metavar="ID=BIAS[,ID=BIAS...]", help="add BIAS (-100 to "
                   "100) to token ID's score every step, e.g. 50256=-100 never ends at <|endoftext|>")
    p.add_argument("--stop", action="append", help="stop string (repeatable); the text ends before it")
    p.add_argument("--seed", type=int)
    p.add_argument("--prompt-lookup-num-tokens", type=int, metavar="N", help="speculative decoding by prompt lookup: "
                   "guess N tokens from where the last tokens occurred before, check them in one pass (output "
                   "that copies its input comes faster; the same text in float32)")
    p.add_argument("--assistant-model", metavar="DIR", help="speculative decoding: a smaller model with the same "
                   "tokenizer guesses ahead, the model checks its guesses in one pass (the same text in float32)")
    p.add_argument("--compile", action="store_true", default=None, help="decode through torch.compile: on a CPU "
                   "with the weights frozen into the step and autotuned matrix kernels (about 2.5x faster; "
                   "combine with --quantize int8 for the fastest), CUDA graphs on a GPU. The first call compiles "
                   "for about a minute")


_SAMPLING_FLAGS = ("compile", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                   "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size",
                   "frequency_penalty", "presence_penalty", "logit_bias", "stop", "seed", "num_return_sequences",
                   "num_beams", "length_penalty", "prompt_lookup_num_tokens")


def _logit_bias(text: str) -> dict[int, float]:
    from .generation import parse_logit_bias

    try:
        return parse_logit_bias(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _check_unused_flags(args: argparse.Namespace, samples_by_default: bool) -> None:
    """Sampling flags without sampling, or a length penalty without beams, would change nothing: say so."""
    sampling = args.do_sample if args.do_sample is not None else samples_by_default
    unused = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p", "min_p", "typical_p",
                                                          "epsilon_cutoff", "eta_cutoff")
              if getattr(args, name) is not None and not (name == "temperature" and args.temperature == 0)]
    if unused and not sampling:
        raise ValueError(f"{', '.join(unused)} only {'apply' if len(unused) > 1 else 'applies'} when sampling; add "
                         "--do-sample (without it each step takes the most likely token)")
    if getattr(args, "length_penalty", None) is not None and (args.num_beams or 1) <= 1:
        raise ValueError("--length-penalty only applies to beam search; add --num-beams N (N > 1)")


def _loading_and_sampling(args: argparse.Namespace) -> dict:
    options = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k, None) is not None}
    return dict(tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, random_init=args.random_init,
                quantize=args.quantize, pack_weights=args.pack_weights, assistant_model=args.assistant_model,
                **options)


def _generate_args(p: argparse.ArgumentParser) -> None:
    _model_and_sampling_args(p)
    p.add_argument("--prompt", default=None, help="text to continue; default: read standard input")
    p.add_argument("--num-return-sequences", type=int)
    p.add_argument("--num-beams", type=int, help="beam search with this many beams (deterministic; the text is "
                   "printed when done, not streamed)")
    p.add_argument("--length-penalty", type=float, help="beam search: scores are log-probability / length ** this")
    p.add_argument("--completion-only", action="store_true", help="print only the generated continuation")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="onnx: run a directory written "
                   "by `gpt2kit export onnx` (given as --model) in onnxruntime")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="T", help="shard the model over T processes "
                   "launched with `torchrun --nproc-per-node T -m gpt2kit generate ...` (rank 0 prints)")


def _generate(args: argparse.Namespace) -> None:
    from .pipeline import generate_text

    if args.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be at least 1 (1: one process), got {args.tensor_parallel}")
    _check_unused_flags(args, samples_by_default=False)
    if args.prompt is None and (sys.stdin is None or sys.stdin.isatty()):
        raise ValueError("give --prompt TEXT or pipe the prompt on standard input")
    # Under torchrun only rank 0 reads standard input (the ranks share it); it sends the prompt to the others.
    reads_stdin = args.tensor_parallel == 1 or os.environ.get("RANK", "0") == "0"
    # One trailing newline is the line's end (echo, a file's last line), not part of the prompt.
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().removesuffix("\n") if reads_stdin else None
    if args.tensor_parallel > 1:
        from .training.parallel import generate_tensor_parallel

        options = _loading_and_sampling(args)
        if any(options.pop(k, None) for k in ("random_init", "quantize", "pack_weights", "compile",
                                              "assistant_model", "prompt_lookup_num_tokens")) or \
                args.backend != "torch":
            raise ValueError("--tensor-parallel loads a model directory with the torch backend, unquantized, "
                             "uncompiled and without speculative decoding")
        texts = generate_tensor_parallel(args.model, prompt, tensor_parallel=args.tensor_parallel,
                                         return_full_text=not args.completion_only, stream_to=sys.stdout, **options)
        if texts is None:
            return  # not rank 0: rank 0 prints
    else:
        texts = generate_text(args.model, prompt, return_full_text=not args.completion_only, stream_to=sys.stdout,
                              backend=args.backend, **_loading_and_sampling(args))
    if len(texts) == 1:
        print()  # the text was streamed
    else:
        print("\n\n".join(f"--- sequence {i} ---\n{text}" for i, text in enumerate(texts, 1)))


def _chat_args(p: argparse.ArgumentParser) -> None:
    _model_and_sampling_args(p)


def _chat(args: argparse.Namespace) -> None:
    from .chat import chat

    _check_unused_flags(args, samples_by_default=True)  # chat samples unless --no-do-sample
    chat(args.model, **_loading_and_sampling(args))


# ---- train / finetune / lora -------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (see configs/); any key can be overridden "
                   "with --section.key value, e.g. --train.max_steps 100 --optim.lr 3e-4")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint in out_dir (auto) or from PATH")
    p.set_defaults(accepts_overrides=True)


def _train(args: argparse.Namespace) -> int:
    from .training import TrainingDiverged, run
    from .training.config import parse_overrides

    try:
        run(args.command, args.config, parse_overrides(args.overrides), resume=args.resume)
    except TrainingDiverged as err:
        print(f"gpt2kit {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


def _add_action(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """The parser of a two-level command's second word (`lora merge`), with its own usage for its own mistakes."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(command_parser=parser)
    return parser


def _lora_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    merge = _add_action(sub, "merge", "fold LoRA adapters into their base model; write a plain model dir")
    merge.add_argument("--adapter", required=True, help="adapter directory written by a LoRA finetune")
    merge.add_argument("--output", required=True, help="model directory to write")
    merge.add_argument("--base", default=None, help="base model directory; default: the one the adapter names")
    merge.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty")


def _lora(args: argparse.Namespace) -> None:
    from .training.lora import merge_lora

    print(f"wrote {merge_lora(args.adapter, args.output, base_model=args.base, overwrite=args.overwrite)}")


# ---- preprocess / tokenizer ---------------------------------------------------------------------------------
def _input_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="files, directories (searched recursively) or globs; .txt .tokens .raw .jsonl, or .zst of them")
    p.add_argument("--format", choices=["auto", "text", "paragraphs", "wikitext", "jsonl"], default="auto",
                   help="what a document is: a file (text), a blank-line separated block (paragraphs), an article "
                   "(wikitext), a JSON line (jsonl); auto: by file suffix")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8: stop with file and byte offset (strict) or substitute U+FFFD (replace)")


def _preprocess_args(p: argparse.ArgumentParser) -> None:
    from .data.preprocess import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_TOKENS

    _input_format_args(p)
    p.add_argument("--output", required=True, help="directory to write (appears only when complete)")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (bundled) or a tokenizer file/directory")
    p.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the EOS token (default: on)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: available CPUs)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents for the 'val' split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing preprocess output")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="input bytes per work item")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")


def _preprocess(args: argparse.Namespace) -> None:
    from .data.preprocess import preprocess

    preprocess(args.input, args.output, format=args.format, text_key=args.text_key, tokenizer=args.tokenizer,
               append_eos=args.append_eos, workers=args.workers, val_fraction=args.val_fraction, errors=args.errors,
               overwrite=args.overwrite, chunk_bytes=args.chunk_bytes, shard_tokens=args.shard_tokens)


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = _add_action(sub, "train", "train a byte-level BPE vocabulary on a corpus; writes DIR/tokenizer.json")
    _input_format_args(train)
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, incl. 256 bytes")
    train.add_argument("--output", required=True, help="directory for tokenizer.json")
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to be merged")
    train.add_argument("--overwrite", action="store_true", help="replace a vocabulary --output already holds")


def _tokenizer(args: argparse.Namespace) -> None:
    from .data.tokenizer_training import train_tokenizer
    from .tokenizer import has_tokenizer_files

    if has_tokenizer_files(args.output) and not args.overwrite:  # e.g. a model's, whose ids it decides
        raise ValueError(f"--output {args.output}: already holds a vocabulary; pass --overwrite to replace it")
    train_tokenizer(args.input, args.output, vocab_size=args.vocab_size, format=args.format, text_key=args.text_key,
                    min_frequency=args.min_frequency, errors=args.errors)


# ---- eval ---------------------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_loading_args(p, "HF-format model directory (a finetuned classifier for --task classification), local "
                        "HF cache name, or a preset with --random-init")
    p.add_argument("--task", required=True, choices=["wikitext", "perplexity", "lambada", "classification"],
                   help="wikitext: perplexity of WikiText articles (detokenized); perplexity: of any text, jsonl "
                   "or WikiText file; lambada: last-word accuracy; classification: accuracy, MCC, per class")
    p.add_argument("--data", required=True, help="data file (e.g. wiki.test.raw, lambada_test.jsonl, dev.tsv)")
    p.add_argument("--max-length", type=int, default=None, help="window length in tokens (default: the model's "
                   "context)")
    p.add_argument("--stride", type=int, default=None, help="perplexity: scored tokens per window after the first "
                   "(default: max length = disjoint windows; smaller = overlapping windows, more context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows / examples per forward pass (the numbers "
                   "do not depend on it)")
    p.add_argument("--output", default=None, help="write the JSON report here (replacing an earlier report)")
    p.add_argument("--format", default="auto", help="perplexity: auto|wikitext|text|jsonl; classification: "
                   "auto|sst2|cola|agnews|csv (default: from the file)")
    p.add_argument("--detokenize", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the WikiText detokenizer (default: on for WikiText files only)")
    p.add_argument("--stop-word-filter", action="store_true", help="lambada: also report acc_stop_word_filter")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N documents / passages / examples")
    p.add_argument("--text-key", default=None, help="perplexity/wikitext: a .jsonl document's field (default text); "
                   "classification: the csv/tsv text column (default: text, sentence, review, content or document)")
    p.add_argument("--text-pair-key", default=None, help="classification: the column of a sentence pair's second "
                   "sentence (GLUE's sentence2), with --text-key naming the first")
    p.add_argument("--compile", action="store_true", help="wikitext/perplexity/lambada: the log-sum-exp over the "
                   "vocabulary through torch.compile (compiles 3-12 s first; pays off on long texts)")


def _eval(args: argparse.Namespace) -> None:
    from .evaluation import evaluate, format_report

    report = evaluate(args.task, args.model, args.data, tokenizer=args.tokenizer, max_length=args.max_length,
                      stride=args.stride, batch_size=args.batch_size, format=args.format,
                      detokenize=args.detokenize, stop_word_filter=args.stop_word_filter, limit=args.limit,
                      output=args.output, device=args.device, dtype=args.dtype, random_init=args.random_init,
                      quantize=args.quantize, pack_weights=args.pack_weights, compile=args.compile,
                      text_key=args.text_key, text_pair_key=args.text_pair_key)
    print(format_report(report))
    if args.output:
        print(f"wrote {args.output}")


# ---- serve / export -----------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    from .serving.config import ServerConfig

    defaults = ServerConfig()
    _model_loading_args(p)
    p.add_argument("--host", default=defaults.host, help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=defaults.port, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require this key on every route but /health (default: the "
                   "GPT2KIT_API_KEY environment variable; prefer it, command lines are visible to other users)")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the --model directory's name)")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="sequences decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="requests waiting for a batch slot before 503 (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                   help="largest request body (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: context - 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens (default: context - 1)")
    p.add_argument("--max-choices", type=int, default=defaults.max_choices,
                   help="prompts x n in one request (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _serve(args: argparse.Namespace) -> None:
    from .serving import serve

    serve(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, random_init=args.random_init,
          quantize=args.quantize, pack_weights=args.pack_weights, log_level=args.log_level, host=args.host,
          port=args.port, api_key=args.api_key,
          model_name=args.model_name, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
          max_choices=args.max_choices)


def _export_args(p: argparse.ArgumentParser) -> None:
    from .export import DEFAULT_OPSET

    sub = p.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    onnx = _add_action(sub, "onnx", "prefill + decode graphs with KV cache inputs/outputs, for onnxruntime")
    onnx.add_argument("--model", required=True, help="HF-format model directory or local HF cache name")
    onnx.add_argument("--output", required=True, help="directory to write (appears only when complete)")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (default: %(default)s)")
    onnx.add_argument("--tokenizer", default=None, help="tokenizer file or directory to save in (default: the "
                      "model's)")
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    gguf = _add_action(sub, "gguf", "one GGUF file (weights + tokenizer) for llama.cpp, Ollama, LM Studio")
    gguf.add_argument("--model", required=True, help="HF-format model directory or local HF cache name")
    gguf.add_argument("--output", required=True, help="file to write, e.g. model.gguf (appears only when complete)")
    gguf.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16",
                      help="matrices in float32, float16 or llama.cpp's 8-bit q8_0 (default: %(default)s)")
    gguf.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the model's)")
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _export(args: argparse.Namespace) -> None:
    if args.export_format == "gguf":
        from .gguf import export_gguf

        out = export_gguf(args.model, args.output, tokenizer=args.tokenizer, dtype=args.dtype,
                          overwrite=args.overwrite)
    else:
        from .export import export_onnx

        out = export_onnx(args.model, args.output, opset=args.opset, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote {out}")


COMMANDS: dict[str, tuple[str, Command]] = {
    "info": ("print a model's shape and parameter count", (_info_args, _info)),
    "convert": ("convert HF weights between .bin and safetensors, shard or merge", (_convert_args, _convert)),
    "generate": ("continue a prompt (streamed), greedy, sampled or by beam search", (_generate_args, _generate)),
    "chat": ("interactive chat that streams replies; /reset, /set NAME VALUE, /quit", (_chat_args, _chat)),
    "train": ("pretrain from a YAML config: gpt2kit train --config FILE [--section.key value]",
              (_train_args, _train)),
    "finetune": ("finetune (full, LoRA, text classification) from pretrained weights and a YAML config",
                 (_train_args, _train)),
    "lora": ("LoRA adapter tools: merge", (_lora_args, _lora)),
    "preprocess": ("tokenize text/WikiText/JSONL(.zst) corpora into token shards", (_preprocess_args, _preprocess)),
    "tokenizer": ("tokenizer tools: train (byte-level BPE for a new corpus or language)",
                  (_tokenizer_args, _tokenizer)),
    "eval": ("evaluate: WikiText/text perplexity, LAMBADA accuracy, classification accuracy; JSON report",
             (_eval_args, _eval)),
    "serve": ("OpenAI-compatible HTTP server (completions, chat, streaming, batching) + playground page at /",
              (_serve_args, _serve)),
    "export": ("export a model: onnx (prefill + decode graphs with KV cache), gguf (llama.cpp)",
               (_export_args, _export)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2kit", description="GPT-2 models in plain PyTorch.")
    parser.add_argument("--allocator", choices=("system", *ALLOCATORS), default="system",
                        help="run under tcmalloc or jemalloc instead of the system's malloc (Linux; the command "
                             "restarts itself with the library preloaded): faster CPU training")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, (add_args, _)) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(command_parser=command)  # its own usage for its own mistakes
        add_args(command)
    return parser


def out_of_memory_message(err: BaseException) -> str | None:
    """One line for an allocation the machine could not make (a model or batch too large for its memory, e.g.
    n_positions 10**8), or None for any other error. PyTorch's CPU allocator raises a RuntimeError of a C++
    assertion; its CUDA one raises torch.OutOfMemoryError."""
    import re

    import torch

    if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(err):
        return None
    wanted = re.search(r"allocate (\d+) bytes", str(err))
    size = f" (an allocation of {int(wanted.group(1)) / 1e9:.1f} GB)" if wanted else ""
    return (f"out of memory{size}: a smaller model, batch or sequence length, or a machine with more memory, "
            "is needed")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Commands that take --section.key value config overrides receive the flags argparse does not know.
    args, args.overrides = parser.parse_known_args(argv)
    if args.overrides and not getattr(args, "accepts_overrides", False):
        args.command_parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
    try:
        if args.allocator != "system":
            restart_with_allocator(args.allocator, sys.argv[1:] if argv is None else argv)
        status = COMMANDS[args.command][1][1](args) or 0
        sys.stdout.flush()  # output still buffered for a pipe meets a closed one here, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`gpt2kit generate ... | head`): stop quietly, as a killed writer does, and keep
        # the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (CheckpointError, ValueError, FileNotFoundError, OSError, ImportError) as err:
        # One clear line for bad input or a missing optional package; tracebacks are for bugs.
        print(f"gpt2kit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if (message := out_of_memory_message(err)) is None:
            raise
        print(f"gpt2kit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed of gpt2kit's generate against transformers' generate() on identical random weights.

Measures time to first token (prefill + first sampled token) and decode tokens/s (tokens after the first,
over all rows) for greedy decoding, per shape x dtype x batch size, and prints ratios that read the same way
for both: above 1, gpt2kit is faster (tokens/s over transformers', transformers' TTFT over ours). Weights are
cast to the dtype (no autocast); `int8` runs gpt2kit's weight-only int8 model and `fp32-packed` its float32
weights in oneDNN's packed layout (gpt2kit.quantization), both against transformers in float32, the
comparison the project's targets are stated in. A `-compiled` suffix (`int8-compiled`, `fp32-compiled`,
`bf16-compiled`) decodes through the compiled step (`generate --compile`); its compilation happens in the
untimed warm-up. Both sides generate exactly --new-tokens tokens (EOS disabled); their tokens are compared
(always equal in float32). On a CUDA GPU (the default when there is one, see --device) the clocks wait for the
GPU, and the CPU-only formats (int8's kernel, oneDNN packing) are refused.

    python benchmarks/bench_generate.py                       # tiny shape, about a minute
    python benchmarks/bench_generate.py --shapes gpt2,tiny    # adds GPT-2 small (124M), several minutes
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.generation import token_generator
from gpt2kit.quantization import long_input_dtype, pack_weights, quantize_int8
from gpt2kit.training.logging import forward_flops, synchronize

if __package__:
    from .devices import default_device
else:  # run as a script: benchmarks/ is on sys.path
    from devices import default_device

SHAPES = {
    "tiny": GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=50257),
    "gpt2": GPT2Config.from_name("gpt2"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "fp32-packed": torch.float32}
CPU_ONLY = ("int8", "fp32-packed")  # their kernels are CPU kernels (on a GPU int8 would only dequantize)


class _Clock(BaseStreamer):
    """transformers calls put() with the prompt, then with each new token: the second call is the first token."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls, self.first = device, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            synchronize(self.device)
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def split_compiled(dtype_name: str) -> tuple[str, bool]:
    """("int8", True) for "int8-compiled"; (dtype_name, False) without the suffix."""
    base = dtype_name.removesuffix("-compiled")
    if base not in DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}: one of {', '.join(DTYPES)}, optionally with -compiled")
    return base, base != dtype_name


def time_ours(model, ids, new_tokens, compile=False, **options):
    synchronize(ids.device)
    start = time.perf_counter()
    run = token_generator(model, ids, max_new_tokens=new_tokens, eos_token_id=[], compile=compile, **options)
    first = None
    for _ in run:
        if first is None:
            synchronize(ids.device)
            first = time.perf_counter()
    synchronize(ids.device)
    end = time.perf_counter()
    return first - start, end - first, run.sequences()


def time_hf(model, ids, new_tokens, **options):
    clock = _Clock(ids.device)
    synchronize(ids.device)
    start = time.perf_counter()
    # No end-of-text token, as gpt2kit's side runs (eos_token_id=[]): every step picks the same argmax, with no
    # logits processor either side (min_new_tokens would ban the token on this side only).
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, streamer=clock, **options)
    synchronize(ids.device)
    end = time.perf_counter()
    return clock.first - start, end - clock.first, out


def timing_header(peer: str) -> str:
    """The TTFT and decode columns of a decode table against `peer` (see timing_cells)."""
    return f"{'TTFT ms ours':>12} {peer:>8} {'ratio':>6} | {'decode tok/s ours':>17} {peer:>8} {'ratio':>6}"


def timing_cells(r: dict) -> str:
    """A decode row's TTFT and tokens/s, ours then the peer's, each with its ratio (> 1: gpt2kit faster)."""
    return (f"{r['ours_ttft_s'] * 1e3:>12.1f} {r['peer_ttft_s'] * 1e3:>8.1f} {r['ttft_ratio']:>6.2f} | "
            f"{r['ours_tok_s']:>17.1f} {r['peer_tok_s']:>8.1f} {r['ratio']:>6.2f}")


def random_models(config: GPT2Config, device: torch.device | str = "cpu"
                  ) -> tuple[transformers.GPT2LMHeadModel, GPT2LMHeadModel]:
    """A random transformers GPT-2 (seed 0) and the same weights loaded into gpt2kit through an HF directory,
    both on `device`."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    hf_fp32 = transformers.GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_fp32.save_pretrained(Path(tmp) / "m")
        return hf_fp32.to(device), GPT2LMHeadModel.from_pretrained(Path(tmp) / "m").to(device)


def ours_in(dtype_name: str, ours_fp32: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """The float32 model in one of DTYPES' formats; other formats are made from a copy, so every format starts
    from the same weights."""
    if dtype_name == "fp32":
        return ours_fp32
    model = copy.deepcopy(ours_fp32)
    if dtype_name == "int8":
        return quantize_int8(model)
    if dtype_name == "fp32-packed":
        return pack_weights(model)
    return model.to(DTYPES[dtype_name])


def best_of_interleaved(repeats, ours, hf, ids, new_tokens, compiled=False, **options):
    """Alternate the two sides so that load from other processes hits both alike; keep each side's best."""
    runs = {"ours": [], "hf": []}
    for _ in range(repeats):
        runs["ours"].append(time_ours(ours, ids, new_tokens, compiled, **options))
        runs["hf"].append(time_hf(hf, ids, new_tokens, **options))
    return [(min(r[0] for r in side), min(r[1] for r in side), side[0][2]) for side in runs.values()]


def kv_cache_bytes(config: GPT2Config, positions: int, itemsize: int) -> int:
    """Bytes of keys and values one row's decode step reads from a cache of `positions` (batch 1: beside the
    weights, the rest of the bandwidth bound; 8 % of it for GPT-2 small after a 512-token prompt)."""
    return 2 * config.n_layer * positions * config.n_embd * itemsize


def run(shapes: str = "tiny", dtypes: str = "fp32,fp32-packed,int8", batch_sizes: str = "1,8", prompt_len: int = 32,
        new_tokens: int = 64, repeats: int = 3, device: torch.device | str | None = None,
        prompt_lookup: int | None = None) -> list[dict]:
    """One row per shape x dtype x batch: TTFT and decode tokens/s of both sides, greedy tokens compared.
    `device` defaults to the GPU when there is one. With `prompt_lookup`, both sides decode speculatively by
    prompt lookup (transformers' prompt_lookup_num_tokens, batch 1) from a prompt whose second half repeats its
    first, as a text the output copies from would."""
    options = {} if prompt_lookup is None else {"prompt_lookup_num_tokens": prompt_lookup}
    transformers.logging.set_verbosity_error()
    device = torch.device(device) if device else default_device()
    if device.type != "cpu":
        cpu_only = [d for d in dtypes.split(",") if split_compiled(d)[0] in CPU_ONLY]
        if cpu_only:
            raise ValueError(f"{', '.join(cpu_only)}: CPU-only formats, not measured on {device}")
    rows = []
    for shape in shapes.split(","):
        config = SHAPES[shape]
        hf_fp32, ours_fp32 = random_models(config, device)
        n_params = ours_fp32.num_parameters()  # weights read per decode step: the bandwidth bound
        for dtype_name in dtypes.split(","):
            base, compiled = split_compiled(dtype_name)
            dtype = DTYPES[base]
            ours = ours_in(base, ours_fp32)
            peer_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"  # int8 and packed run against fp32
            product = long_input_dtype(device) if base == "int8" else dtype
            hf = hf_fp32 if peer_dtype == "fp32" else copy.deepcopy(hf_fp32).to(dtype)
            for batch in map(int, batch_sizes.split(",")):
                ids = torch.randint(0, config.vocab_size, (batch, prompt_len),
                                    generator=torch.Generator().manual_seed(batch)).to(device)
                if prompt_lookup is not None:
                    ids[:, prompt_len // 2:] = ids[:, :prompt_len - prompt_len // 2]
                # Warm-up; a compiled step is compiled for its cache length, so it warms up at the timed length.
                time_ours(ours, ids, new_tokens if compiled else 4, compiled, **options)
                time_hf(hf, ids, 4, **options)
                (o_ttft, o_decode, o_out), (h_ttft, h_decode, h_out) = best_of_interleaved(
                    repeats, ours, hf, ids, new_tokens, compiled, **options)
                decoded = batch * (new_tokens - 1)
                rows.append({"device": device.type, "shape": shape, "dtype": dtype_name, "peer_dtype": peer_dtype,
                             "batch": batch, "prompt_len": prompt_len, "prompt_lookup": prompt_lookup,
                             "new_tokens": new_tokens, "ours_ttft_s": o_ttft, "peer_ttft_s": h_ttft,
                             "ours_tok_s": decoded / o_decode, "peer_tok_s": decoded / h_decode,
                             "ratio": h_decode / o_decode, "ttft_ratio": h_ttft / o_ttft,
                             "weight_bytes": n_params * dtype.itemsize,
                             "cache_bytes": kv_cache_bytes(config, prompt_len + new_tokens // 2,
                                                           2 if base == "bf16" else 4),
                             # Time to first token is bound by the prefill's arithmetic: the prompt through the
                             # blocks, the LM head at each row's last position, in the matmuls' dtype (int8's
                             # prefill of more than 16 rows: bf16, or float32 on a CPU without bf16).
                             "prefill_flops": forward_flops(config, batch * prompt_len, batch,
                                                            batch * prompt_len * (prompt_len + 1) / 2),
                             "compute_dtype": "fp32" if product == torch.float32 else "bf16",
                             "same_tokens": bool(torch.equal(o_out, h_out))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,fp32-packed,int8",
                        help=f"comma-separated, from {', '.join(DTYPES)}, each optionally with -compiled")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-lookup", type=int, default=None, metavar="N", help="both sides decode "
                        "speculatively, guessing N tokens by prompt lookup (batch 1; the prompt repeats itself)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    header = f"{'shape':<6} {'dtype':<13} {'batch':>5} | {timing_header('hf')} | same tokens"
    print(header)
    print("-" * len(header))
    for r in run(args.shapes, args.dtypes, args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats,
                 args.device, args.prompt_lookup):
        same = "yes" if r["same_tokens"] else ("no" if r["dtype"] == "fp32" else f"no ({r['dtype']})")
        print(f"{r['shape']:<6} {r['dtype']:<13} {r['batch']:>5} | {timing_cells(r)} | {same}")


if __name__ == "__main__":
    main()

"""Decode speed of gpt2kit against llama.cpp (through llama-cpp-python) on identical random weights.

Builds the same random GPT-2 model as bench_generate.py (seed 0), writes it as GGUF files with gpt2kit's exporter
(`gpt2kit export gguf`: f32 and f16; q8_0 made by llama.cpp's own quantizer from the f32 file), and times
batch-1 greedy decoding: time to first token (prefill + first token) and tokens/s after the first, best of
--repeats runs after a warm-up, the sides alternating. Pairs: gpt2kit's weight-only int8 model, eager and through
the compiled decode step (`generate --compile`), against llama.cpp q8_0 (transformers in float32 runs beside the
eager one as the reference the project's targets are stated in), gpt2kit bf16 (eager and compiled) against
llama.cpp f16, and gpt2kit fp32 (oneDNN-packed, and compiled) against llama.cpp f32. Compiling happens in the
untimed warm-up. Each row records whether both sides produced the same tokens and how far llama.cpp's logits
after the prompt are from gpt2kit's float32 logits.

llama.cpp is an optional peer: install it with (a source build of 5-7 minutes; the flags keep AMX code out,
which crashed q8_0 with "Illegal instruction" on some CPUs)

    CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" pip install llama-cpp-python gguf

    python benchmarks/bench_llamacpp.py                   # GPT-2 small (124M), a few minutes
    python benchmarks/bench_llamacpp.py --shape tiny --kinds q8_0
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import torch

from gpt2kit.gguf import export_gguf

if __package__:
    from . import bench_generate
else:  # run as a script: benchmarks/ is on sys.path
    import bench_generate

INSTALL = ("CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
           "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" pip install llama-cpp-python gguf")
# llama.cpp file kind -> the gpt2kit formats it is compared with (bench_generate's names).
PAIRS = {"q8_0": ("int8", "int8-compiled"), "f16": ("bf16", "bf16-compiled"), "f32": ("fp32-packed", "fp32-compiled")}

def missing() -> list[str]:
    """The optional packages this benchmark needs that are not importable."""
    return [name for name in ("llama_cpp", "gguf") if importlib.util.find_spec(name) is None]


def quantize_gguf(source: str | Path, target: str | Path, kind: str = "q8_0") -> Path:
    """llama.cpp's quantizer (what its llama-quantize tool runs) with default parameters."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # not a line per tensor
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    return Path(target)


def load_llama(path: Path, n_ctx: int):
    import llama_cpp

    threads = torch.get_num_threads()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=False, verbose=False)


def _last_logits(llm):
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def time_llama(llm, prompt: list[int], new_tokens: int):
    """Greedy decoding through Llama.eval (prefill, then one token per call), argmax of the last logits."""
    start = time.perf_counter()
    llm.reset()  # the KV cache is reused from position 0
    llm.eval(prompt)
    token = int(_last_logits(llm).argmax())
    first = time.perf_counter()
    out = [token]
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(_last_logits(llm).argmax())
        out.append(token)
    end = time.perf_counter()
    return first - start, end - first, out


def _best(runs):
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]


def run(shape: str = "gpt2", kinds: str = "q8_0,f16,f32", prompt_len: int = 32, new_tokens: int = 64,
        repeats: int = 3, transformers_fp32: bool = True, gguf_dir: str | Path | None = None) -> list[dict]:
    """One row per llama.cpp file kind and gpt2kit format (PAIRS[kind]) at batch 1: TTFT and decode tokens/s of
    both, tokens compared; the eager int8 row also times transformers fp32 beside them (hf_* fields)."""
    config = bench_generate.SHAPES[shape]
    hf_fp32, ours_fp32 = bench_generate.random_models(config)  # the model of bench_generate.run
    ids = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = ids[0].tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = ours_fp32.num_parameters()
        with torch.no_grad():
            reference = ours_fp32(ids).logits[0, -1].numpy()
        files = Path(gguf_dir) if gguf_dir else Path(tmp)
        files.mkdir(parents=True, exist_ok=True)
        paths = {"f32": export_gguf(ours_fp32, files / f"{shape}-f32.gguf", dtype="f32", overwrite=True)}
        for kind in kinds.split(","):
            if kind == "f16":
                paths[kind] = export_gguf(ours_fp32, files / f"{shape}-f16.gguf", dtype="f16", overwrite=True)
            elif kind != "f32":
                paths[kind] = quantize_gguf(paths["f32"], files / f"{shape}-{kind}.gguf", kind)
        for kind in kinds.split(","):
            llm = load_llama(paths[kind], n_ctx=config.n_positions)
            llm.eval(prompt)
            logits_diff = float(abs(_last_logits(llm) - reference).max())
            for ours_dtype in PAIRS[kind]:
                base, compiled = bench_generate.split_compiled(ours_dtype)
                ours = bench_generate.ours_in(base, ours_fp32)
                hf = hf_fp32 if transformers_fp32 and ours_dtype == "int8" else None
                # Warm-up (a compiled step compiles for its cache length: at the timed length).
                bench_generate.time_ours(ours, ids, new_tokens if compiled else 4, compiled)
                time_llama(llm, prompt, 4)
                if hf is not None:
                    bench_generate.time_hf(hf, ids, 4)
                runs = {"ours": [], "peer": [], "hf": []}
                for _ in range(repeats):  # alternate the sides
                    runs["ours"].append(bench_generate.time_ours(ours, ids, new_tokens, compiled))
                    runs["peer"].append(time_llama(llm, prompt, new_tokens))
                    if hf is not None:
                        runs["hf"].append(bench_generate.time_hf(hf, ids, new_tokens))
                (o_ttft, o_decode, o_out), (p_ttft, p_decode, p_out) = _best(runs["ours"]), _best(runs["peer"])
                decoded = new_tokens - 1
                row = {"shape": shape, "dtype": ours_dtype, "peer_dtype": kind, "batch": 1,
                       "prompt_len": prompt_len, "new_tokens": new_tokens, "ours_ttft_s": o_ttft,
                       "peer_ttft_s": p_ttft, "ours_tok_s": decoded / o_decode, "peer_tok_s": decoded / p_decode,
                       "ratio": p_decode / o_decode, "ttft_ratio": p_ttft / o_ttft,
                       "weight_bytes": n_params * bench_generate.DTYPES[base].itemsize,
                       "cache_bytes": bench_generate.kv_cache_bytes(config, prompt_len + new_tokens // 2,
                                                                    2 if base == "bf16" else 4),
                       "gguf_bytes": paths[kind].stat().st_size,
                       "same_tokens": o_out[0, prompt_len:].tolist() == p_out, "peer_logits_max_diff": logits_diff}
                if hf is not None:
                    h_ttft, h_decode, _ = _best(runs["hf"])
                    row.update(hf_ttft_s=h_ttft, hf_tok_s=decoded / h_decode)
                rows.append(row)
                del ours
            llm.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2", help=f"one of {', '.join(bench_generate.SHAPES)}")
    parser.add_argument("--kinds", default="q8_0,f16,f32", help=f"comma-separated llama.cpp files: {', '.join(PAIRS)}")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (after one warm-up)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers fp32 reference")
    parser.add_argument("--gguf-dir", default=None, help="keep the GGUF files here (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    args = parser.parse_args()
    if missing():
        print(f"llama.cpp benchmark skipped: {' and '.join(missing())} not importable; install with: {INSTALL}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    import llama_cpp
    import transformers

    transformers.logging.disable_progress_bar()

    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {torch.get_num_threads()} threads; "
          f"batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    header = (f"{'shape':<6} {'gpt2kit':<13} {'llama.cpp':<9} | {bench_generate.timing_header('llama')} | "
              f"same tokens | logits max diff vs fp32")
    print(header)
    print("-" * len(header))
    rows = run(args.shape, args.kinds, args.prompt_len, args.new_tokens, args.repeats, not args.no_transformers,
               args.gguf_dir)
    for r in rows:
        print(f"{r['shape']:<6} {r['dtype']:<13} {r['peer_dtype']:<9} | {bench_generate.timing_cells(r)} | "
              f"{'yes' if r['same_tokens'] else 'no':<11} | {r['peer_logits_max_diff']:.2g}")
    for r in rows:
        if "hf_tok_s" in r:
            print(f"transformers fp32 beside the {r['peer_dtype']} row: TTFT {r['hf_ttft_s'] * 1e3:.1f} ms, "
                  f"{r['hf_tok_s']:.1f} tok/s (gpt2kit {r['dtype']} {r['ours_tok_s'] / r['hf_tok_s']:.2f}x)")


if __name__ == "__main__":
    main()

"""The whole benchmark suite in one run: gpt2kit against its peers beside the measured hardware limits.

    python -m benchmarks                  # tiny training shapes, GPT-2 small decode: 8-18 minutes on 2 cores
    python -m benchmarks --full           # adds GPT-2 small (124M) training, decode with prompts 32 and 512
    python -m benchmarks --only train,decode --threads 2 --json my.json
    python -m benchmarks --device cpu     # the default is the GPU when there is one
    python -m benchmarks --allocator tcmalloc   # both sides with tcmalloc instead of glibc's malloc

Sections: hardware (fp32 and bf16 matmul peak, memory bandwidth), tokenizer MB/s (gpt2kit vs transformers'
GPT2TokenizerFast), training tokens/s and MFU, decode tokens/s and time to first token, evaluation tokens/s
(vs lm-evaluation-harness), preprocessing MB/s (1 vs 2 workers), serving requests/s (vs `transformers serve`),
and llama.cpp when `llama_cpp` is importable. Each benchmark call runs in a fresh process, with both sides of
its rows in that process, alternating them where the section script does, and records the peak memory while it
ran: the process's resident memory (RSS, children included) on a CPU, the CUDA allocator's peak on a GPU. One
table is printed; all rows go to a JSON file. Where the device has no bf16 instructions (a CPU without
AVX512-BF16 or AMX, a GPU before Ampere) the bf16 rows are skipped with a note: emulated bf16 is slower than
float32 on both sides and measures nothing this project claims (--emulated-bf16 times them anyway).

On a CUDA GPU (--device, default when there is one) the model sections (hardware, train, decode, eval) run on
the GPU with clocks that wait for it; tokenizer and preprocessing are CPU work on any machine; the CPU-only
formats (int8 kernels, oneDNN packing) and the CPU peers (llama.cpp, `transformers serve` on CPU) are left out.

ratio = gpt2kit / peer, > 1 means gpt2kit is faster (for memory: peer / gpt2kit, > 1 means gpt2kit uses
less). "bound" is what the hardware allows: tokens/s at the measured matmul peak for training and evaluation,
1/TTFT at that peak for the prompt's prefill, tokens/s at the measured memory bandwidth for batch-1 decode (every
weight and the row's cached keys and values read once per token). "target" is the factor this project aims for.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt2kit.allocator import ALLOCATORS, preload_allocator
from gpt2kit.files import atomic_write_text
from gpt2kit.training.trainer import native_bf16

from . import bench_eval, bench_generate, bench_train
from .devices import default_device
from .sections import configure_process, hardware, measure, preprocess_scaling, serving, tokenizer_speed

SECTIONS = ("hardware", "tokenizer", "train", "decode", "eval", "preprocess", "serve", "llama.cpp")
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def llama_cpp_status() -> dict | None:
    """None when llama.cpp's benchmark can run, else its skip row (the optional packages are not importable)."""
    from . import bench_llamacpp

    missing = bench_llamacpp.missing()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return {"section": "llama.cpp", "skipped": f"{' and '.join(missing)} {verb} not importable; to compare "
                f"decode against llama.cpp, install (a 5-7 minute build, see docs/performance.md): "
                f"{bench_llamacpp.INSTALL}"}
    return None


# ---- what runs ---------------------------------------------------------------------------------------------------
def train_cases(full: bool, gpu: bool, bf16: bool) -> list[tuple]:
    """(shape, batch, sequence length, precision, compiled) of the training rows; no bf16 rows without `bf16`."""
    # A GPU gets GPT-2 small at llm.c's sequence length in every run; None takes bench_train's default.
    shapes = ([("tiny", 16, None), ("gpt2", 8, 1024)] if gpu else
              [("tiny", None, None)] + ([("gpt2", 4, None)] if full else []))
    # bf16 once more with gpt2kit compiled (train.compile), the faster way to train on a CPU.
    precisions = [("fp32", False)] + ([("bf16", False), ("bf16", True)] if bf16 else [])
    return [(*shape, *precision) for shape in shapes for precision in precisions]


def decode_cases(full: bool, gpu: bool, bf16: bool) -> list[tuple]:
    """(shape, prompt length, dtypes, batch sizes, prompt lookup) of the decode rows; no bf16 dtype without
    `bf16`. GPT-2 small is where the targets are stated. Compiled rows compile in their untimed warm-up (about a
    minute per dtype and batch size). Speculative decoding by prompt lookup runs against transformers' own (the
    same guesses, the same tokens)."""
    cases = [("gpt2", 32, "fp32,fp32-packed,int8,int8-compiled", "1,8", None),
             ("gpt2", 32, "fp32-compiled", "1", None), ("gpt2", 64, "fp32,int8", "1", 10)]
    if full:
        cases += [("gpt2", 32, "bf16,bf16-compiled", "1,8", None),
                  ("gpt2", 512, "fp32,fp32-packed,int8", "1,8", None), ("tiny", 32, "fp32,bf16,int8", "1,8", None)]
    if gpu:  # the float formats; compiled steps replay as CUDA graphs
        cases = [("gpt2", 32, "fp32,bf16,fp32-compiled,bf16-compiled", "1,8", None),
                 ("gpt2", 512, "bf16", "1,8", None), ("gpt2", 64, "fp32,bf16", "1", 10)]
    if not bf16:
        cases = [(shape, prompt, ",".join(d for d in dtypes.split(",") if not d.startswith("bf16")), *rest)
                 for shape, prompt, dtypes, *rest in cases]
    return [case for case in cases if case[2]]


# ---- the table ---------------------------------------------------------------------------------------------------
def table(rows: list[dict], hw: dict | None) -> list[tuple]:
    """(area, case, unit, gpt2kit, peer, ratio, target, bound, % of bound, peak RSS MB) per printed line."""
    lines = []

    def add(area, case, unit, ours, peer, ratio, target=None, bound=None, rss=None):
        lines.append((area, case, unit, ours, peer, ratio, target, bound,
                      ours / bound if bound else None, rss))

    for r in rows:
        rss = r.get("peak_mem_mb")
        if r.get("skipped"):  # listed under the table
            continue
        if r["section"] == "tokenizer":
            add("tokenizer", "encode 1 thread vs GPT2TokenizerFast", "MB/s", r["ours_mb_s"], r["peer_mb_s"],
                r["ratio"], rss=rss)
        elif r["section"] == "train":
            # The bound at this run's measured peak (the row's own comes from gpt2kit's cache of the best ever seen).
            peak = hw.get(f"{r['precision']}_flops", r["peak_flops"]) if hw else r["peak_flops"]
            name = f"{r['shape']} {r['precision']}{' compiled' if r.get('compiled') else ''}"
            add("train", f"{name} {r['batch']}x{r['seq_len']} vs transformers", "tok/s",
                r["ours_tok_s"], r["peer_tok_s"], r["ratio"], 2.0 if r["precision"] == "bf16" else 1.2,
                r["bound_tok_s"] * peak / r["peak_flops"], rss)
            # Each side's peak RSS during its timed steps, each in a process training it alone.
            if "ours_step_mem_mb" in r and "peer_step_mem_mb" in r:
                add("train mem", f"{name} step peak mem (peer/ours)", "MB", r["ours_step_mem_mb"],
                    r["peer_step_mem_mb"], r["peer_step_mem_mb"] / r["ours_step_mem_mb"], 1.0, rss=rss)
        elif r["section"] == "decode":
            # The speed targets compare the fast paths (int8, packed float32, compiled int8) with transformers in
            # float32; the decode factors are the int8 paths', the float paths are held to their bandwidth bound.
            fast = r["dtype"] in ("int8", "fp32-packed", "int8-compiled")
            int8 = r["dtype"] in ("int8", "int8-compiled")
            lookup = f" lookup {r['prompt_lookup']}" if r.get("prompt_lookup") else ""
            case = (f"{r['shape']} {r['dtype']} b{r['batch']} p{r['prompt_len']}{lookup} vs transformers "
                    f"{r['peer_dtype']}{lookup}")
            # Every weight and the row's keys and values (at the average cache length) read once per token;
            # speculative decoding reads them once per pass of several tokens, which no such bound limits.
            bound = (hw["bandwidth"] / (r["weight_bytes"] + r["cache_bytes"])
                     if hw and r["batch"] == 1 and not lookup else None)
            # Float32 paths produce transformers' greedy tokens: a ratio stands only when they did.
            differs = r["dtype"].removesuffix("-compiled") in ("fp32", "fp32-packed") and not r["same_tokens"]
            target = (3.0 if r["batch"] == 1 else 2.0) if int8 and not lookup else None
            add("decode", case + " (other tokens)" * differs, "tok/s", r["ours_tok_s"], r["peer_tok_s"],
                None if differs else r["ratio"], target, bound, rss)
            if lookup:  # the first token comes after the first pass checked its guesses: no TTFT to compare
                continue
            # The prefill's arithmetic at the matmul peak of the dtype it multiplies in.
            peak = hw.get(f"{r['compute_dtype']}_flops") if hw and "prefill_flops" in r else None
            prefill = peak / r["prefill_flops"] if peak else None
            add("TTFT", case, "1/s", 1 / r["ours_ttft_s"], 1 / r["peer_ttft_s"], r["ttft_ratio"],
                1.5 if fast else None, prefill, rss)
        elif r["section"] == "eval":
            fast = " packed" * bool(r.get("packed")) + " compiled" * bool(r.get("compile"))
            add("eval", f"{r['task']} {r['shape']}{fast} vs lm-eval HF", "tok/s", r["tokens"] / r["ours_s"],
                r["tokens"] / r["peer_s"], r["ratio"], 2.0,
                r["tokens"] * hw["fp32_flops"] / r["flops"] if hw and "flops" in r else None, rss)
        elif r["section"] == "preprocess":
            loop, *ours = r["rows"]
            for o in ours:
                add("preprocess", f"{o['workers']} worker(s) vs tiktoken loop", "MB/s", o["bytes"] / 1e6 / o["seconds"],
                    loop["bytes"] / 1e6 / loop["seconds"], o["ratio"], rss=rss)
            if len(ours) > 1:
                add("preprocess", f"{ours[-1]['workers']} vs {ours[0]['workers']} worker(s) scaling", "x",
                    ours[0]["seconds"] / ours[-1]["seconds"], 1.0, ours[0]["seconds"] / ours[-1]["seconds"], 1.8,
                    rss=rss)
        elif r["section"] == "llama.cpp":
            # The target: gpt2kit int8 ahead of llama.cpp q8_0 at batch 1; the float rows have none.
            case = f"{r['shape']} {r['dtype']} b{r['batch']} p{r['prompt_len']} vs llama.cpp {r['peer_dtype']}"
            bound = hw["bandwidth"] / (r["weight_bytes"] + r.get("cache_bytes", 0)) if hw else None
            add("llama.cpp", case, "tok/s", r["ours_tok_s"], r["peer_tok_s"], r["ratio"],
                1.0 if r["peer_dtype"] == "q8_0" else None, bound, rss)
            add("TTFT", case, "1/s", 1 / r["ours_ttft_s"], 1 / r["peer_ttft_s"], r["ttft_ratio"], rss=rss)
        elif r["section"] == "serve" and "gpt2kit" in r["results"]:
            ours = r["results"]["gpt2kit"]
            for name, peer in r["results"].items():
                if name != "gpt2kit":
                    # A ratio stands only for the same work: no failed requests and the same greedy text.
                    problems = [f"{n} {len(x['errors'])} errors" for n, x in (("gpt2kit", ours), (name, peer))
                                if x["errors"]]
                    problems += [] if ours["first_text"] == peer["first_text"] else ["different greedy text"]
                    add("serve", f"req/s vs {name}" + (f" ({', '.join(problems)})" if problems else ""), "req/s",
                        ours["req_s"], peer["req_s"], None if problems else ours["req_s"] / peer["req_s"], rss=rss)
    return lines


def hardware_line(hw: dict) -> str:
    peaks = ", ".join(f"{name} matmul {hw[f'{name}_flops'] / 1e9:.0f} GFLOP/s" for name in ("fp32", "bf16")
                      if f"{name}_flops" in hw)
    return f"hardware: {peaks}, memory bandwidth {hw['bandwidth'] / 1e9:.1f} GB/s (copy)"


def print_report(rows: list[dict], hw: dict | None, device: torch.device) -> None:
    print(f"\n{platform_line(device)}")
    if hw:
        print(hardware_line(hw))
    allocators = sorted({r["allocator"] for r in rows if "allocator" in r})
    if allocators:
        print(f"allocator: {', '.join(allocators)}")
    head = (f"{'area':<10} {'case':<44} {'unit':>5} {'gpt2kit':>9} {'peer':>9} {'ratio':>6} {'target':>6} "
            f"{'bound':>9} {'of bound':>8} {'peak MB':>7}")
    print(head + "\n" + "-" * len(head))
    for area, case, unit, ours, peer, ratio, target, bound, share, rss in table(rows, hw):
        mark = "" if target is None or ratio is None else (" " if ratio >= target else "<")
        shown = "-" if ratio is None else f"{ratio:.2f}"  # no ratio where the two sides' work differed
        print(f"{area:<10} {case:<44} {unit:>5} {ours:>9.4g} {peer:>9.4g} {shown:>6} "
              f"{f'{mark}{target:.1f}x' if target else '':>6} {f'{bound:.4g}' if bound else '':>9} "
              f"{f'{share:.0%}' if share else '':>8} {f'{rss:.0f}' if rss else '':>7}")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['section']}: skipped - {r['skipped']}")
    print("ratio = gpt2kit / peer (> 1: gpt2kit faster); '<' marks a ratio below its target; bound = hardware "
          "limit in the row's unit; TTFT shown as 1/seconds; peak MB = process RSS (CPU rows) or CUDA allocator "
          "peak (GPU rows)")


def peer_versions() -> dict[str, str]:
    """Versions of gpt2kit's peers that are installed (the JSON records what a table was measured against)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "lm_eval", "llama_cpp_python", "tiktoken", "gpt2kit"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def platform_line(device: torch.device) -> str:
    from gpt2kit.training.logging import _cpu_name

    gpu = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), " if device.type == "cuda" else ""
    return (f"{gpu}{_cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="GPT-2 small (124M) shapes as well (tens of minutes)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(SECTIONS)} (default: "
                        "all; serve only with --full, as transformers' continuous batching reserves about 14 GB)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the rows (default {RESULTS})")
    parser.add_argument("--device", type=torch.device, default=default_device(),
                        help="where the models run: cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="time the bf16 rows on a device that only emulates bf16 too (skipped there by default)")
    parser.add_argument("--allocator", choices=("system", *ALLOCATORS), default="system",
                        help="malloc of the measuring processes, for gpt2kit and its peers alike: the system's "
                        "(glibc) or one preloaded (see docs/performance.md)")
    args = parser.parse_args(argv)
    if args.allocator != "system":
        try:
            preload_allocator(args.allocator)
        except ValueError as error:
            parser.error(str(error))
    device, cpu = args.device, torch.device("cpu")
    gpu = device.type == "cuda"
    only = args.only.split(",") if args.only else [s for s in SECTIONS if args.full or s != "serve"]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    configure_process(args.threads, device)  # each measuring process repeats this
    rows: list[dict] = []
    bf16 = args.emulated_bf16 or native_bf16(device)
    if not bf16:
        rows.append({"section": "bf16 rows", "skipped": f"{device.type} has no bf16 instructions (emulated bf16 "
                     "runs many times slower than float32 on either side and says nothing of the fast paths), so "
                     "neither the bf16 rows nor the bf16 matmul peak are timed; --emulated-bf16 times them anyway"})
    hw = None
    started, began = time.perf_counter(), datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    def save() -> None:
        """The rows so far, written after every section: a later failure or interruption loses nothing."""
        atomic_write_text(args.json, json.dumps({
            "platform": platform_line(device), "argv": sys.argv[1:] if argv is None else argv, "started": began,
            "seconds": round(time.perf_counter() - started, 1), "versions": peer_versions(), "hardware": hw,
            "rows": rows, "table": table(rows, hw)}, indent=1, default=str))

    @contextlib.contextmanager
    def section(name: str) -> Iterator[None]:
        try:
            yield
        except (Exception, SystemExit) as error:  # a missing peer or a mismatch: the other sections still count
            rows.append({"section": name, "skipped": f"failed: {type(error).__name__}: {error}"})
            print(f"{name}: failed: {type(error).__name__}: {error}", flush=True)
        save()

    print(platform_line(device), flush=True)
    if "hardware" in only:
        with section("hardware"):
            hw = measure(rows, device, hardware, device, bf16)
            print(hardware_line(hw), flush=True)
    if "tokenizer" in only:
        with section("tokenizer"):
            measure(rows, cpu, tokenizer_speed)
    if "train" in only:
        for shape, batch, seq_len, precision, compiled in train_cases(args.full, gpu, bf16):
            print(f"train {shape} {precision}{' compiled' if compiled else ''} ...", flush=True)
            with section("train"):
                for row in measure(rows, device, bench_train.run, shape, precision, seq_len, batch,
                                   steps=5 if shape == "tiny" or gpu else 3, compiled=compiled, device=device):
                    row["section"] = "train"
                    if args.allocator != "system":  # a preloaded allocator's footprint is not the peer's
                        continue
                    # Each side's memory in a process of its own: beside the other model and its optimizer
                    # state, either side's peak would include the other's memory.
                    alone: list[dict] = []
                    for side in ("ours", "peer"):
                        measure(alone, device, bench_train.run, shape, precision, seq_len, batch, steps=2,
                                compiled=compiled, device=device, sides=side)
                    row["ours_step_mem_mb"], row["peer_step_mem_mb"] = (a["step_mem_mb"] for a in alone)
    if "decode" in only:
        for shape, prompt, dtypes, batches, lookup in decode_cases(args.full, gpu, bf16):
            print(f"decode {shape} {dtypes} batch {batches} prompt {prompt}"
                  f"{f' prompt lookup {lookup}' if lookup else ''} ...", flush=True)
            with section("decode"):
                for row in measure(rows, device, bench_generate.run, shape, dtypes, batches, prompt_len=prompt,
                                   new_tokens=64, repeats=3, device=device, prompt_lookup=lookup):
                    row["section"] = "decode"
    if "eval" in only:
        print("eval ...", flush=True)
        with section("eval"):
            for row in measure(rows, device, bench_eval.run, "gpt2" if args.full or gpu else "tiny",
                               articles=8 if args.full else 2, packed=not gpu, device=device):
                row["section"] = "eval"
    if "preprocess" in only:
        print("preprocess ...", flush=True)
        with section("preprocess"):
            measure(rows, cpu, preprocess_scaling, 128.0 if args.full else 64.0)
    if "serve" in only and gpu:
        rows.append({"section": "serve", "skipped": "the serving peer (`transformers serve`) runs on the CPU here; "
                     "run benchmarks/bench_serve.py for it"})
    elif "serve" in only:
        with section("serve"):
            measure(rows, cpu, serving, args.full)
    if "llama.cpp" in only:
        skipped = ({"section": "llama.cpp", "skipped": "compared on a CPU (python -m benchmarks --device cpu)"}
                   if gpu else llama_cpp_status())
        if skipped:
            rows.append(skipped)
        else:
            from . import bench_llamacpp

            # GPT-2 small, batch 1: gpt2kit int8 vs q8_0 (with transformers fp32 beside), bf16 vs f16, fp32 vs f32.
            kinds = "q8_0,f16,f32" if bf16 else "q8_0,f32"  # f16 is timed beside gpt2kit's bf16
            print(f"llama.cpp gpt2 {kinds} batch 1 prompt 32 ...", flush=True)
            with section("llama.cpp"):
                for row in measure(rows, cpu, bench_llamacpp.run, "gpt2", kinds, prompt_len=32,
                                   new_tokens=64, repeats=3):
                    row["section"] = "llama.cpp"

    print_report(rows, hw, device)
    save()
    print(f"benchmarks done in {time.perf_counter() - started:.0f} s; rows written to {args.json}")

if __name__ == "__main__":
    main()

"""Preprocessing throughput: `gpt2kit preprocess` on 1 and N workers vs a plain single-process loop of
tiktoken `encode_ordinary` writing the same uint16 array, in the same run, on the same JSONL corpus.

    python benchmarks/bench_preprocess.py                    # ~16 MB JSONL built from the bundled corpora
    python benchmarks/bench_preprocess.py --mb 200 --workers 1 2 4
    python benchmarks/bench_preprocess.py --input my.jsonl   # your own JSONL (text under "text")

MB/s counts input bytes. The baseline's tokens must equal gpt2kit's train shard byte for byte, or the
script fails: both compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2kit import GPT2Tokenizer
from gpt2kit.data import preprocess, read_meta

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def build_corpus(path: Path, megabytes: float) -> None:
    """JSONL documents: LAMBADA passages, WikiText-2 lines, tiny-Shakespeare speeches, repeated to size."""
    texts = [json.loads(line)["text"] for line in (DATA / "lambada" / "lambada_test.jsonl").open(encoding="utf-8")]
    texts += [line for line in (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
              if line.strip()]
    texts += (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").split("\n\n")
    lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts]
    target, written = megabytes * 1e6, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for line in lines:
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break


def baseline(path: Path, out: Path) -> float:
    """The obvious loop: one process, encode_ordinary per document, EOS after each, one uint16 array."""
    tokenizer = GPT2Tokenizer.gpt2()
    encoding, eos = tokenizer.encoding, tokenizer.eos_token_id
    start = time.perf_counter()
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids += encoding.encode_ordinary(json.loads(line)["text"])
            ids.append(eos)
    np.array(ids, dtype=np.uint16).tofile(out)
    return time.perf_counter() - start


def run(mb: float = 16.0, workers: tuple[int, ...] = (1, 2), repeats: int = 2, input: Path | None = None) -> list[dict]:
    """One row per worker count: gpt2kit's MB/s against the single-process loop's (the first row is the loop).
    Raises SystemExit if gpt2kit's tokens differ from the loop's."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = input or tmp / "corpus.jsonl"
        if input is None:
            build_corpus(corpus, mb)
        size = corpus.stat().st_size
        GPT2Tokenizer.gpt2()  # load the vocabulary outside the timings (both sides use the same cached one)
        # Rounds of the loop and every worker count in turn, so other load on the machine hits them alike; the
        # best of each.
        best = {n: float("inf") for n in ("loop", *workers)}
        for r in range(repeats):
            best["loop"] = min(best["loop"], baseline(corpus, tmp / "baseline.bin"))
            for n in workers:
                start = time.perf_counter()
                preprocess(corpus, tmp / f"gpt2kit-{n}-{r}", workers=n, progress=False)
                best[n] = min(best[n], time.perf_counter() - start)
        reference = np.fromfile(tmp / "baseline.bin", dtype=np.uint16)
        rows = [{"name": "tiktoken encode_ordinary loop", "workers": 1, "bytes": size, "tokens": len(reference),
                 "seconds": best["loop"], "ratio": 1.0}]
        for n in workers:
            out = tmp / f"gpt2kit-{n}-{repeats - 1}"
            meta = read_meta(out)
            tokens = np.fromfile(out / meta["splits"]["train"]["shards"][0]["file"], dtype=np.uint16)
            if not np.array_equal(tokens, reference):
                raise SystemExit(f"gpt2kit with {n} worker(s) wrote different tokens than the baseline")
            rows.append({"name": f"gpt2kit preprocess, {n} worker(s)", "workers": n, "bytes": size,
                         "tokens": len(tokens), "seconds": best[n], "ratio": best["loop"] / best[n]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=None, help="a JSONL file; default: build one")
    parser.add_argument("--mb", type=float, default=16.0, help="size of the built corpus in MB (default 16)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs each (default 2)")
    args = parser.parse_args()

    rows = run(args.mb, tuple(args.workers), args.repeats, args.input)
    print(f"corpus: {rows[0]['bytes'] / 1e6:.1f} MB JSONL, {rows[0]['tokens']:,} tokens")
    print(f"{'':32s} {'seconds':>8s} {'MB/s':>7s} {'Mtok/s':>7s} {'vs loop':>8s}")
    for r in rows:
        print(f"{r['name']:32s} {r['seconds']:8.2f} {r['bytes'] / 1e6 / r['seconds']:7.1f} "
              f"{r['tokens'] / 1e6 / r['seconds']:7.2f} {r['ratio']:7.2f}x")
    print("tokens identical to the baseline: yes")


if __name__ == "__main__":
    main()

"""WikiText perplexity speed of gpt2kit against lm-evaluation-harness's HF backend, same weights, same run.

Both sides evaluate the same WikiText-2 test articles with disjoint windows of the model's context (lm-eval's
`wikitext` task definition, its task file included unchanged and pointed at the local file) at the same batch
size, in float32 (gpt2kit's weights oneDNN-packed and its log-sum-exp compiled, as `gpt2kit eval
--pack-weights --compile` runs; --no-pack for plain nn.Linear, --no-compile for the eager log-sum-exp). Timed:
reading, detokenizing, tokenizing and scoring (not model loading or imports), after one untimed warm-up of each
side on the first article (first calls pay one-time costs: torch.compile, thread pools, regex compilation, the
task's dataset build). tokens/s = document tokens scored / seconds. The script also prints
both tools' metrics and their relative difference, and with --lambada N does the same for LAMBADA
(lambada_openai) on the first N passages. On a CUDA GPU (--device, the default when there is one) both
sides run there, with plain weights (packing is a CPU layout), and the clocks wait for the GPU.

    python benchmarks/bench_eval.py                          # tiny random model, 4 articles: about a minute
    python benchmarks/bench_eval.py --shape gpt2 --articles 62 --lambada 5153   # GPT-2 small, full test sets
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.evaluation import evaluate_lambada, evaluate_perplexity
from gpt2kit.evaluation.harness import run_lm_eval
from gpt2kit.quantization import pack_weights
from gpt2kit.training.logging import forward_flops, synchronize

if __package__:
    from .devices import default_device
else:  # run as a script: benchmarks/ is on sys.path
    from devices import default_device

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
WIKITEXT = DATA / "wikitext-2" / "wiki.test.raw"
LAMBADA = DATA / "lambada" / "lambada_test.jsonl"
SHAPES = {
    "tiny": GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256),
    "gpt2": GPT2Config.from_name("gpt2"),
}


def wikitext_flops(config: GPT2Config, result: dict) -> float:
    """The least arithmetic of a perplexity evaluation (see evaluate_perplexity's result): the blocks at every
    window position, the LM head at each scored token. Attention counts windows of the mean length, which by
    convexity is no more than the windows' own pairs."""
    mean = result["forward_tokens"] / result["windows"]
    return forward_flops(config, result["forward_tokens"], result["tokens"], result["forward_tokens"] * (mean + 1) / 2)


def run(shape: str = "tiny", articles: int = 4, lambada: int = 0, batch_size: int = 8,
        packed: bool = True, compile: bool = True, device: torch.device | str = "cpu", repeats: int = 3) -> list[dict]:
    """WikiText (and, with lambada > 0, LAMBADA) rows: seconds (WikiText: the best of `repeats` alternating runs
    of each side), tokens/s and metrics of both sides. `packed` evaluates gpt2kit's model with oneDNN-packed
    float32 weights (`gpt2kit eval --pack-weights`, CPU only), else as is; `compile` its log-sum-exp through
    torch.compile (`gpt2kit eval --compile`)."""
    from lm_eval.models.huggingface import HFLM

    device = torch.device(device)
    if packed and device.type != "cpu":
        raise ValueError(f"packed weights are a CPU layout: evaluate on {device} with packed=False")

    def timed(fn):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        return result, time.perf_counter() - start

    torch.manual_seed(0)
    config = SHAPES[shape]
    model = GPT2LMHeadModel(config).eval()
    tokenizer = GPT2Tokenizer.gpt2()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        model = pack_weights(model) if packed else model.to(device)
        hflm = HFLM(pretrained=str(Path(tmp) / "model"), dtype="float32", device=str(device), batch_size=batch_size)

        def run_theirs(task, path, limit):
            import lm_eval.evaluator

            # simple_evaluate also records the environment (torch's collect_env, pip and git subprocesses,
            # about 1.5 s): bookkeeping, not evaluation, and nothing gpt2kit's side does; left out of the time.
            saved = lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash
            lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash = (lambda results: None,
                                                                                     lambda: None)
            # Its task-file warnings and the progress bars of datasets and of its requests would fill the
            # suite's table; an error still raises.
            logging.getLogger("lm_eval").setLevel(logging.ERROR)
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    return run_lm_eval(hflm, {task: path}, Path(tmp) / task, limits={task: limit})[task]
            finally:
                lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash = saved

        evaluate_perplexity(model, tokenizer, WIKITEXT, limit=1, batch_size=batch_size, compile=compile,
                            progress=False)
        run_theirs("wikitext", WIKITEXT, 1)
        ours_s = theirs_s = math.inf
        for _ in range(repeats):  # alternate the sides, so other load on the machine hits both alike; best of
            ours, seconds = timed(lambda: evaluate_perplexity(model, tokenizer, WIKITEXT, limit=articles,
                                                              batch_size=batch_size, compile=compile, progress=False))
            ours_s = min(ours_s, seconds)
            theirs, seconds = timed(lambda: run_theirs("wikitext", WIKITEXT, articles))
            theirs_s = min(theirs_s, seconds)
        rows.append({"device": device.type, "task": "wikitext", "shape": shape, "packed": packed, "compile": compile,
                     "limit": articles,
                     "tokens": ours["tokens"], "windows": ours["windows"], "ours_s": ours_s, "peer_s": theirs_s,
                     "flops": wikitext_flops(config, ours),
                     "ratio": theirs_s / ours_s,
                     "metrics": {m: (ours[m], v) for m, v in theirs.items()}})
        if lambada:
            ours, ours_s = timed(lambda: evaluate_lambada(model, tokenizer, LAMBADA, limit=lambada,
                                                          batch_size=batch_size, compile=compile, progress=False))
            theirs, theirs_s = timed(lambda: run_theirs("lambada", LAMBADA, lambada))
            rows.append({"device": device.type, "task": "lambada", "shape": shape, "packed": packed,
                         "compile": compile, "limit": lambada,
                         "ours_s": ours_s, "peer_s": theirs_s, "ratio": theirs_s / ours_s,
                         "metrics": {m: (ours[m], v) for m, v in theirs.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--articles", type=int, default=4, help="first N WikiText-2 test articles (of 62)")
    parser.add_argument("--lambada", type=int, default=0, help="also compare on the first N LAMBADA passages")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-pack", action="store_true", help="evaluate gpt2kit without --pack-weights")
    parser.add_argument("--no-compile", action="store_true", help="evaluate gpt2kit without --compile")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()

    config = SHAPES[args.shape]
    print(f"model: {args.shape} (random weights, context {config.n_positions}), float32, batch size "
          f"{args.batch_size}, {device}, torch threads {torch.get_num_threads()}")
    for r in run(args.shape, args.articles, args.lambada, args.batch_size, not args.no_pack and device.type == "cpu",
                 not args.no_compile, device):
        if r["task"] == "wikitext":
            print(f"\nWikiText-2 test, {r['limit']} articles, {r['tokens']:,} tokens, {r['windows']} windows")
            print(f"{'':18}{'gpt2kit':>14}{'lm-eval':>14}{'ratio':>10}")
            print(f"{'seconds':18}{r['ours_s']:>14.2f}{r['peer_s']:>14.2f}{r['ratio']:>9.2f}x")
            print(f"{'tokens/s':18}{r['tokens'] / r['ours_s']:>14,.0f}{r['tokens'] / r['peer_s']:>14,.0f}"
                  f"{r['ratio']:>9.2f}x")
        else:
            print(f"\nLAMBADA (OpenAI), {r['limit']} passages: gpt2kit {r['ours_s']:.2f} s, lm-eval "
                  f"{r['peer_s']:.2f} s ({r['ratio']:.2f}x)")
        for metric, (ours, theirs) in r["metrics"].items():
            diff = abs(ours - theirs) / max(abs(theirs), 1e-12)
            print(f"{metric:18}{ours:>14.6g}{theirs:>14.6g}   rel. diff {diff:.1e}")


if __name__ == "__main__":
    main()

"""The command line under torchrun (2 CPU processes, gloo): tensor-parallel generation, distributed training on
1 vs 2 processes, and DCP -> HF conversion. Each torchrun job is bounded by a timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.checkpoint import CheckpointError
from gpt2kit.cli import main
from gpt2kit.pipeline import generate_text
from gpt2kit.tokenizer import has_tokenizer_files
from gpt2kit.training import run
from gpt2kit.training.logging import read_metrics
from .conftest import DATA

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(*args: str, timeout: float = 180, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m gpt2kit ARGS` (with `stdin` piped in); on timeout the
    launcher and its workers (one process group) are killed and the test fails."""
    process = subprocess.Popen([*TORCHRUN, "-m", "gpt2kit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun {' '.join(args)} did not finish within {timeout:.0f} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A random GPT-2 with the GPT-2 vocabulary; a wide initialisation makes its greedy text varied."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, initializer_range=0.3))
    path = tmp_path_factory.mktemp("lm") / "model"
    model.save_pretrained(path)
    return path


def test_tensor_parallel_generate_equals_one_process(lm_dir):
    prompt = "The distributed engine"
    expected = generate_text(lm_dir, prompt, max_new_tokens=16, do_sample=False)[0]
    assert len(set(expected[len(prompt):].split())) > 4  # not one repeated token: a real comparison
    result = torchrun("generate", "--model", str(lm_dir), "--tensor-parallel", "2", "--max-new-tokens", "16",
                      "--no-do-sample", stdin=prompt)  # the documented default: the prompt on standard input
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == expected + "\n"  # printed once: by rank 0 only


def test_tensor_parallel_sampling_without_a_seed_draws_the_same_tokens_on_every_rank(lm_dir):
    """Each rank samples from the same all-reduced logits: with different random streams the ranks' rows part
    ways, and the rank that reaches EOS first leaves the other waiting in a collective (an EOS bias makes the
    early stop likely)."""
    result = torchrun("generate", "--model", str(lm_dir), "--tensor-parallel", "2", "--prompt", "The engine",
                      "--max-new-tokens", "60", "--do-sample", "--logit-bias", "50256=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("The engine")


def test_tensor_parallel_generate_needs_matching_processes(lm_dir):
    result = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "--model", str(lm_dir),
                             "--tensor-parallel", "2", "--prompt", "x"], capture_output=True, text=True, env=ENV,
                            timeout=120)
    assert result.returncode == 2
    assert "--tensor-parallel 2 needs 2 processes, this job has 1" in result.stderr


# ---- training ------------------------------------------------------------------------------------------------
STEPS = 6


def write_config(directory: Path, train_dir: Path, name: str, raw_data: dict | None = None,
                 **parallel) -> Path:
    """The same run for any number of processes: 8 sequences of 32 tokens per step (micro-batches of 2 with
    gradient accumulation), fp32, no dropout, a checkpoint every 3 steps."""
    config = {
        "out_dir": str(directory / name), "seed": 7,
        "model": {"name": "gpt2-tiny", "config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32,
                                                  "resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0}},
        "data": {"train": str(train_dir), "seq_len": 32, **(raw_data or {})},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "global_batch_tokens": 256, "precision": "fp32",
                  "eval_interval": 3, "eval_batches": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"save_interval": 3, "keep_last": None},
        "log": {"progress": False, "plot": False, "tensorboard": False},
        "sample": {"prompt": "I had", "max_new_tokens": 4},
        "parallel": parallel,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses(out_dir: Path, key: str = "train_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out_dir / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus) -> Path:
    """The reference: one process."""
    directory = tmp_path_factory.mktemp("runs")
    run("train", write_config(directory, corpus, "single"))
    return directory / "single"


def assert_same_run(out_dir: Path, reference: Path, steps: range) -> None:
    for key in ("train_loss", "grad_norm", "val_loss"):
        got, expected = losses(out_dir, key), losses(reference, key)
        assert [got[s] for s in steps if s in expected] == pytest.approx(
            [expected[s] for s in steps if s in expected], rel=1e-5), key
    assert losses(out_dir, "tokens") == {s: v for s, v in losses(reference, "tokens").items() if s in steps}


@pytest.mark.parametrize("layout, parallel", [("ddp", {"data": -1}), ("tp", {"data": 1, "tensor": -1})])
def test_two_processes_train_like_one(tmp_path, corpus, single, layout, parallel):
    # Data parallel starts from the raw text the corpus was made of: rank 0 tokenizes it as the corpus was made,
    # alone (every rank wrote the same directory at once), and the other rank reuses it.
    raw = {"train": str(DATA / "the-verdict" / "the-verdict.txt"), "format": "paragraphs", "val_fraction": 0.1,
           "tokenizer": str(corpus.parent / "tokenizer")} if layout == "ddp" else None
    config = write_config(tmp_path, corpus, layout, raw_data=raw, **parallel)
    result = torchrun("train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / layout
    assert_same_run(out, single, range(1, STEPS + 1))
    assert result.stderr.count("--- sample ---") == 1  # rank 0 prints; the other rank stays quiet
    assert (result.stdout + result.stderr).count("preprocessed 1 file(s)") == (layout == "ddp")
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    final = GPT2LMHeadModel.from_pretrained(out / "final").state_dict()
    for key, tensor in GPT2LMHeadModel.from_pretrained(single / "final").state_dict().items():
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-4, msg=key)
    checkpoint = out / "checkpoints" / "step-00000003"
    assert (checkpoint / "training_state" / "dcp").is_dir() == (layout == "tp")
    if layout == "tp":
        # A sharded checkpoint resumes in one process and continues exactly like the single run.
        resumed = tmp_path / "tp-resumed"
        run("train", write_config(tmp_path, corpus, "tp-resumed"), resume=str(checkpoint))
        assert_same_run(resumed, single, range(4, STEPS + 1))
        # A run of another shape is refused, as from a whole checkpoint (the sharded one loaded it silently).
        with pytest.raises(CheckpointError, match=r"saved from another model shape than this run's \(n_head 4 -> 2"):
            run("train", write_config(tmp_path, corpus, "tp-other"), [("model.config.n_head", "2")],
                resume=str(checkpoint))
        dcp = checkpoint / "training_state" / "dcp"
        other = tmp_path / "other.json"
        other.write_text(json.dumps({**json.loads((dcp / "config.json").read_text()), "n_head": 2}))
        assert main(["convert", "--from-dcp", str(dcp), "--config", str(other), "--output", str(tmp_path / "m")]) == 2
        assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("layout, parallel", [("tp", {"data": 1, "tensor": -1}), ("fsdp", {"data": 1, "shard": -1})])
def test_finetuning_a_saved_model_on_two_processes_is_the_one_process_run(tmp_path, corpus, single, layout, parallel):
    """A model loaded from an HF directory holds its projections as transposed views: FSDP refused them, and
    tensor parallelism sharded them into gradients of another layout, which fused AdamW applied to the wrong
    elements (the losses left the one-process run's from step 2)."""
    def finetune_config(name: str, **layout_options) -> Path:
        path = write_config(tmp_path, corpus, name, **layout_options)
        config = yaml.safe_load(path.read_text())
        config["model"]["name"] = str(single / "final")
        path.write_text(yaml.safe_dump(config))
        return path

    run("finetune", finetune_config("one"))
    result = torchrun("finetune", "--config", str(finetune_config(layout, **parallel)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / layout, tmp_path / "one", range(1, STEPS + 1))


def classification_run(directory: Path, dropout: float = 0.0) -> dict:
    """A text-classification run on 38 short sentences (rows padded to each micro-batch's longest), 6 steps."""
    import random

    rng = random.Random(0)
    words = "the movie was very good bad".split()
    lines = ["sentence\tlabel"] + [f"{' '.join(rng.choices(words, k=rng.randint(2, 12)))}\t{rng.randint(0, 1)}"
                                    for _ in range(38)]
    (directory / "train.tsv").write_text("\n".join(lines) + "\n")
    return {"task": "text_classification", "seed": 3,
            "model": {"name": "gpt2-tiny", "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32,
                                                      "resid_pdrop": dropout, "attn_pdrop": dropout,
                                                      "embd_pdrop": dropout}},
            "data": {"train": str(directory / "train.tsv"), "format": "sst2"},
            "train": {"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 8},
            "checkpoint": {"save_interval": 3, "keep_last": None},
            "optim": {"warmup_steps": 0}, "log": {"progress": False, "plot": False, "tensorboard": False}}


def test_data_parallel_classification_is_the_single_process_run(tmp_path):
    """Padded rows: each rank has its own number of real tokens, so tokens (and tokens_seen, tokens/s, MFU) are
    summed over the ranks, not rank 0's count times the ranks. 38 examples in steps of 8: each epoch uses 32,
    so steps 5-6 of the second epoch hold the same examples however many ranks there are (a rank's DataLoader
    dropped its odd last example while one process used it). The run trains its tokenizer first: rank 0 alone (every
    rank trained it, into the same directory)."""
    config = classification_run(tmp_path)
    config["data"]["tokenizer_vocab_size"] = 300
    for name in ("single", "ddp"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**config, "out_dir": str(tmp_path / name)}))
    run("train", tmp_path / "single.yaml")
    result = torchrun("train", "--config", str(tmp_path / "ddp.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("trained a byte-level BPE vocabulary") == 1
    assert losses(tmp_path / "ddp", "tokens") == losses(tmp_path / "single", "tokens")
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


def test_data_parallel_training_with_dropout_on_padded_rows_resumes_exactly(tmp_path):
    """Dropout draws as many random numbers as a batch has elements, and each rank pads its rows to its own
    width: the ranks' random states drift apart, so a checkpoint keeps every rank's, and a resumed run continues
    the uninterrupted one's losses exactly (with rank 0's state on both ranks it did not). The three runs share
    one launch (RESUME_RUNS): starting two processes costs more than the runs."""
    config = classification_run(tmp_path, dropout=0.1)
    for name in ("whole", "resumed", "tp"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**config, "out_dir": str(tmp_path / name)}))
    script = tmp_path / "resume_runs.py"
    script.write_text(RESUME_RUNS)
    result = subprocess.run([*TORCHRUN, str(script), str(tmp_path / "whole.yaml"), str(tmp_path / "resumed.yaml"),
                             str(tmp_path / "whole" / "checkpoints" / "step-00000003"), str(tmp_path / "tp.yaml")],
                            capture_output=True, text=True, env=ENV, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert set(resumed) == {4, 5, 6} and resumed == {step: whole[step] for step in resumed}  # bit for bit
    # Resumed as tensor parallel, the two ranks form one group, which must draw one random stream: with each rank's
    # saved state (another layout's), their replicated weights (position embedding, LayerNorms, head) drifted.
    assert json.loads((tmp_path / "tp" / "replicas.json").read_text()) == []


# Under torchrun: `train --config WHOLE`, then `train --config RESUMED --resume CHECKPOINT` and, with a TP_CONFIG,
# that checkpoint resumed as tensor parallel, writing the names of the replicated weights that differ between the
# ranks to replicas.json.
RESUME_RUNS = """
import json
import sys
import torch
import torch.distributed as dist
from gpt2kit.training import Trainer, load_config, run
whole, resumed, checkpoint, *tp = sys.argv[1:]
run("train", whole)
run("train", resumed, resume=checkpoint)
if tp:
    trainer = Trainer(args=load_config(tp[0], [("parallel.tensor", "-1"), ("parallel.data", "1")]))
    trainer.train(resume=checkpoint)
    local = {name: (p.to_local() if hasattr(p, "to_local") else p).detach()
             for name, p in trainer.model.named_parameters()
             if not hasattr(p, "placements") or all(pl.is_replicate() for pl in p.placements)}
    both = [None, None]
    dist.all_gather_object(both, local)
    if dist.get_rank() == 0:
        differ = [name for name in both[0] if not torch.equal(both[0][name], both[1][name])]
        (trainer.out_dir / "replicas.json").write_text(json.dumps(differ))
"""


PREDICT_AFTER_TRAINING = """
import json
import sys
import torch
import torch.distributed as dist
from gpt2kit.training import Trainer, load_config
trainer = Trainer(args=load_config(sys.argv[1], [("train.max_steps", "1"), ("optim.warmup_steps", "0"),
                                                    ("sample.prompt", "null")]))
trainer.train()
torch.manual_seed(dist.get_rank())  # as after batches of other widths with dropout: the ranks' states differ
texts = trainer.predict(["I had", "The"], max_new_tokens=6, do_sample=True)
(trainer.out_dir / f"predict-rank{dist.get_rank()}.json").write_text(json.dumps(texts))
"""


@pytest.mark.parametrize("layout", [{"tensor": -1}, {"shard": -1}], ids=["tensor", "fsdp"])
def test_predict_after_sharded_training(tmp_path, corpus, layout):
    """A tensor-parallel rank holds some of the heads, an FSDP rank some of each weight: predict runs without the
    KV cache (sized for all) and samples with rank 0's seed, so both ranks return the same texts (each forward is
    collective) whatever their own random states."""
    config = write_config(tmp_path, corpus, "tp-predict", data=1, **layout)
    script = tmp_path / "predict.py"
    script.write_text(PREDICT_AFTER_TRAINING)
    result = subprocess.run([*TORCHRUN, str(script), str(config)], capture_output=True, text=True, env=ENV,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    texts = [json.loads((tmp_path / "tp-predict" / f"predict-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert texts[0] == texts[1] and len(texts[0]) == 2, texts



def test_tensor_parallel_training_with_dropout_resumes_exactly(tmp_path, corpus):
    """Attention dropout draws each rank's own masks from a stream derived from the shared one (see
    own_attention_dropout), so a resumed tensor-parallel run with dropout and recomputation continues the
    uninterrupted run's losses exactly."""
    runs = {}
    for name in ("whole", "resumed"):
        config = write_config(tmp_path, corpus, name, data=1, tensor=-1)
        values = yaml.safe_load(config.read_text())
        values["model"]["config"].update(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1)
        values["train"]["recompute"] = True
        config.write_text(yaml.safe_dump(values))
        runs[name] = config
    script = tmp_path / "resume_runs.py"
    script.write_text(RESUME_RUNS)
    result = subprocess.run([*TORCHRUN, str(script), str(runs["whole"]), str(runs["resumed"]),
                             str(tmp_path / "whole" / "checkpoints" / "step-00000003")],
                            capture_output=True, text=True, env=ENV, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert set(resumed) == {4, 5, 6} and resumed == {step: whole[step] for step in resumed}  # bit for bit


def test_fsdp_resumes_a_single_process_checkpoint(tmp_path, corpus, single, monkeypatch):
    config = write_config(tmp_path, corpus, "fsdp", data=1, shard=-1)
    result = torchrun("train", "--config", str(config), "--resume", str(single / "checkpoints" / "step-00000003"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert_same_run(tmp_path / "fsdp", single, range(4, STEPS + 1))
    # The gathered final model is an ordinary HF directory.
    final = GPT2LMHeadModel.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    for key, tensor in GPT2LMHeadModel.from_pretrained(single / "final").state_dict().items():
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-4, msg=key)
    # Its checkpoints are distributed: convert one offline.
    merged = tmp_path / "merged"
    assert main(["convert", "--from-dcp", str(tmp_path / "fsdp" / "checkpoints" / "step-00000006" /
                                             "training_state" / "dcp"), "--output", str(merged)]) == 0
    for key, tensor in GPT2LMHeadModel.from_pretrained(merged).state_dict().items():
        assert torch.equal(tensor, final[key]), key
    assert has_tokenizer_files(merged)  # the run's tokenizer, from the checkpoint directory
    monkeypatch.chdir(tmp_path / "fsdp" / "checkpoints" / "step-00000006" / "training_state")
    assert main(["convert", "--from-dcp", "dcp", "--output", str(tmp_path / "relative")]) == 0
    assert has_tokenizer_files(tmp_path / "relative")  # found from a relative path too

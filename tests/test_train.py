"""Trainer: loss goes down, exact accumulation, schedules, param groups, recompute, NaN stop, txtcls, instructions."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils.data import Dataset

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.checkpoint import CheckpointError, gpt2kit_to_hf
from gpt2kit.cli import main
from gpt2kit.conversation import ALPACA
from gpt2kit.data import InstructionDataset, preprocess
from gpt2kit.data.datasets import alpaca_prompt
from gpt2kit.pipeline import pipeline
from gpt2kit.data.tokenizer_training import train_tokenizer
from gpt2kit.tokenizer import GPT2Tokenizer, train_bpe
from gpt2kit.training import ConfigError, Trainer, TrainingDiverged, load_config
from gpt2kit.training.trainer import held_out
from gpt2kit.training.logging import flops_per_token, peak_flops, read_metrics
from gpt2kit.training.optim import build_optimizer, lr_at, param_groups
from gpt2kit.training.checkpoints import list_checkpoints, verify_checkpoint

from .conftest import DATA

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32, "vocab_size": 64}
QUIET = {"progress": False, "tensorboard": False, "plot": False}

pytestmark = pytest.mark.usefixtures("one_thread")


class Sequences(Dataset):
    """Learnable token windows: x[t+1] = (5 x[t] + 3) mod 64, from random starts."""

    def __init__(self, n: int = 64, seq_len: int = 16, seed: int = 0) -> None:
        starts = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))
        rows = [starts]
        for _ in range(seq_len):
            rows.append((5 * rows[-1] + 3) % 64)
        self.data = torch.stack(rows, 1)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i, :-1], "targets": self.data[i, 1:]}


def run_config(tmp_path: Path, **sections):
    values = {"out_dir": str(tmp_path / "run"), "model": {"name": "gpt2-tiny", "config": dict(TINY)},
              "train": {"max_steps": 10, "micro_batch_size": 8}, "optim": {"lr": 3e-3, "warmup_steps": 0},
              "log": dict(QUIET)}
    for key, value in sections.items():
        values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
    return load_config(**values)


def test_a_few_steps_reduce_the_loss(tmp_path):
    trainer = Trainer(args=run_config(tmp_path, train={"max_steps": 30}), train_dataset=Sequences(),
                      eval_dataset=Sequences(16, seed=1))
    before = trainer_eval_loss(tmp_path)
    summary = trainer.train()
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert summary["val_loss"] < before - 1.0
    assert summary["tokens_seen"] == 30 * 8 * 16
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "final")
    for (name, a), b in zip(trainer.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_list_of_items_trains_as_the_same_torch_dataset_does(tmp_path):
    """Any map-style dataset is data (a list, a Hugging Face datasets.Dataset); it was taken for a path."""
    losses = []
    for kind, data in (("torch", Sequences(32)), ("list", [Sequences(32)[i] for i in range(32)])):
        Trainer(args=run_config(tmp_path / kind, train={"max_steps": 3}), train_dataset=data).train()
        losses.append([r["train_loss"] for r in read_metrics(tmp_path / kind / "run" / "metrics.jsonl")
                       if "train_loss" in r])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    with pytest.raises(TypeError, match="^eval_dataset: expected a path or a map-style dataset .*, got generator"):
        Trainer(args=run_config(tmp_path), train_dataset=Sequences(), eval_dataset=(x for x in Sequences()))


def test_items_in_transformers_causal_lm_form_train_as_shifted_targets(tmp_path):
    """input_ids + labels (aligned with input_ids, as transformers' data collators write them) + attention_mask:
    labels were taken for class labels (int() of a sequence)."""
    rows = Sequences(32).data
    hf_items = [{"input_ids": row[:-1], "labels": row[:-1].clone(), "attention_mask": torch.ones(16)} for row in rows]
    ours = [{"input_ids": row[:-1], "targets": torch.cat([row[1:-1], torch.tensor([-100])])} for row in rows]
    losses = []
    for kind, data in (("ours", ours), ("hf", hf_items)):
        Trainer(args=run_config(tmp_path / kind, train={"max_steps": 3}), train_dataset=data).train()
        losses.append([r["train_loss"] for r in read_metrics(tmp_path / kind / "run" / "metrics.jsonl")
                       if "train_loss" in r])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def trainer_eval_loss(tmp_path) -> float:
    """Validation loss of the weights the trainer starts from (it seeds with the run's seed, then builds)."""
    torch.manual_seed(1234)
    model = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny", **TINY)).eval()
    data = Sequences(16, seed=1).data
    with torch.no_grad():
        return float(model(data[:, :-1], targets=data[:, 1:]).loss)


class Ragged(Dataset):
    """Variable-length items with prompt-masked targets, like instruction data."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(3)
        self.items = []
        for i in range(n):
            length = 4 + i * 2
            ids = torch.randint(0, 64, (length + 1,), generator=g)
            targets = ids[1:].clone()
            targets[: i % 4] = -100
            self.items.append({"input_ids": ids[:-1], "targets": targets})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_fp16_with_grad_scaler_trains_and_saves_the_scaler(tmp_path, monkeypatch):
    """The path GPUs without bf16 take (fp16 autocast + GradScaler) runs on the CPU too, so it is tested here.
    Its MFU is taken against a float16 peak (it was bf16's: inflated where bf16 is emulated)."""
    import gpt2kit.training.trainer as trainer_module

    peaks = []
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device, dtype: peaks.append(dtype) or (1e9, "test"))
    config = run_config(tmp_path, train={"max_steps": 30, "precision": "fp16"},
                        checkpoint={"save_interval": 30})
    trainer = Trainer(args=config, train_dataset=Sequences())
    trainer.train()
    assert peaks == [torch.float16]
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert trainer.precision == "fp16" and trainer.scaler.is_enabled()
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    state = torch.load(list_checkpoints(tmp_path / "run")[-1] / "training_state" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0


@pytest.mark.parametrize("dataset", [Sequences(8), Ragged(8)], ids=["windows", "ragged"])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(tmp_path, dataset):
    from gpt2kit.data import collate

    items = [dataset[i] for i in range(8)]
    grads = {}
    for k in (1, 4):
        trainer = Trainer(args=run_config(tmp_path / str(k)), train_dataset=dataset)
        trainer._setup(weights=None)
        trainer.model.eval()  # dropout off: compare the arithmetic alone
        size = 8 // k
        micro = [collate(items[i * size:(i + 1) * size], 0) for i in range(k)]
        loss = trainer.backward(micro)
        grads[k] = (float(loss), {n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    (loss1, g1), (loss4, g4) = grads[1], grads[4]
    assert loss1 == pytest.approx(loss4, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lr_schedule_warmup_cosine_linear_constant():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(0, decay="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, decay="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, decay="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, decay="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(60, decay="linear", **kw) == pytest.approx(0.55)
    assert lr_at(35, decay="linear", **kw) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr_at(35, decay="cosine", **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, decay="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(500, decay="linear", **kw) == pytest.approx(0.1)
    assert lr_at(500, decay="constant", **kw) == pytest.approx(1.0)


def test_scheduler_drives_the_optimizer(tmp_path):
    config = run_config(tmp_path, train={"max_steps": 20},
                        optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": None, "warmup_rate": 0.25,
                               "decay": "linear"})
    trainer = Trainer(args=config, train_dataset=Sequences())
    trainer.train()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    expected = [lr_at(s, lr=1e-2, min_lr=1e-3, warmup_steps=5, decay_steps=20, decay="linear") for s in range(20)]
    assert lrs == pytest.approx(expected)


def test_param_groups_decay_matrices_only(tiny_model):
    groups = param_groups(tiny_model, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"bias", "weight"}
    assert all("ln_" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == tiny_model.num_parameters()  # the tied LM head is counted once
    optimizer = build_optimizer(tiny_model, load_config(train={"max_steps": 1}).optim)
    assert optimizer.defaults["fused"] is True
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_recompute_gives_the_same_losses_with_dropout(tmp_path):
    losses = {}
    for recompute in (False, True):
        config = run_config(tmp_path / str(recompute), train={"max_steps": 4, "recompute": recompute},
                            model={"config": {**TINY, "resid_pdrop": 0.1, "attn_pdrop": 0.1, "embd_pdrop": 0.1}})
        trainer = Trainer(args=config, train_dataset=Sequences())
        trainer.train()
        losses[recompute] = [r["train_loss"] for r in read_metrics(trainer.out_dir / "metrics.jsonl")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_saved_weights_of_a_compiled_model_have_no_orig_mod_prefix(tiny_model, tmp_path):
    compiled = torch.compile(tiny_model)  # lazy: nothing is compiled until it runs
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    state = gpt2kit_to_hf(compiled)
    assert not any("_orig_mod" in k for k in state)
    assert set(state) == set(gpt2kit_to_hf(tiny_model))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poisoned(Trainer):
        def _forward(self, batch, model=None):
            out = super()._forward(batch, model)
            if self.step == 3:
                out.loss = out.loss * float("nan")
            return out

    config = run_config(tmp_path, train={"max_steps": 10}, checkpoint={"save_interval": 2})
    trainer = Poisoned(args=config, train_dataset=Sequences())
    with pytest.raises(TrainingDiverged, match=r"step 4: loss is nan.*step-00000002"):
        trainer.train()
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step-00000002"]
    assert verify_checkpoint(checkpoints[0])["step"] == 2
    state = GPT2LMHeadModel.from_pretrained(checkpoints[0]).state_dict()
    assert all(torch.isfinite(t).all() for t in state.values())


def test_mfu_flops_and_best_measured_cpu_peak(monkeypatch, tmp_path):
    config = GPT2Config.from_name("gpt2")
    # nanoGPT's estimate for GPT-2 124M at 1024 tokens: 6N + 12 L H Q T with N = 124.4M (no wpe).
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(config, n, 1024) == pytest.approx(6 * n + 12 * 12 * 768 * 1024)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e8 and "measured" in source
    import gpt2kit.training.logging as logging_module

    monkeypatch.setattr(logging_module, "measure_matmul_peak", lambda *a, **k: peak / 2)  # a busy machine
    assert peak_flops(torch.device("cpu"), torch.float32)[0] == peak
    monkeypatch.setattr(logging_module, "measure_matmul_peak", lambda *a, **k: peak * 2)
    assert peak_flops(torch.device("cpu"), torch.float32)[0] == peak * 2
    # A damaged cache (valid JSON of another shape, a value that is no number) is measured anew, never a failed run.
    cache = tmp_path / "gpt2kit" / "matmul_peak.json"
    for damaged in ("[1]", '"text"', "[" * 100000 + "]" * 100000):
        cache.write_text(damaged)
        assert peak_flops(torch.device("cpu"), torch.float32)[0] == peak * 2
    keys = list(json.loads(cache.read_text()))  # remeasured into the damaged file's place: this machine's key
    assert len(keys) == 1
    for value in ("fast", None, float("nan")):
        cache.write_text(json.dumps({keys[0]: value}))
        assert peak_flops(torch.device("cpu"), torch.float32)[0] == peak * 2


def test_logs_tensorboard_jsonl_and_loss_plot(tmp_path):
    config = run_config(tmp_path, train={"max_steps": 6, "eval_interval": 3}, log={"tensorboard": True, "plot": True})
    Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1)).train()
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert {"train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "tokens_seen"} <= set(records[1])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_loss"] == min(r["val_loss"] for r in records if "val_loss" in r)
    events = tensorboard_scalars(run / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "val/loss",
            "val/ppl"} <= set(events)  # the tags docs/training.md lists
    assert events["train/loss"] == [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    config = run_config(tmp_path, train={"max_steps": 4}, log={"tensorboard": True, "plot": False})
    Trainer(args=config, train_dataset=Sequences()).train()  # afresh in the same out_dir: the old curve goes
    assert tensorboard_scalars(run / "tensorboard")["train/loss"] == [1, 2, 3, 4]


def test_subset_evaluations_are_logged_and_plotted_apart_from_whole_set_ones(tmp_path):
    """Periodic evaluations of eval_batches and the final whole-set one were one val_loss curve: its last segment
    drew the change of set as a change of the model."""
    from matplotlib.image import imread

    config = run_config(tmp_path, train={"max_steps": 4, "eval_interval": 2, "eval_batches": 1},
                        log={"tensorboard": True, "plot": True})  # 1 batch of 8 out of 16 examples
    Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1)).train()
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "val_subset_loss" in r] == [0, 2]  # the last step: the whole set
    assert [r["step"] for r in records if "val_loss" in r] == [4]
    assert {"val/subset_loss", "val/subset_ppl", "val/loss"} <= set(tensorboard_scalars(run / "tensorboard"))
    image = torch.from_numpy(imread(run / "loss.png")[..., :3].copy())
    for colour in ("#ff7f0e", "#2ca02c"):  # matplotlib's second and third colours: subset, whole set
        rgb = torch.tensor([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
        assert ((image - rgb).abs().max(-1).values < 0.05).sum() > 20, colour


def tensorboard_scalars(directory: Path) -> dict[str, list[int]]:
    """Tag -> steps, as TensorBoard shows them (events of a purged run left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory)).Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _sentiment_file(path: Path, n: int, seed: int) -> Path:
    """An easy synthetic SST-2-style task: the label is whether the sentence contains a positive word."""
    import random

    rng = random.Random(seed)
    filler = "the a movie film plot actor scene story it was and with very quite rather".split()
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(filler, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(["wonderful", "great", "superb"] if label
                                                              else ["awful", "boring", "terrible"]))
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_classification_learns_an_easy_task(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []  # the loss plot's y label: a classifier's loss is per example, not per token
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, label, **kwargs: labels.append(label))
    train = _sentiment_file(tmp_path / "train.tsv", 256, seed=0)
    with train.open("a") as f:  # longer than the context: cut to it (data.max_length defaults to n_positions)
        f.write("the movie was " + "great " * 50 + "\t1\n")
    dev = _sentiment_file(tmp_path / "dev.tsv", 64, seed=1)
    config = run_config(tmp_path, task="text_classification",
                        model={"config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32}},
                        data={"train": str(train), "val": str(dev), "format": "sst2"},
                        train={"max_steps": 60, "micro_batch_size": 16}, optim={"lr": 3e-3}, log={"plot": True})
    trainer = Trainer(args=config)
    summary = trainer.train()
    assert summary["val_accuracy"] >= 0.9, summary
    assert labels == ["loss (nats / example)"]
    assert trainer.predict(["the movie was wonderful", "the plot was terrible"]) == ["positive", "negative"]
    # Texts are prepared as in training: stripped (not classified on a trailing space) and cut to the context.
    assert trainer.predict(["the movie was wonderful  "]) == trainer.predict(["the movie was wonderful"])
    assert len(trainer.predict(["the plot was terrible " * 20])) == 1
    with pytest.raises(ValueError, match="text 1 is empty"):
        trainer.predict(["fine", "   "])
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    assert Trainer(task="text_classification", model=str(final)).evaluate(dev)["val_accuracy"] == \
        pytest.approx(summary["val_accuracy"])
    # A config.json listing its classes out of id order (as any JSON writer may) scores the same.
    shuffled = tmp_path / "shuffled"
    shutil.copytree(final, shuffled)
    values = json.loads((shuffled / "config.json").read_text())
    values["id2label"] = {"1": "positive", "0": "negative"}
    (shuffled / "config.json").write_text(json.dumps(values))
    assert Trainer(task="text_classification", model=str(shuffled)).evaluate(dev)["val_accuracy"] == \
        pytest.approx(summary["val_accuracy"])
    # transformers' pipeline batches the saved classifier: its tokenizer names a pad token (the EOS one).
    texts = ["the movie was wonderful", "the plot was terrible and the acting was boring"]
    theirs = transformers.pipeline("text-classification", model=str(final), batch_size=2)(texts)
    assert [r["label"] for r in theirs] == trainer.predict(texts)


def test_keep_best_keeps_the_model_of_the_lowest_validation_loss(tmp_path, monkeypatch):
    config = run_config(tmp_path, train={"max_steps": 8, "eval_interval": 2}, checkpoint={"keep_best": True})
    losses = iter([3.0, 2.0, 2.5, 1.5, 4.0])  # whole-set evaluations at steps 0, 2, 4, 6 and the final one at 8
    trainer = Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1))
    saved = {}
    evaluate = trainer._evaluate_dataset

    def scripted(dataset, max_batches=None):
        result = {**evaluate(dataset, max_batches), "val_loss": next(losses)}
        saved[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return result

    monkeypatch.setattr(trainer, "_evaluate_dataset", scripted)
    summary = trainer.train()
    best = tmp_path / "run" / "best"
    assert summary["best_model"] == str(best) and summary["best_val_loss"] == 1.5
    assert sorted(saved) == [0, 2, 4, 6, 8]
    assert json.loads((best / "val_metrics.json").read_text())["step"] == 6
    reloaded = GPT2LMHeadModel.from_pretrained(best).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in saved[6].items())
    assert not torch.equal(GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "final").transformer.wte.weight,
                           reloaded["transformer.wte.weight"])
    # Resumed with keep_best new to it, a run that never beats the best it resumed with names no best/.
    resumed = tmp_path / "resumed"
    Trainer(args=run_config(resumed, train={"max_steps": 2}), train_dataset=Sequences(),
            eval_dataset=Sequences(16, seed=1)).train()
    config = run_config(resumed, train={"max_steps": 3}, checkpoint={"keep_best": True, "resume": "auto"})
    trainer = Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1))
    monkeypatch.setattr(trainer, "_evaluate_dataset", lambda dataset, max_batches=None: {"val_loss": 99.0,
                                                                                         "val_ppl": 1e43})
    assert "best_model" not in trainer.train() and not (resumed / "run" / "best").exists()
    with pytest.raises(ValueError, match="checkpoint.keep_best: no validation data"):
        Trainer(args=run_config(tmp_path / "novalidation", checkpoint={"keep_best": True}),
                train_dataset=Sequences()).train()


def test_sentence_pairs_train_and_evaluate_by_their_columns(tmp_path):
    """An RTE-style file: label 1 when the two sentences share their first word."""
    import random

    rng = random.Random(0)
    words = "red blue green cat dog sun moon tree rock sea".split()
    rows = ["index\tpremise\thypothesis\tlabel"]
    for i in range(160):
        a, b = rng.sample(words, 2)
        same = rng.random() < 0.5
        rows.append(f"{i}\t{a} {rng.choice(words)}\t{a if same else b} {rng.choice(words)}\t{int(same)}")
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(rows) + "\n")
    config = run_config(tmp_path, task="text_classification",
                        model={"config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
                        data={"train": str(data), "text_key": "premise", "text_pair_key": "hypothesis",
                              "val_fraction": 0.25},
                        train={"max_steps": 4, "micro_batch_size": 8})
    trainer = Trainer(args=config)
    summary = trainer.train()
    example = trainer._datasets["train"].dataset[0]["input_ids"]
    assert "\n" in trainer.tokenizer.decode(example)  # the pair's two sentences, one per line
    report = main(["eval", "--model", str(tmp_path / "run" / "final"), "--task", "classification", "--data",
                   str(data), "--text-key", "premise", "--text-pair-key", "hypothesis"])
    assert report == 0 and "val_accuracy" in summary
    with pytest.raises(ConfigError, match="data.text_pair_key: sentence pairs are text_classification data"):
        run_config(tmp_path, data={"text_pair_key": "hypothesis"})


def test_val_fraction_holds_out_examples_of_a_dataset_passed_in(tmp_path):
    config = run_config(tmp_path, train={"max_steps": 2}, data={"val_fraction": 0.25})
    trainer = Trainer(args=config, train_dataset=Sequences(64))
    summary = trainer.train()
    assert (len(trainer._datasets["train"]), len(trainer._datasets["val"])) == (48, 16) and "val_loss" in summary
    with pytest.raises(ValueError, match="data.val_fraction holds out validation examples when there is no data.val"):
        Trainer(args=config, train_dataset=Sequences(64), eval_dataset=Sequences(16, seed=1)).train()


def test_val_fraction_of_raw_pretraining_text_is_never_lost_or_ignored(tmp_path):
    """With data.val too, the held-out documents were neither trained nor validated on; with a directory already
    tokenized, val_fraction was ignored (no validation at all). Both are errors, before any tokenizing."""
    text = DATA / "the-verdict" / "the-verdict.txt"
    config = run_config(tmp_path, train={"max_steps": 1},
                        data={"train": str(text), "val": str(text), "val_fraction": 0.2, "format": "paragraphs"})
    with pytest.raises(ValueError, match="data.val_fraction holds out validation examples when there is no data.val"):
        Trainer(args=config).train()
    assert not (tmp_path / "run" / "data").exists()
    preprocess([text], tmp_path / "tokens", format="paragraphs", workers=1, progress=False)
    config = run_config(tmp_path, train={"max_steps": 1}, data={"train": str(tmp_path / "tokens"), "val_fraction": 0.2})
    with pytest.raises(ValueError, match="data.val_fraction .* is already tokenized: its own 'val' split is used"):
        Trainer(args=config).train()


def test_a_tokenizer_trained_for_a_classification_file(tmp_path):
    """data.tokenizer_vocab_size learns from the file as text (the table refusal of raw corpora broke this)."""
    train = _sentiment_file(tmp_path / "train.tsv", 40, seed=0)
    config = run_config(tmp_path, task="text_classification", data={"train": str(train), "tokenizer_vocab_size": 300},
                        model={"config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
                        train={"max_steps": 1, "micro_batch_size": 8})
    trainer = Trainer(args=config)
    trainer.train()
    assert trainer.tokenizer.vocab_size == 300


def test_val_fraction_holds_out_classification_examples(tmp_path):
    """It was silently ignored outside pretraining: no validation at all."""
    train = _sentiment_file(tmp_path / "train.tsv", 40, seed=0)
    config = run_config(tmp_path, task="text_classification",
                        model={"config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
                        data={"train": str(train), "format": "sst2", "val_fraction": 0.25},
                        train={"max_steps": 2, "micro_batch_size": 8})
    trainer = Trainer(args=config)
    summary = trainer.train()
    train_split, val_split = trainer._datasets["train"], trainer._datasets["val"]
    assert (len(train_split), len(val_split)) == (30, 10) and "val_accuracy" in summary
    assert not set(train_split.indices) & set(val_split.indices)
    assert train_split.id2label == {0: "negative", 1: "positive"}  # the data set's attributes
    assert held_out(train_split.dataset, 0.25, config.seed)[1].indices == val_split.indices  # seeded
    config.data.val = str(train)
    with pytest.raises(ValueError, match="data.val_fraction holds out validation examples when there is no data.val"):
        Trainer(args=config).train()


def finetune_first_batch(trainer: Trainer, tmp_path: Path) -> tuple[int, list[float]]:
    """Finetune; then the learned targets of the first batch and the run's training losses."""
    trainer.finetune()
    trainer.sampler.set_epoch(0)
    learned = trainer._loss_weight(next(iter(trainer.train_loader)))
    return learned, [r["train_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]


def test_chat_finetune_learns_replies_in_the_models_chat_template(tmp_path):
    """The transformers recipe for chat: add the template's markers as special tokens, resize, train on
    conversations (data.format: chat); the run saves the template and tokens, and chat prompts the model as
    training wrote the conversations."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    conversations = [{"messages": [{"role": "user", "content": f"Say yes to {w}."},
                                   {"role": "assistant", "content": "Yes"}]} for w in ("apple", "river", "stone") * 5]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in conversations))
    tok = GPT2Tokenizer.gpt2()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny", n_layer=2, n_embd=64, n_head=4, n_positions=64))
    model.resize_token_embeddings(len(tok))
    config = run_config(tmp_path, data={"train": str(data), "format": "chat", "max_length": 64},
                        train={"max_steps": 60, "micro_batch_size": 4}, optim={"lr": 1e-2})
    learned, losses = finetune_first_batch(Trainer(model=model, args=config, tokenizer=tok), tmp_path)
    assert learned == 4 * 3  # per conversation: the word, <|im_end|> and "\n" (chat stops at <|im_end|>)
    assert losses[-1] < 0.3 * losses[0]
    final = tmp_path / "run" / "final"
    chat = pipeline("text_generation", model=str(final))
    assert chat.tokenizer.chat_template == template and len(chat.tokenizer) == 50259
    [reply] = chat([{"role": "user", "content": "Say yes to cloud."}], max_new_tokens=6, do_sample=False,
                   return_full_text=False)
    # The reply, then the template's end of turn, where the reply stops (it is not shown).
    assert chat.tokenizer.chat_format().end_of_turn == "<|im_end|>"
    assert reply["generated_text"] == "Yes"
    # The end-of-turn token ends a reply as EOS does, so beam search (which takes no stop strings) ends there too.
    [beamed] = chat([{"role": "user", "content": "Say yes to cloud."}], max_new_tokens=6, num_beams=2,
                    return_full_text=False)
    assert beamed["generated_text"] == "Yes"


def test_instruction_finetune_masks_the_prompt(tmp_path):
    records = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
               for w in ("apple", "river", "stone", "cloud") * 4]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    base = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny", n_layer=2, n_embd=64, n_head=4, n_positions=64))
    base.save_pretrained(tmp_path / "base")
    config = run_config(tmp_path, model={"name": str(tmp_path / "base"), "config": {}},
                        data={"train": str(data), "format": "alpaca", "max_length": 64},
                        train={"max_steps": 20, "micro_batch_size": 4}, optim={"lr": 1e-2})
    given = GPT2Tokenizer.gpt2()
    trainer = Trainer(args=config, tokenizer=given)
    learned, losses = finetune_first_batch(trainer, tmp_path)
    # Only response tokens (and EOS) are scored: "apple apple<|endoftext|>" is 3 tokens per example.
    assert learned == 4 * 3
    assert losses[-1] < 0.5 * losses[0]
    # evaluate() on an instruction file scores it as training does (it was read as documents with a "text" key).
    scored = trainer._evaluate_dataset(InstructionDataset(data, trainer.tokenizer, max_length=64))
    assert trainer.evaluate(data) == scored
    # The model is saved with the format it learned, so chat prompts it as training did and the reply ends at EOS.
    final = tmp_path / "run" / "final"
    assert json.loads((final / "tokenizer_config.json").read_text())["chat_template"] == ALPACA.template
    chat = pipeline("text_generation", model=str(final))
    prompt = chat.tokenizer.apply_chat_template([{"role": "user", "content": "Repeat the word stone."}],
                                                tokenize=False)
    assert prompt == alpaca_prompt("Repeat the word stone.")
    [reply] = chat([{"role": "user", "content": "Repeat the word stone."}], max_new_tokens=8,
                   return_full_text=False)
    assert reply["generated_text"] == chat(prompt, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    assert given.chat_template is None  # the caller's tokenizer is left as it was


def test_instruction_examples_left_out_are_reported_and_all_left_out_is_an_error(tmp_path, capsys):
    records = [{"instruction": "Say yes.", "input": "", "output": "yes"}] * 8
    records[0] = {"instruction": "Say yes. " * 30, "input": "", "output": "yes"}  # a prompt past 48 tokens
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny", n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "base")
    config = run_config(tmp_path, model={"name": str(tmp_path / "base"), "config": {}},
                        data={"train": str(data), "format": "alpaca", "max_length": 48},
                        train={"max_steps": 1, "micro_batch_size": 4})
    Trainer(args=config).finetune()
    err = capsys.readouterr().err
    assert "data.train: 1 of 8 examples have no response token within their first 48 tokens (data.max_length)" in err
    config = run_config(tmp_path, model={"name": str(tmp_path / "base"), "config": {}},
                        data={"train": str(data), "format": "alpaca", "max_length": 8},
                        train={"max_steps": 1, "micro_batch_size": 4})
    with pytest.raises(ValueError, match="data.train: 8 of 8 examples .* none is left; raise data.max_length"):
        Trainer(args=config).finetune()


def test_raw_text_with_invalid_utf8_trains_under_data_errors_replace(tmp_path):
    """The error advised --errors replace, which training had no key for."""
    text = tmp_path / "latin1.txt"
    text.write_bytes((DATA / "the-verdict" / "the-verdict.txt").read_bytes()[:4000] + "caf\u00e9\n".encode("latin-1"))
    model = {"config": {**TINY, "vocab_size": 50257}}  # GPT-2's tokenizer
    config = run_config(tmp_path, data={"train": str(text), "seq_len": 32}, train={"max_steps": 1}, model=model)
    with pytest.raises(ValueError, match=r"latin1.txt:\d+: invalid UTF-8 .*training data.errors: replace"):
        Trainer(args=config).train()
    config = run_config(tmp_path, data={"train": str(text), "seq_len": 32, "errors": "replace"},
                        train={"max_steps": 1}, model=model)
    Trainer(args=config).train()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 1
    with pytest.raises(ValueError, match="data.errors: expected strict or replace, got 'ignore'"):
        run_config(tmp_path, data={"errors": "ignore"})


def test_finetune_needs_weights(tmp_path):
    with pytest.raises(ValueError, match="finetune needs pretrained weights"):
        Trainer(args=run_config(tmp_path), train_dataset=Sequences()).finetune()


@pytest.mark.parametrize("overrides, message", [
    ({"n_head": 3}, r"model.config.n_embd: n_embd \(64\) must be divisible by n_head \(3\)"),
    ({"n_layer": 0}, r"model.config.n_layer: n_layer must be an integer >= 1, got 0"),
    ({"n_layer": "two"}, r"config: model.config.n_layer: expected int, got 'two'"),
    ({"activation_function": "relu"}, r"model.config.activation_function: activation_function 'relu' is not"),
])
def test_model_config_overrides_are_checked_as_a_new_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(args=run_config(tmp_path, model={"config": {**TINY, **overrides}}), train_dataset=Sequences()).train()


def test_a_new_run_in_an_old_out_dir_replaces_its_later_checkpoints(tmp_path, capsys):
    """An earlier, longer run left checkpoints past this run's steps: they go at the start, so keep_last never
    deletes what this run writes and --resume auto cannot pick up the other run."""
    save = {"save_interval": 2, "keep_last": 2}
    Trainer(args=run_config(tmp_path, train={"max_steps": 8}, checkpoint=save), train_dataset=Sequences()).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000006", "step-00000008"]
    # Killed while publishing step 8: its sealed copy hidden, which the first save put back in its place.
    root = tmp_path / "run" / "checkpoints"
    os.replace(root / "step-00000008", root / ".step-00000008.partial-4242")
    trainer = Trainer(args=run_config(tmp_path, train={"max_steps": 4}, optim={"lr": 1e-3}, checkpoint=save),
                      train_dataset=Sequences())
    trainer.train()
    assert "removed 2 checkpoint(s) past step 0 left by an earlier run" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    assert trainer.last_checkpoint.is_dir()


def test_cached_tokenizer_and_token_data_follow_the_config(tmp_path, capsys):
    """out_dir/data and a trained tokenizer are reused only while what built them is unchanged: a new vocabulary
    size retrains the tokenizer and re-tokenizes; other training text re-tokenizes; an unchanged rerun reuses."""
    from gpt2kit.data import read_meta

    text = (Path(__file__).parent.parent / "examples" / "data" / "the-verdict" / "the-verdict.txt").read_text()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(text[:len(text) // 2])
    second.write_text(text[len(text) // 2:])

    def run(corpus: Path, vocab_size: int) -> dict:
        config = run_config(tmp_path, model={"name": "gpt2-tiny", "config": {**TINY, "vocab_size": 512}},
                            train={"max_steps": 1, "micro_batch_size": 2},
                            data={"train": str(corpus), "seq_len": 16, "tokenizer": str(tmp_path / "tok"),
                                  "tokenizer_vocab_size": vocab_size})
        Trainer(args=config).train()
        return read_meta(tmp_path / "run" / "data")

    meta = run(first, 300)
    assert (meta["tokenizer"]["vocab_size"], meta["sources"][0]["path"]) == (300, str(first))
    stamp = (tmp_path / "run" / "data" / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run(first, 300) == meta and (tmp_path / "run" / "data" / "meta.json").stat().st_mtime_ns == stamp
    assert "tokenizing again" not in capsys.readouterr().err
    meta = run(first, 400)
    assert meta["tokenizer"]["vocab_size"] == 400 and "tokenizing again" in capsys.readouterr().err
    meta = run(second, 400)
    record = json.loads((tmp_path / "tok" / "tokenizer_training.json").read_text())
    assert meta["sources"][0]["path"] == record["inputs"][0]["path"] == str(second)
    # A run stopped after retraining the tokenizer, before tokenizing: the next one sees the new vocabulary's
    # contents differ from what out_dir/data was made with.
    train_tokenizer([second], tmp_path / "tok", vocab_size=350, progress=False)
    assert run(second, 350)["tokenizer"]["vocab_size"] == 350


def test_a_trained_tokenizer_goes_into_the_run_by_default(tmp_path):
    """The demo configs named runs/demo/tokenizer: a run given another out_dir retrained the demo's tokenizer."""
    text = Path(__file__).parent.parent / "examples" / "data" / "the-verdict" / "the-verdict.txt"
    config = run_config(tmp_path, model={"name": "gpt2-tiny", "config": {**TINY, "vocab_size": 300}},
                        train={"max_steps": 1, "micro_batch_size": 2}, out_dir=str(tmp_path / "elsewhere"),
                        data={"train": str(text), "seq_len": 16, "tokenizer_vocab_size": 300})
    trainer = Trainer(args=config)
    trainer.train()
    assert config.data.tokenizer == str(tmp_path / "elsewhere" / "tokenizer")
    saved = GPT2Tokenizer.from_file(tmp_path / "elsewhere" / "tokenizer")
    assert saved.vocab_size == 300 and saved.fingerprint() == trainer.tokenizer.fingerprint()


def test_resume_continues_when_the_checkpoint_position_is_past_this_runs_epoch(tmp_path):
    """10 examples in steps of 2 consumed a whole epoch (position 10); resumed with steps of 4 an epoch is 8
    examples: the run goes on with the next epoch instead of refusing the position."""
    save = {"save_interval": 5}
    Trainer(args=run_config(tmp_path, train={"max_steps": 5, "micro_batch_size": 2}, checkpoint=save),
            train_dataset=Sequences(10)).train()
    config = run_config(tmp_path, train={"max_steps": 7, "micro_batch_size": 2, "global_batch_size": 4})
    trainer = Trainer(args=config, train_dataset=Sequences(10))
    assert trainer.train(resume="auto")["steps"] == 7
    assert trainer.sampler.epoch == 1


def test_lengths_are_checked_before_any_work_and_the_sample_fits_the_context(tmp_path, corpus):
    model = {"name": "gpt2-tiny", "config": {**TINY, "vocab_size": 320}}
    too_long = run_config(tmp_path, model=model, data={"train": str(corpus), "seq_len": 64})
    with pytest.raises(ValueError, match=r"data.seq_len: 64 is longer than the model's context \(n_positions=32\)"):
        Trainer(args=too_long).train()
    assert not (tmp_path / "run").exists()
    prompt = run_config(tmp_path, model=model, data={"train": str(corpus)}, sample={"prompt": "I had " * 40})
    with pytest.raises(ValueError, match=r"sample.prompt: \d+ tokens leave no room in the model's context of 32"):
        Trainer(args=prompt).train()
    config = run_config(tmp_path, model=model, data={"train": str(corpus)}, train={"max_steps": 1},
                        sample={"prompt": "I had", "max_new_tokens": 500})  # more than the context holds
    trainer = Trainer(args=config)
    assert trainer.train()["sample"].startswith("I had")
    cached, uncached = (trainer.predict(["I had", "The"], max_new_tokens=3, use_cache=flag) for flag in (True, False))
    assert cached == uncached and len(cached) == 2


def test_a_device_this_machine_lacks_is_one_error_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"train.device: expected auto, cpu, cuda or cuda:N, got 'blah'"):
        Trainer(args=run_config(tmp_path, train={"device": "blah"}), train_dataset=Sequences())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"train.device: device cuda: this machine .* has no CUDA GPU"):
            Trainer(args=run_config(tmp_path, train={"device": "cuda"}), train_dataset=Sequences())


def test_a_resumed_run_uses_its_configs_optimizer_settings(tmp_path):
    """lr, weight_decay, betas and eps come from the resumed run's config, at its schedule's rate for the step."""
    first = run_config(tmp_path, train={"max_steps": 4}, checkpoint={"save_interval": 2},
                       optim={"lr": 1e-3, "decay": "linear", "min_lr": 0.0})
    Trainer(args=first, train_dataset=Sequences()).train()
    for checkpoint in list_checkpoints(tmp_path / "run")[1:]:
        shutil.rmtree(checkpoint)  # resume from step 2
    second = run_config(tmp_path, train={"max_steps": 8}, checkpoint={"save_interval": 2},
                        optim={"lr": 2e-3, "decay": "linear", "min_lr": 0.0, "weight_decay": 0.05,
                               "betas": [0.8, 0.9], "eps": 1e-6})
    trainer = Trainer(args=second, train_dataset=Sequences())
    trainer.train(resume="auto")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r and r["step"] > 2]
    assert lrs == pytest.approx([lr_at(s, lr=2e-3, min_lr=0.0, warmup_steps=0, decay_steps=8, decay="linear")
                                 for s in range(2, 8)])
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in groups)


def test_resuming_with_another_model_shape_or_precision(tmp_path):
    config = run_config(tmp_path, train={"max_steps": 2}, checkpoint={"save_interval": 2})
    Trainer(args=config, train_dataset=Sequences()).train()
    wider = run_config(tmp_path, model={"name": "gpt2-tiny", "config": {**TINY, "n_layer": 3, "n_embd": 32}},
                       train={"max_steps": 4})
    with pytest.raises(CheckpointError, match=r"step-00000002: saved from another model shape than this run's "
                                              r"\(n_layer 2 -> 3, n_embd 64 -> 32, mlp_dim 256 -> 128\)"):
        Trainer(args=wider, train_dataset=Sequences()).train(resume="auto")
    # Saved without fp16, its GradScaler state is empty: an fp16 run (or precision auto picking fp16 on an older
    # GPU) resumes with a fresh scaler.
    fp16 = run_config(tmp_path, train={"max_steps": 4, "precision": "fp16"})
    trainer = Trainer(args=fp16, train_dataset=Sequences())
    assert trainer.train(resume="auto")["steps"] == 4
    assert trainer.scaler.is_enabled()


def test_a_finished_run_resumed_logs_its_final_evaluation_once(tmp_path):
    config = run_config(tmp_path, train={"max_steps": 4, "eval_interval": 2}, checkpoint={"save_interval": 2})
    Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1)).train()
    Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1)).train(resume="auto")
    evaluated = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert evaluated == [0, 2, 4]
    # Killed between its last checkpoint (step 4) and the final evaluation: the resumed run logs it, and the
    # best validation loss counts it.
    metrics = tmp_path / "run" / "metrics.jsonl"
    records = read_metrics(metrics)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records if not (r["step"] == 4 and "val_loss" in r)))
    Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1)).train(resume="auto")
    val = [(r["step"], r["val_loss"]) for r in read_metrics(metrics) if "val_loss" in r]
    assert [step for step, _ in val] == [0, 2, 4]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_val_loss"] == min(loss for _, loss in val) <= summary["val_loss"]


def test_metrics_are_standard_json_and_a_single_point_is_plotted(tmp_path):
    from matplotlib.image import imread

    from gpt2kit.training.logging import MetricsLogger, plot_losses

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"train_loss": 2.5, "grad_norm": float("inf"), "lr": float("nan")})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    record = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert record["grad_norm"] == float("inf") and record["lr"] != record["lr"] and record["train_loss"] == 2.5
    image = imread(plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png"))[..., :3]
    train_colour = torch.tensor([0x1F, 0x77, 0xB4]) / 255 * 0.8 + 0.2  # matplotlib's first colour at alpha 0.8
    drawn = (torch.from_numpy(image.copy()) - train_colour).abs().max(-1).values < 0.05
    assert drawn.sum() > 20  # the point's marker (the legend's line alone is not enough)


class Ragged(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        ids = torch.arange(4 + i % 3) % 64
        return {"input_ids": ids, "targets": ids}


def test_padding_of_a_small_vocabulary_stays_inside_it(tmp_path):
    """The caller's data set with a 64-token model: GPT-2's pad id 50256 would fail in the embedding."""
    Trainer(args=run_config(tmp_path, train={"max_steps": 2, "micro_batch_size": 4}), train_dataset=Ragged()).train()


@pytest.mark.parametrize("epochs, steps", [(0.07, 7), (0.28, 28), (1, 100), (0.071, 8)])
def test_epochs_count_steps_in_exact_decimals(tmp_path, epochs, steps):
    """0.07 x 100 is 7.000000000000001 in floats: its ceiling made an 8th step (and a longer decay)."""
    config = run_config(tmp_path, train={"max_steps": None, "epochs": epochs, "micro_batch_size": 8})
    trainer = Trainer(args=config, train_dataset=Sequences(800))
    trainer._setup(weights=None)
    assert trainer.steps_per_epoch == 100 and trainer.max_steps == steps


def test_mfu_counts_an_untied_head_once(tmp_path):
    trainer = Trainer(args=run_config(tmp_path, model={"config": {**TINY, "tie_word_embeddings": False}}),
                      train_dataset=Sequences())
    trainer._setup(weights=None)
    model = trainer.model
    assert trainer._matmul_params() == (model.num_parameters() - model.transformer.wpe.weight.numel()
                                        - model.transformer.wte.weight.numel())


def test_data_mistakes_name_their_key_before_any_work(tmp_path):
    from gpt2kit.data import preprocess

    text = DATA / "the-verdict" / "the-verdict.txt"
    with pytest.raises(ValueError, match=r"data.format: expected auto or one of .* for text_generation, got 'sst2'"):
        run_config(tmp_path, data={"format": "sst2"})
    with pytest.raises(FileNotFoundError, match="data.val: .*nope.txt not found"):
        Trainer(args=run_config(tmp_path, data={"train": str(text), "val": str(tmp_path / "nope.txt")})).train()
    assert not (tmp_path / "run" / "data").exists()
    trained = train_bpe([text], 300, tmp_path / "tok", progress=False)
    preprocess(text, tmp_path / "small", tokenizer=str(tmp_path / "tok" / "tokenizer.json"), progress=False)
    preprocess(text, tmp_path / "gpt2", progress=False)
    config = run_config(tmp_path, data={"train": str(tmp_path / "small"), "val": str(tmp_path / "gpt2")},
                        model={"config": {**TINY, "vocab_size": trained.vocab_size}})
    with pytest.raises(ValueError, match="data.val: .*gpt2 was tokenized with another tokenizer"):
        Trainer(args=config).train()


@pytest.mark.parametrize("stored", ["bfloat16 weights", "float16 in config.json"])
def test_finetuning_a_half_precision_checkpoint_trains_float32_weights(tmp_path, stored):
    """The model loaded in the checkpoint's dtype: a bf16 base trained in bf16 (updates at lr 1e-5 rounded away),
    and fp16 weights made GradScaler fail to unscale them."""
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32))
    if stored == "bfloat16 weights":
        base.to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    if stored != "bfloat16 weights":
        config_path = tmp_path / "base" / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "dtype": "float16"}))
    config = run_config(tmp_path, data={"train": str(DATA / "the-verdict" / "the-verdict.txt"), "seq_len": 32},
                        train={"max_steps": 2}, model={"config": {}})
    trainer = Trainer(args=config)
    trainer.finetune(finetune_checkpoint=tmp_path / "base")
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_finetune_checkpoint_brings_its_own_tokenizer_and_architecture(tmp_path):
    """finetune(finetune_checkpoint=DIR) reads DIR's vocabulary and config, as model.checkpoint: DIR does."""
    text = DATA / "the-verdict" / "the-verdict.txt"
    tokenizer = train_bpe([text], 300, tmp_path / "base", progress=False)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32,
                               vocab_size=tokenizer.vocab_size)).save_pretrained(tmp_path / "base")
    config = run_config(tmp_path, data={"train": str(text), "seq_len": 32}, train={"max_steps": 2},
                        model={"config": {}})
    trainer = Trainer(args=config)
    trainer.finetune(finetune_checkpoint=tmp_path / "base")
    assert trainer.tokenizer.vocab_size == tokenizer.vocab_size
    assert trainer.model.config.n_layer == 1


def test_finetuning_on_token_data_of_another_tokenizer_is_one_error(tmp_path):
    """GPT-2-vocabulary weights finetuned on shards of a 300-token BPE trained silently and saved that BPE as the
    model's tokenizer; token data of the model's own tokenizer, or with no tokenizer named anywhere, still train."""
    from gpt2kit.data import preprocess

    text = DATA / "the-verdict" / "the-verdict.txt"
    train_bpe([text], 300, tmp_path / "tok", progress=False)
    preprocess(text, tmp_path / "small", tokenizer=str(tmp_path / "tok" / "tokenizer.json"), progress=False)
    preprocess(text, tmp_path / "gpt2", progress=False)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32)).save_pretrained(base)
    GPT2Tokenizer.gpt2().save_pretrained(base)
    for data, refused in [("small", True), ("gpt2", False)]:
        config = run_config(tmp_path, data={"train": str(tmp_path / data), "seq_len": 32}, train={"max_steps": 1},
                            model={"config": {}}, out_dir=str(tmp_path / f"run-{data}"))
        trainer = Trainer(args=config)
        if refused:
            with pytest.raises(ValueError, match=r"data.train: .*small was tokenized with another tokenizer than "
                                                 r"the model's \(.*base\)"):
                trainer.finetune(finetune_checkpoint=base)
        else:
            trainer.finetune(finetune_checkpoint=base)
            assert trainer.tokenizer.vocab_size == 50257
    # Random weights take the data's tokenizer, as before: a preset's, and a directory's whose shape train() takes
    # (its own tokenizer files name no ids these weights have learnt).
    trainer = Trainer(args=run_config(tmp_path, data={"train": str(tmp_path / "small"), "seq_len": 32},
                                      train={"max_steps": 1}, model={"name": "gpt2-tiny", "config": {}},
                                      out_dir=str(tmp_path / "run-preset")))
    trainer.train()
    assert trainer.tokenizer.vocab_size == 300 and trainer.model.config.vocab_size == 300
    trainer = Trainer(args=run_config(tmp_path, data={"train": str(tmp_path / "small"), "seq_len": 32},
                                      train={"max_steps": 1}, model={"name": str(base), "config": {}},
                                      out_dir=str(tmp_path / "run-shape")))
    trainer.train()
    assert trainer.tokenizer.vocab_size == 300


def test_raw_text_is_tokenized_with_the_tokenizer_object_given(tmp_path):
    """The text was tokenized with GPT-2's vocabulary whatever tokenizer= said (an IndexError in the embedding)."""
    text = DATA / "the-verdict" / "the-verdict.txt"
    trained = train_bpe([text], 300, tmp_path / "tok", progress=False)
    config = run_config(tmp_path, data={"train": str(text), "seq_len": 32}, train={"max_steps": 1},
                        model={"config": {**TINY, "vocab_size": 300}})
    trainer = Trainer(args=config, tokenizer=trained)
    trainer.train()
    from gpt2kit.data import read_meta

    assert read_meta(tmp_path / "run" / "data")["tokenizer"]["fingerprint"] == trained.fingerprint()
    assert trainer.tokenizer is trained


def test_evaluating_token_data_of_another_tokenizer_is_one_error(tmp_path):
    from gpt2kit.data import preprocess

    Trainer(args=run_config(tmp_path, train={"max_steps": 1}), train_dataset=Sequences()).train()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to score. " * 40)
    preprocess(corpus, tmp_path / "gpt2-tokens", workers=1, progress=False)  # GPT-2's 50257 ids; the model has 64
    trainer = Trainer(task="text_generation", model=str(tmp_path / "run" / "final"))
    with pytest.raises(ValueError, match=r"evaluate: .*gpt2-tokens was tokenized with another tokenizer than the "
                                         r"model's"):
        trainer.evaluate(str(tmp_path / "gpt2-tokens"))  # an IndexError deep in the embedding before


def test_best_val_loss_counts_whole_set_evaluations_only(tmp_path, monkeypatch):
    """A periodic evaluation of eval_batches scores a subset, whose loss is not comparable with the whole set's."""
    def fake(self, dataset, max_batches=None):  # the subset looks better than the whole set
        return {"val_loss": 0.5 if max_batches else 2.0, "val_ppl": 1.0}

    monkeypatch.setattr(Trainer, "_evaluate_dataset", fake)
    config = run_config(tmp_path, train={"max_steps": 4, "eval_interval": 2, "eval_batches": 1})
    summary = Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1)).train()
    assert summary["best_val_loss"] == 2.0  # it was 0.5
    # eval_batches covering the whole set (2 batches of 8 here) make every evaluation a whole-set one (nanoGPT's
    # eval_iters larger than a small validation split: keep_best never saw one before the last).
    losses = iter([3.0, 1.0, 2.0])

    def scripted(self, dataset, max_batches=None):
        return {"val_loss": next(losses), "val_ppl": 1.0}

    monkeypatch.setattr(Trainer, "_evaluate_dataset", scripted)
    config = run_config(tmp_path / "covered", train={"max_steps": 4, "eval_interval": 2, "eval_batches": 2})
    summary = Trainer(args=config, train_dataset=Sequences(), eval_dataset=Sequences(16, seed=1)).train()
    assert summary["best_val_loss"] == 1.0


class Unscored(Sequences):
    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "targets": torch.full((self.seq_len,), -100)}


def test_validation_data_without_scored_targets_is_an_error(tmp_path):
    config = run_config(tmp_path, train={"max_steps": 1})
    with pytest.raises(ValueError, match="the validation data has no scored targets"):  # it scored a perfect 0
        Trainer(args=config, train_dataset=Sequences(), eval_dataset=Unscored(16)).train()


def test_predict_fits_the_context_and_a_failed_sample_keeps_the_summary(tmp_path):
    config = run_config(tmp_path, train={"max_steps": 1}, log={**QUIET, "plot": True}, sample={"prompt": "Hello"})
    with pytest.raises(ValueError, match="outside the model's vocabulary"):  # GPT-2's EOS, a 64-token model
        Trainer(args=config, train_dataset=Sequences()).train()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
    assert (tmp_path / "run" / "loss.png").is_file()
    small = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=8))  # GPT-2's vocabulary
    small.save_pretrained(tmp_path / "small")
    trainer = Trainer(task="text_generation", model=str(tmp_path / "small"))
    [text] = trainer.predict("Hello world")  # sample.max_new_tokens 100 > 8 positions
    assert isinstance(text, str)
    # MindFormers' names: input_data, and max_length counting the prompt ("Hello world" is 2 tokens).
    assert trainer.predict(input_data=["Hello world"], max_length=5) == trainer.predict("Hello world",
                                                                                       max_new_tokens=3)
    with pytest.raises(ValueError, match="give the texts as inputs .*, once"):
        trainer.predict("Hello", input_data="world")

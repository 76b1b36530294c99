"""Checkpoints and exact resume: a run killed with SIGKILL (mid-step or mid-save) and resumed produces the same
losses, step for step, and the same weights as a run that was never interrupted (CPU, fp32, dropout on)."""

import json
import os
import signal
import subprocess
import sys
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gpt2kit.checkpoint import CheckpointError, load_state_dict
from gpt2kit.cli import main
from gpt2kit.training import Trainer, load_config
from gpt2kit.training.logging import read_metrics
from gpt2kit.training.checkpoints import find_resume_checkpoint, list_checkpoints, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}

pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(tmp_path: Path, corpus: Path, name: str) -> Path:
    config = {
        "out_dir": str(tmp_path / name),
        "seed": 7,
        "model": {"name": "gpt2-tiny", "config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32,
                                                  "resid_pdrop": 0.1, "attn_pdrop": 0.1, "embd_pdrop": 0.1}},
        "data": {"train": str(corpus), "seq_len": 32},
        "train": {"max_steps": MAX_STEPS, "micro_batch_size": 4, "global_batch_tokens": 256, "eval_interval": 8,
                  "eval_batches": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 4, "min_lr": 3e-4},
        "checkpoint": {"save_interval": 5, "keep_last": 2},
        "log": {"progress": False, "plot": False, "tensorboard": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gpt2kit", *args], env=ENV, capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"gpt2kit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


# Runs a training in a child process that SIGKILLs itself while writing the training state of checkpoint `at`
# (the model files are already in the temporary directory, state.pt is half written).
KILLER = """
import os, signal, sys, torch
from gpt2kit.training import run
config, at = sys.argv[1], int(sys.argv[2])
save = torch.save
def dying_save(obj, f, *args, **kwargs):
    if "step-%08d" % at in str(f):
        with open(f, "wb") as out:
            out.write(b"half a state")
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, f, *args, **kwargs)
torch.save = dying_save
run("train", config)
"""


def kill_while_saving(tmp_path: Path, config: Path, at: int) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    result = subprocess.run([sys.executable, str(script), str(config), str(at)], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run (in this process)."""
    tmp = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)  # as in the child processes (OMP_NUM_THREADS=1): the same float reductions
    Trainer(args=load_config(write_config(tmp, corpus, "ref"))).train()
    return tmp / "ref"


def assert_same_run(run: Path, reference: Path) -> None:
    assert train_losses(run) == train_losses(reference)  # exact equality, step for step
    assert len(train_losses(run)) == MAX_STEPS
    assert val_losses(run) == val_losses(reference)
    final, expected = load_state_dict(run / "final"), load_state_dict(reference / "final")
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_reference_run_layout(reference):
    checkpoints = list_checkpoints(reference)
    assert [p.name for p in checkpoints] == ["step-00000020", "step-00000024"]  # keep_last 2
    state = verify_checkpoint(checkpoints[-1])
    assert state["step"] == MAX_STEPS and state["grad_accum"] == 2
    assert state["sampler"]["position"] > 0
    assert (checkpoints[-1] / "config.json").is_file() and (checkpoints[-1] / "tokenizer.json").is_file()
    assert (checkpoints[-1] / "training_state" / "state.pt").is_file()
    loaded = torch.load(checkpoints[-1] / "training_state" / "state.pt", weights_only=True)
    assert set(loaded) == {"optimizer", "scheduler", "scaler", "rng"}


def test_kill_9_while_saving_skips_the_partial_checkpoint(corpus, reference, tmp_path):
    config = write_config(tmp_path, corpus, "run")
    kill_while_saving(tmp_path, config, 15)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000005", "step-00000010"]
    assert list(checkpoints.glob(".step-00000015.partial-*"))  # the half-written one, never renamed
    result = cli("train", "--config", str(config), "--resume", "auto")
    assert "step-00000010" in result.stderr
    assert not list(checkpoints.glob(".step-*"))  # cleaned up after the next save
    assert_same_run(tmp_path / "run", reference)


def test_external_kill_9_of_the_cli_then_resume(corpus, reference, tmp_path):
    config = write_config(tmp_path, corpus, "run")
    proc = subprocess.Popen([sys.executable, "-m", "gpt2kit", "train", "--config", str(config)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(step >= 7 for step, _ in train_losses(tmp_path / "run")) if metrics.exists() else False:
            proc.kill()  # SIGKILL
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] != "step-00000024"
    result = cli("train", "--config", str(config), "--resume", "auto")
    assert "resumed from" in result.stderr
    assert_same_run(tmp_path / "run", reference)


def test_corrupted_and_partial_checkpoints_are_detected_and_skipped(corpus, reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest, older = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in a tensor
    weights.write_bytes(bytes(data))
    partial = run / "checkpoints" / "step-00000030"  # e.g. copied by hand, without its COMPLETE marker
    shutil.copytree(older, partial)
    (partial / "COMPLETE").unlink()

    found = find_resume_checkpoint(run, "auto")
    err = capsys.readouterr().err
    assert found == older
    assert "skipping checkpoint" in err and "step-00000030" in err and "no COMPLETE marker" in err
    assert "model.safetensors is corrupted" in err
    with pytest.raises(Exception, match="corrupted"):
        find_resume_checkpoint(run, str(newest))
    # Ranks share the hashing: the corrupted file is found by the one rank whose share holds it; a size
    # mismatch by every rank.
    names = sorted(json.loads((newest / "COMPLETE").read_text())["files"])
    owner = names.index("model.safetensors") % 2
    verify_checkpoint(newest, 1 - owner, 2)
    with pytest.raises(Exception, match="model.safetensors is corrupted"):
        verify_checkpoint(newest, owner, 2)
    weights.write_bytes(bytes(data[:-1]))
    with pytest.raises(Exception, match="model.safetensors has"):
        verify_checkpoint(newest, 1 - owner, 2)

    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--resume", str(newest)]) == 2
    assert "gpt2kit train: error:" in capsys.readouterr().err
    # A manifest of the right JSON but the wrong shape is unreadable like any other (it raised AttributeError).
    (newest / "COMPLETE").write_text('{"step": 40, "files": []}')
    with pytest.raises(CheckpointError, match=r'COMPLETE: unreadable manifest \("files" must map each file'):
        verify_checkpoint(newest)


def test_resume_auto_without_checkpoints_starts_fresh(corpus, tmp_path):
    config = load_config(write_config(tmp_path, corpus, "run"), [("train.max_steps", "2"),
                                                                       ("optim.warmup_steps", "1")])
    config.checkpoint.resume = "auto"
    summary = Trainer(args=config).train()
    assert summary["steps_this_run"] == 2


def test_transformers_resume_from_checkpoint_and_save_model(corpus, tmp_path):
    """train(resume_from_checkpoint=True) continues from the newest checkpoint (transformers' call; a path names
    one), and save_model writes what out_dir/final holds wherever asked."""
    config = load_config(write_config(tmp_path, corpus, "run"), [("train.max_steps", "5"),
                                                                       ("optim.warmup_steps", "1")])
    trainer = Trainer(args=config)
    assert trainer.train()["steps_this_run"] == 5
    saved = trainer.save_model(tmp_path / "exported")
    assert saved == tmp_path / "exported"
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in (tmp_path / "run" / "final").iterdir())
    assert load_state_dict(saved).keys() == load_state_dict(tmp_path / "run" / "final").keys()
    config.train.max_steps = 7
    assert Trainer(args=config).train(resume_from_checkpoint=True)["steps_this_run"] == 2
    config.train.max_steps = 8
    checkpoint = find_resume_checkpoint(tmp_path / "run", "auto")
    assert Trainer(args=config).finetune(tmp_path / "run" / "final",
                                         resume_from_checkpoint=str(checkpoint))["steps_this_run"] == 1
    with pytest.raises(ValueError, match="give resume or transformers' resume_from_checkpoint, not both"):
        Trainer(args=config).train("auto", resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="save_model: no model yet"):
        Trainer(args=config).save_model()


def test_a_checkpoint_saved_before_the_final_evaluation_records_its_best(corpus, tmp_path):
    """With save_interval dividing max_steps the last checkpoint is saved before the final whole-set evaluation:
    its best_val_loss stayed None, and a run continued from it (a larger max_steps) reported a worse loss as its
    best."""
    config = load_config(write_config(tmp_path, corpus, "run"), [("train.max_steps", "8"),
                                                                   ("checkpoint.save_interval", "4")])
    summary = Trainer(args=config).train()
    last = list_checkpoints(tmp_path / "run")[-1]
    assert last.name == "step-00000008" and summary["best_val_loss"] is not None
    assert verify_checkpoint(last)["best_val_loss"] == summary["best_val_loss"]  # still sealed, now with the best
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no staging copy left


def test_trainer_state_is_plain_json(reference):
    state = json.loads((list_checkpoints(reference)[-1] / "training_state" / "trainer_state.json").read_text())
    assert state["config"]["train"]["max_steps"] == MAX_STEPS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--allocator preloads with LD_PRELOAD (Linux)")
def test_training_under_tcmalloc_gives_the_same_run(corpus, reference, tmp_path):
    """`gpt2kit --allocator tcmalloc train` restarts itself with tcmalloc preloaded (CI installs it) and trains
    exactly as under the system's malloc; the summary records the allocator. Without the library: one clear error."""
    import ctypes.util

    from gpt2kit.allocator import allocator_in_use

    config = write_config(tmp_path, corpus, "run")
    if ctypes.util.find_library("tcmalloc") is None:
        result = cli("--allocator", "tcmalloc", "train", "--config", str(config), check=False)
        assert result.returncode == 2 and "apt-get install libgoogle-perftools4" in result.stderr
        return
    cli("--allocator", "tcmalloc", "train", "--config", str(config))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["allocator"] == "tcmalloc"
    assert json.loads((reference / "summary.json").read_text())["allocator"] == allocator_in_use()  # this process's
    assert_same_run(tmp_path / "run", reference)


def test_resuming_from_a_folder_inside_a_checkpoint_names_the_checkpoint(tmp_path):
    from gpt2kit.training.checkpoints import COMPLETE_NAME

    (tmp_path / "step-00000010" / "training_state").mkdir(parents=True)
    (tmp_path / "step-00000010" / COMPLETE_NAME).write_text("{}")
    with pytest.raises(CheckpointError, match=r"training_state: a part of the checkpoint .*step-00000010; resume "
                                              r"from .*step-00000010$"):
        verify_checkpoint(tmp_path / "step-00000010" / "training_state")


def short_config(tmp_path: Path, corpus: Path, name: str = "run", **changes: str):
    overrides = [("train.max_steps", "6"), ("optim.warmup_steps", "1"), ("checkpoint.save_interval", "3"),
                 *((key.replace("__", "."), value) for key, value in changes.items())]
    return load_config(write_config(tmp_path, corpus, name), overrides)


def test_a_trainer_trained_again_starts_over(corpus, tmp_path):
    """Its step, tokens and best loss were the last run's: a second train() trained nothing and saved fresh
    weights as final/, and a resume after an interrupt before the first save started from the old step."""
    trainer = Trainer(args=short_config(tmp_path, corpus))
    first = trainer.train()
    second = trainer.train()
    assert second["steps_this_run"] == first["steps_this_run"] == 6 and second["tokens_seen"] == first["tokens_seen"]
    assert train_losses(tmp_path / "run")[-6:] == train_losses(tmp_path / "run")[:6]  # the same run again


def test_save_model_writes_into_a_directory_and_never_replaces_the_working_one(corpus, tmp_path, monkeypatch):
    """transformers' `trainer.save_model(args.output_dir)` wiped the run directory, checkpoints and all."""
    trainer = Trainer(args=short_config(tmp_path, corpus))
    trainer.train()
    before = {p.name for p in (tmp_path / "run").iterdir()}
    trainer.save_model(tmp_path / "run")
    after = {p.name for p in (tmp_path / "run").iterdir()}
    assert before <= after and {"config.json", "model.safetensors", "tokenizer.json"} <= after
    assert find_resume_checkpoint(tmp_path / "run", "auto") is not None
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(ValueError, match="is the current directory or one above it"):
        trainer.save_model(".")


def test_resuming_from_another_runs_checkpoint_leaves_it_untouched(corpus, tmp_path):
    donor_config = short_config(tmp_path, corpus, "donor")
    Trainer(args=donor_config).train()
    donor = list_checkpoints(tmp_path / "donor")[-1]
    sealed = (donor / "COMPLETE").read_bytes(), (donor / "training_state" / "trainer_state.json").read_bytes()
    summary = Trainer(args=short_config(tmp_path, corpus, "other", data__val=str(corpus))).train(resume=str(donor))
    assert ((donor / "COMPLETE").read_bytes(), (donor / "training_state" / "trainer_state.json").read_bytes()) == sealed
    assert Path(summary["checkpoint"]) == tmp_path / "other" / "checkpoints" / donor.name


def test_a_best_model_chosen_past_the_resumed_step_is_removed(corpus, tmp_path):
    config = short_config(tmp_path, corpus, train__eval_batches="null", checkpoint__keep_best="true",
                          checkpoint__keep_last="null")
    Trainer(args=config).train()
    best = json.loads((tmp_path / "run" / "best" / "val_metrics.json").read_text())
    assert best["step"] == 6
    config.optim.lr = config.optim.min_lr = 0.5  # another try from step 3, with another learning rate
    summary = Trainer(args=config).train(resume=str(list_checkpoints(tmp_path / "run")[0]))
    chosen = json.loads((tmp_path / "run" / "best" / "val_metrics.json").read_text())
    assert chosen["step"] > 3 and chosen["val_loss"] == summary["best_val_loss"] != best["val_loss"]


def test_a_checkpoint_a_kill_took_out_of_its_place_is_put_back(corpus, tmp_path):
    """A kill between the two renames of a swap left no step-N, only hidden complete copies, which resume ignored
    and the next save deleted."""
    config = short_config(tmp_path, corpus)
    Trainer(args=config).train()
    root = tmp_path / "run" / "checkpoints"
    last = list_checkpoints(tmp_path / "run")[-1]
    os.replace(last, root / f".{last.name}.old-12345-0123abcd")
    summary = Trainer(args=config).train(resume="auto")
    assert summary["steps_this_run"] == 0 and Path(summary["checkpoint"]) == last
    verify_checkpoint(last)


def test_resume_refuses_other_data_and_another_base(corpus, tmp_path):
    """The data position resumed at counts the examples of a permutation: with another seq_len (other windows) the
    run continued anywhere in the data without a word; a LoRA run took another base model's shape."""
    Trainer(args=short_config(tmp_path, corpus)).train()
    checkpoint = str(list_checkpoints(tmp_path / "run")[0])
    with pytest.raises(CheckpointError, match="saved from a run over 370 training examples; this run has 741"):
        Trainer(args=short_config(tmp_path, corpus, data__seq_len="16",
                                  train__global_batch_tokens="128")).train(resume=checkpoint)
    # As many examples of other content: the tokens of the training file reversed.
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    train_file = next(p for p in other.iterdir() if p.name.startswith("train") and p.suffix == ".bin")
    tokens = np.fromfile(train_file, dtype=np.uint16)
    tokens[::-1].tofile(train_file)
    with pytest.raises(CheckpointError, match=r"over other training examples than this run's \(as many, 370"):
        Trainer(args=short_config(tmp_path, corpus, data__train=str(other))).train(resume=checkpoint)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        Trainer(args=short_config(tmp_path, corpus)).train(resume_from_checkpoint=str(tmp_path / "missing"))
    Trainer(args=short_config(tmp_path, corpus, "lora", pet_method="lora")).train()
    lora_checkpoint = str(list_checkpoints(tmp_path / "lora")[0])
    with pytest.raises(CheckpointError, match="another model shape"):
        Trainer(args=short_config(tmp_path, corpus, "lora", pet_method="lora", model__config__n_embd="32",
                                  model__config__n_head="2")).train(resume=lora_checkpoint)
    # The same shape, other weights (a random base drawn from another seed): the adapters loaded onto it.
    with pytest.raises(CheckpointError, match="adapters were trained on another base model"):
        Trainer(args=short_config(tmp_path, corpus, "lora", pet_method="lora", seed="8")).train(resume=lora_checkpoint)

"""The console script itself: installed, helpful, and failing with one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpt2kit.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_shakespeare.yaml")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2kit", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("info", "convert"):
        assert command in result.stdout


def test_info_counts_parameters_without_allocating():
    result = run("info", "gpt2")
    assert result.returncode == 0
    assert "124,439,808" in result.stdout
    big = run("info", "gpt2-52b")  # 52B parameters on the meta device: instant, no memory
    assert big.returncode == 0 and "51,966,533,632" in big.stdout


def test_info_on_a_model_directory(tiny_model_dir):
    result = run("info", str(tiny_model_dir))
    assert result.returncode == 0 and "layers       2" in result.stdout


def test_an_allocation_the_machine_cannot_make_is_one_error_line(monkeypatch, capsys):
    """A model too large for memory (model.config.n_positions 10**8: 25.6 GB) ended in PyTorch's C++ assertion
    and a traceback; other RuntimeErrors are bugs and keep theirs."""
    import gpt2kit.cli as cli

    def too_large(args):
        torch.empty(2 ** 61, dtype=torch.uint8)  # what the CPU allocator raises, with its own message

    monkeypatch.setitem(cli.COMMANDS, "info", (cli.COMMANDS["info"][0], (cli.COMMANDS["info"][1][0], too_large)))
    assert main(["info", "gpt2"]) == 2
    assert capsys.readouterr().err == ("gpt2kit info: error: out of memory (an allocation of 2305843009.2 GB): a "
                                       "smaller model, batch or sequence length, or a machine with more memory, is "
                                       "needed\n")
    assert "out of memory:" in cli.out_of_memory_message(MemoryError())
    assert cli.out_of_memory_message(RuntimeError("a bug")) is None

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "info", (cli.COMMANDS["info"][0], (cli.COMMANDS["info"][1][0], bug)))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "gpt2"])


def test_errors_are_one_line_and_nonzero(tmp_path):
    result = run("convert", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no model directory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_user_mistakes_are_one_line_and_touch_nothing(tiny_model_dir, tmp_path, capsys):
    from gpt2kit import GPT2Tokenizer

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "vocab")  # a model directory's vocabulary, say
    cases = [
        (["convert", "--input", str(tiny_model_dir), "--output", str(notes)], "exists and is not a directory"),
        # Not "already exists; pass --overwrite" first, which would have overwritten the input.
        (["convert", "--input", str(tiny_model_dir), "--output", str(tiny_model_dir)],
         "--output must differ from --input"),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "blah"], "'blah': not a device"),
        (["info", "gpt2", "--parallel", "data=2", "--seq-len", "-5"], "--seq-len must be at least 1"),
        # Found before the summary is printed; an estimate past the context, or options without --parallel, were
        # accepted (or ignored) silently.
        (["info", "gpt2", "--parallel", "shard=x"], "shard=x"),
        (["info", "gpt2", "--parallel", "data=1", "--seq-len", "5000"], "seq_len 5000 is longer than the model's"),
        (["info", "gpt2", "--seq-len", "64", "--no-recompute"], "--seq-len, --recompute: options of the memory"),
        (["convert", "--input", str(tiny_model_dir), "--output", str(tmp_path / "s"), "--max-shard-size", "0"],
         "size '0' is less than one byte"),
        (["tokenizer", "train", "--input", str(notes), "--vocab-size", "300", "--output", str(tmp_path / "vocab")],
         "already holds a vocabulary; pass --overwrite"),
        (["export", "onnx", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--opset", "3"],
         "opset must be in 13..20"),
        # Each of these was a raw errno, pointed at the wrong place, was silently taken, or came after the work.
        (["info", "gpt2", "--parallel", "shard=2,shard=4"], "shard is given twice"),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--tensor-parallel", "0"],
         "--tensor-parallel must be at least 1"),
        (["tokenizer", "train", "--input", str(notes), "--vocab-size", "300", "--output", str(notes / "sub")],
         f"{notes / 'sub'}: cannot be created: {notes} exists and is not a directory"),
        (["preprocess", "--input", str(notes), "--output", str(notes / "sub")],
         f"{notes}: exists and is not a directory"),
        (["train", "--config", str(tmp_path)], "is a directory; expected a YAML run config"),
        (["train", "--config", CONFIG, "--model.config.n_positions", "0"],
         "command line: --model.config.n_positions: n_positions must be"),
        (["train", "--config", CONFIG, "--out_dir", str(tmp_path / "run"), "--resume",
          str(tmp_path / "nope")], f"--resume {tmp_path / 'nope'}: no such checkpoint directory"),
        # Sampling flags without sampling, a length penalty without beams: silently greedy before.
        (["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--temperature", "0.8", "--top-k", "5"],
         "--temperature, --top-k only apply when sampling; add --do-sample"),
        (["chat", "--model", str(tiny_model_dir), "--no-do-sample", "--top-p", "0.5"],
         "--top-p only applies when sampling"),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--length-penalty", "2"],
         "--length-penalty only applies to beam search"),
        # These two came after a tokenizer was trained and the data tokenized into out_dir.
        (["train", "--config", CONFIG, "--out_dir", str(tmp_path / "run"), "--train.max_steps", "null"],
         "command line: --train.max_steps: give train.max_steps or train.epochs"),
        (["train", "--config", CONFIG, "--out_dir", str(tmp_path / "run"), "--checkpoint.resume",
          str(tmp_path / "nope")], f"command line: --checkpoint.resume: no checkpoint directory {tmp_path / 'nope'}"),
    ]
    # --resume replaces a stale checkpoint.resume of the config before it is checked (the stale one was named).
    stale = tmp_path / "stale.yaml"
    values = yaml.safe_load(Path(CONFIG).read_text())
    values["checkpoint"]["resume"] = str(tmp_path / "gone")
    stale.write_text(yaml.safe_dump(values))
    cases.append((["train", "--config", str(stale), "--out_dir", str(tmp_path / "run"), "--resume",
                   str(tmp_path / "nope")], f"--resume {tmp_path / 'nope'}: no such checkpoint directory"))
    if not __import__("torch").cuda.is_available():
        cases.append((["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "cuda"],
                      "no CUDA GPU"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
    assert notes.read_text() == "mine" and not (tmp_path / "run").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("keep")
    assert main(["convert", "--input", str(tiny_model_dir), "--output", str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "README.md").read_text() == "keep"


def test_preprocess_refuses_the_current_directory_before_any_work(tmp_path, monkeypatch, capsys):
    """It tokenized everything, then moved the directory the shell stood in aside and failed."""
    (tmp_path / "in.txt").write_text("some text\n")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["preprocess", "--input", str(tmp_path / "in.txt"), "--output", "."]) == 2
    assert "is the current directory or one above it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "in.txt"] and not any((tmp_path / "here").iterdir())


def test_convert_into_the_current_directory_is_refused_first(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """It said "already exists; pass --overwrite", then refused --overwrite: the working directory is never replaced."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    assert main(["convert", "--input", str(tiny_model_dir), "--output", "."]) == 2
    assert "is the current directory or one above it" in capsys.readouterr().err
    assert [p.name for p in here.iterdir()] == ["notes.txt"]


def test_a_mistyped_flag_shows_its_commands_usage(capsys):

    try:
        main(["generate", "--model", "gpt2-tiny", "--promt", "hi"])
    except SystemExit as exit:
        assert exit.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gpt2kit generate ") and "error: unrecognized arguments: --promt hi" in err


@pytest.mark.parametrize("argv", [["lora", "merge", "--adapter", "a", "--output", "o"],
                                  ["tokenizer", "train", "--input", "x", "--vocab-size", "300", "--output", "o"],
                                  ["export", "gguf", "--model", "m", "--output", "o.gguf"]])
def test_a_mistyped_flag_of_a_two_level_command_shows_that_commands_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--bogus"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: gpt2kit {argv[0]} {argv[1]} ") and "unrecognized arguments: --bogus" in err


def test_a_closed_pipe_ends_generation_quietly():
    """`| head` closing the pipe was reported as an error (exit 2)."""
    process = subprocess.Popen([sys.executable, "-m", "gpt2kit", "generate", "--model", "gpt2-tiny", "--random-init",
                                "--prompt", "ROMEO:", "--max-new-tokens", "200", "--do-sample"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.read(10)  # streamed: the tokens after these meet a closed pipe
    process.stdout.close()
    assert process.wait(timeout=120) == 141 and "error" not in process.stderr.read()


def test_buffered_output_into_a_closed_pipe_ends_quietly():
    """Output buffered for a pipe (`gpt2kit info | true`) met the closed pipe at interpreter exit: a traceback
    and exit 120."""
    process = subprocess.Popen([sys.executable, "-m", "gpt2kit", "info", "gpt2-tiny"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    process.stdout.close()  # before the command has printed anything (it imports torch first)
    assert process.wait(timeout=120) == 141, process.stderr.read()
    assert process.stderr.read() == ""

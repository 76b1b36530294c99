"""The console script itself: installed, helpful, and failing with one clear line."""

import subprocess
import sys


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


def test_errors_are_one_line_and_nonzero(tmp_path):
    result = run("convert", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no model directory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_user_mistakes_are_one_line_and_touch_nothing(tiny_model_dir, tmp_path, capsys):
    from gpt2kit.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    cases = [
        (["convert", "--input", str(tiny_model_dir), "--output", str(notes)], "exists and is not a directory"),
        (["convert", "--input", str(tiny_model_dir), "--output", str(tiny_model_dir)],
         "already exists; pass --overwrite"),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "blah"], "'blah': not a device"),
        (["info", "gpt2", "--parallel", "data=2", "--seq-len", "-5"], "--seq-len must be at least 1"),
        (["export", "onnx", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--opset", "3"],
         "opset must be in 13..20"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append((["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "cuda"],
                      "no CUDA GPU"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
    assert notes.read_text() == "mine"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("keep")
    assert main(["convert", "--input", str(tiny_model_dir), "--output", str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "README.md").read_text() == "keep"

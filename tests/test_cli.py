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

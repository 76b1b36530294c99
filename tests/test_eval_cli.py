"""`gpt2kit eval`: the same numbers as the Python API, a JSON report with checksum and definitions, written
atomically, one summary line, and one-line errors."""

import hashlib
import json

import pytest
import torch

from gpt2kit import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.cli import main
from gpt2kit.evaluation import evaluate_perplexity, write_report
from gpt2kit.evaluation.runner import evaluate

from .conftest import DATA


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("eval-cli") / "lm"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)).save_pretrained(directory)
    GPT2Tokenizer.gpt2().save_pretrained(directory)
    return directory


def test_perplexity_report_matches_the_python_api(lm_dir, tmp_path, capsys):
    data = tmp_path / "story.txt"
    data.write_text((DATA / "the-verdict" / "the-verdict.txt").read_text()[:1500])
    out = tmp_path / "reports" / "ppl.json"
    assert main(["eval", "--model", str(lm_dir), "--task", "perplexity", "--data", str(data), "--stride", "16",
                 "--batch-size", "3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out.read_text())
    assert printed[-2] == report["summary"] and printed[-1] == f"wrote {out}"
    assert report["summary"].startswith("perplexity: token_perplexity ")
    assert report["settings"]["compile"] is False
    assert report["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert set(report["definitions"]) >= {"token_perplexity", "word_perplexity", "bits_per_byte", "windows"}
    assert report["results"]["stride"] == 16 and report["results"]["max_length"] == 32
    assert report["seconds"] > 0 and report["started_at"]
    model = GPT2LMHeadModel.from_pretrained(lm_dir)
    expected = evaluate_perplexity(model, GPT2Tokenizer.gpt2(), data, stride=16, progress=False)
    assert report["results"]["word_perplexity"] == pytest.approx(expected["word_perplexity"], rel=1e-6)
    assert not list(out.parent.glob("*.tmp"))
    assert main(["eval", "--model", str(lm_dir), "--task", "perplexity", "--data", str(data), "--stride", "16",
                 "--batch-size", "3", "--compile", "--output", str(out)]) == 0
    compiled = json.loads(out.read_text())
    assert compiled["settings"]["compile"] is True
    assert compiled["results"]["word_perplexity"] == pytest.approx(expected["word_perplexity"], rel=1e-6)
    assert report["settings"]["quantize"] is None and report["settings"]["random_init"] is False
    # The weights' form is part of the result: an int8 run said float32 and counted a quarter of the parameters.
    int8 = evaluate("perplexity", lm_dir, data, quantize="int8", progress=False)
    assert int8["settings"]["quantize"] == "int8" and int8["model"]["parameters"] == model.num_parameters()


def test_wikitext_and_lambada_tasks(lm_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(lm_dir), "--task", "wikitext", "--limit", "1",
                 "--data", str(DATA / "wikitext-2" / "wiki.valid.tokens")]) == 0
    assert "documents=1" in capsys.readouterr().out
    # Articles as JSON lines: read as such (the raw JSON text was scored) and detokenized as WikiText.
    articles = [" = Title = \n Some text @-@ here .\n", " = Other = \n More ( words ) .\n"]
    jsonl = tmp_path / "wiki.jsonl"
    jsonl.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles))
    report = evaluate("wikitext", lm_dir, jsonl, progress=False)
    expected = evaluate_perplexity(GPT2LMHeadModel.from_pretrained(lm_dir), GPT2Tokenizer.gpt2(), articles,
                                   detokenize=True, progress=False)
    assert report["results"] == expected and report["settings"]["format"] == "jsonl"
    assert evaluate("wikitext", lm_dir, jsonl, format="jsonl", progress=False)["results"] == expected  # the task's
    # detokenizer whatever --format says (it was skipped when a format was given)
    assert main(["eval", "--model", str(lm_dir), "--task", "lambada", "--limit", "4", "--stop-word-filter",
                 "--data", str(DATA / "lambada" / "lambada_test.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "lambada: acc " in out and "(4 passages," in out and "greedy continuation" in out
    assert "acc_stop_word_filter" in out


def test_classification_task_reports_matthews_correlation(tmp_path, capsys):
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "clf")
    out = tmp_path / "cola.json"
    assert main(["eval", "--model", str(tmp_path / "clf"), "--task", "classification", "--limit", "12",
                 "--data", str(DATA / "glue" / "CoLA" / "dev.tsv"), "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["examples"] == 12 and "matthews_correlation" in results and results["format"] == "cola"
    assert "matthews_correlation" in capsys.readouterr().out


def test_errors_are_one_line(lm_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(lm_dir), "--task", "lambada", "--data", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.jsonl: data file not found" in err
    assert main(["eval", "--model", str(lm_dir), "--task", "wikitext", "--data", str(tmp_path)]) == 2
    assert f"{tmp_path}: data file is a directory, not a file" in capsys.readouterr().err
    assert main(["eval", "--model", str(lm_dir), "--task", "wikitext", "--stride", "64",
                 "--data", str(DATA / "wikitext-2" / "wiki.test.raw")]) == 2
    assert "stride must be between 1 and max_length (32)" in capsys.readouterr().err


def test_options_the_task_has_no_use_for_and_unknown_devices_are_errors(lm_dir, tmp_path, capsys):
    lambada = ["--task", "lambada", "--data", str(DATA / "lambada" / "lambada_test.jsonl")]
    for extra, message in ((["--stride", "8"], "stride does not apply to the lambada task"),
                           (["--format", "jsonl"], "format does not apply to the lambada task"),
                           (["--no-detokenize"], "detokenize does not apply to the lambada task")):
        assert main(["eval", "--model", str(lm_dir), *lambada, *extra]) == 2
        assert message in capsys.readouterr().err
    wikitext = ["--task", "wikitext", "--data", str(DATA / "wikitext-2" / "wiki.test.raw")]
    assert main(["eval", "--model", str(lm_dir), *wikitext, "--stop-word-filter"]) == 2
    assert "stop_word_filter does not apply to the wikitext task" in capsys.readouterr().err
    assert main(["eval", "--model", str(lm_dir), *wikitext, "--text-key", "body"]) == 2  # it was unused
    assert "text_key names the field of JSON lines data; " in capsys.readouterr().err
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "clf")
    assert main(["eval", "--model", str(tmp_path / "clf"), "--task", "classification", "--compile",
                 "--data", str(DATA / "glue" / "SST-2" / "dev.tsv")]) == 2
    assert "compile does not apply to the classification task" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "clf"), "--task", "classification", "--device", "bogus",
                 "--data", str(DATA / "glue" / "SST-2" / "dev.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "device 'bogus': not a device" in err


def test_an_infinite_perplexity_is_standard_json(tmp_path):
    report = {"results": {"word_perplexity": float("inf"), "nested": [float("-inf"), float("nan"), 1.5]}}
    text = write_report(report, tmp_path / "r.json").read_text()

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(text, parse_constant=refuse)["results"] == {"word_perplexity": "inf",
                                                                  "nested": ["-inf", "nan", 1.5]}


def test_report_write_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    write_report({"a": 1}, path)
    with pytest.raises(TypeError):
        write_report({"a": object()}, path)  # fails halfway through serialising
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    # File-system errors name the report's path, never the hidden temporary beside it.
    with pytest.raises(IsADirectoryError, match=f"^{tmp_path}: is a directory; expected the path of a file"):
        write_report({"a": 1}, tmp_path)
    with pytest.raises(NotADirectoryError, match=f"^{path / 'sub' / 'x.json'}: {path} is a file, not a directory"):
        write_report({"a": 1}, path / "sub" / "x.json")



def test_a_write_error_names_the_target(tmp_path, monkeypatch):
    import tempfile

    def refuse(prefix, suffix, dir):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=r"r.json: cannot write in .* \(Permission denied\)$") as caught:
        write_report({"a": 1}, tmp_path / "r.json")
    assert ".tmp" not in str(caught.value)


def test_a_bad_output_path_fails_before_the_evaluation(lm_dir, tmp_path, capsys, monkeypatch):
    import gpt2kit.evaluation.runner as runner

    monkeypatch.setattr(runner.perplexity, "evaluate_perplexity", lambda *a, **k: pytest.fail("evaluated"))
    assert main(["eval", "--model", str(lm_dir), "--task", "wikitext", "--output", str(tmp_path),
                 "--data", str(DATA / "wikitext-2" / "wiki.test.raw")]) == 2
    assert f"{tmp_path}: is a directory; expected the path of a file to write" in capsys.readouterr().err
    data = tmp_path / "text.txt"
    data.write_text("Some text to score.\n", encoding="utf-8")
    assert main(["eval", "--model", str(lm_dir), "--task", "perplexity", "--data", str(data),
                 "--output", str(tmp_path / "." / "text.txt")]) == 2
    assert "is the data file: the report would replace it" in capsys.readouterr().err
    assert data.read_text(encoding="utf-8") == "Some text to score.\n"
    weights = (lm_dir / "model.safetensors").read_bytes()
    # The weights were silently replaced by the report; a LoRA run's adapted config too.
    for name in ("model.safetensors", "tokenizer_config.json", "model_config.json"):
        assert main(["eval", "--model", str(lm_dir), "--task", "perplexity", "--data", str(data),
                     "--output", str(lm_dir / name)]) == 2
        assert "is a file of the model being evaluated: the report would replace it" in capsys.readouterr().err
    assert (lm_dir / "model.safetensors").read_bytes() == weights

"""ONNX export: graph interface, logits against PyTorch (fp32, 1e-4), identical greedy tokens, the commands."""

import json
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gpt2kit import GPT2LMHeadModel, GPT2Tokenizer, KVCache, generate
from gpt2kit.cli import main
from gpt2kit.export import DECODE_NAME, PREFILL_NAME, OnnxLMHeadModel, export_onnx
from gpt2kit.model import positions_from_mask

from .conftest import save_tiny_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("onnx") / "tiny")


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    return export_onnx(model_dir, tmp_path_factory.mktemp("onnx-out") / "tiny-onnx")


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT2LMHeadModel.from_pretrained(model_dir).eval()


def left_padded(batch, length, pad_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pad_lengths):
        mask[row, :pad] = 0
    return ids, mask


def test_graphs_have_cache_inputs_outputs_and_dynamic_axes(exported, model_dir):
    dims = {}
    for name in (PREFILL_NAME, DECODE_NAME):
        graph = onnx.load(str(exported / name))
        onnx.checker.check_model(graph)
        dims[name] = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                      for v in [*graph.graph.input, *graph.graph.output]}
    assert dims[PREFILL_NAME] == {
        "input_ids": ["batch", "sequence"], "attention_mask": ["batch", "total"], "position_ids": ["batch", "sequence"],
        "logits": ["batch", "sequence", 512], "present_keys": [2, "batch", 4, "total", 16],
        "present_values": [2, "batch", 4, "total", 16]}
    assert dims[DECODE_NAME] == {**dims[PREFILL_NAME], "past_keys": [2, "batch", 4, "past", 16],
                                 "past_values": [2, "batch", 4, "past", 16]}
    # The directory is self-contained: config and tokenizer travel with the graphs.
    assert json.loads((exported / "config.json").read_text())["n_layer"] == 2
    assert (exported / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("batch, length, pads, new", [(1, 5, [0], 1), (3, 9, [0, 4, 8], 1), (4, 6, [2, 0, 5, 1], 3)])
def test_prefill_and_decode_logits_match_pytorch(exported, model, batch, length, pads, new):
    prefill = ort.InferenceSession(str(exported / PREFILL_NAME))
    decode = ort.InferenceSession(str(exported / DECODE_NAME))
    ids, mask = left_padded(batch, length, pads)
    cache = KVCache(model.config, batch, length + new)
    with torch.no_grad():
        expected = model(ids, mask, past_key_values=cache).logits
    logits, keys, values = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                              "position_ids": positions_from_mask(mask).numpy()})
    real = mask.bool().numpy()  # padded positions' logits are never used
    np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(keys, cache.keys[:, :, :, :length].numpy(), atol=1e-4, rtol=0)

    next_ids, _ = left_padded(batch, new, [0] * batch, seed=1)
    full_mask = torch.cat([mask, torch.ones(batch, new, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = model(next_ids, full_mask, past_key_values=cache).logits
    logits, keys, _ = decode.run(None, {"input_ids": next_ids.numpy(), "attention_mask": full_mask.numpy(),
                                        "position_ids": positions_from_mask(full_mask)[:, length:].numpy(),
                                        "past_keys": keys, "past_values": values})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    assert keys.shape[3] == length + new


def test_greedy_and_seeded_generation_are_identical(exported, model):
    onnx_model = OnnxLMHeadModel(exported)
    ids, mask = left_padded(3, 7, [0, 3, 6])
    for options in (dict(), dict(do_sample=True, temperature=0.8, top_p=0.9, seed=3)):
        expected = generate(model, ids, mask, max_new_tokens=60, eos_token_id=[], **options)
        assert torch.equal(generate(onnx_model, ids, mask, max_new_tokens=60, eos_token_id=[], **options), expected)


def test_graphs_generate_with_numpy_and_onnxruntime_alone(exported, model):
    """No PyTorch in the loop: a plain greedy decode over the two graphs gives PyTorch's tokens."""
    prefill = ort.InferenceSession(str(exported / PREFILL_NAME))
    decode = ort.InferenceSession(str(exported / DECODE_NAME))
    prompt = np.array([[5, 17, 300, 42]], dtype=np.int64)
    mask = np.ones_like(prompt)
    logits, keys, values = prefill.run(None, {"input_ids": prompt, "attention_mask": mask,
                                              "position_ids": np.arange(4, dtype=np.int64)[None]})
    tokens = []
    for step in range(30):
        tokens.append(int(logits[0, -1].argmax()))
        mask = np.ones((1, 5 + step), dtype=np.int64)
        logits, keys, values = decode.run(None, {
            "input_ids": np.array([[tokens[-1]]]), "attention_mask": mask,
            "position_ids": np.array([[4 + step]]), "past_keys": keys, "past_values": values})
    expected = generate(model, torch.from_numpy(prompt), max_new_tokens=30, eos_token_id=[])[0, 4:].tolist()
    assert tokens == expected


def test_export_and_generate_commands(model_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "onnx", "--model", str(model_dir), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert main(["export", "onnx", "--model", str(model_dir), "--output", str(out)]) == 2
    assert "already exists; pass --overwrite (overwrite=True) to replace it" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")  # --overwrite would not help: said before the export runs
    assert main(["export", "onnx", "--model", str(model_dir), "--output", str(tmp_path / "a-file")]) == 2
    assert "a-file: exists and is not a directory" in capsys.readouterr().err

    common = ["generate", "--prompt", "I had always thought", "--max-new-tokens", "25"]
    assert main([*common, "--model", str(model_dir)]) == 0
    torch_text = capsys.readouterr().out
    assert main([*common, "--model", str(out), "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == torch_text
    sampled = ["--do-sample", "--temperature", "0.9", "--seed", "5"]
    assert main([*common, *sampled, "--model", str(model_dir)]) == 0
    torch_text = capsys.readouterr().out
    assert main([*common, *sampled, "--model", str(out), "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == torch_text

    assert main([*common, "--model", str(model_dir), "--backend", "onnx"]) == 2
    assert "no prefill.onnx; write an ONNX model directory with `gpt2kit export onnx" in capsys.readouterr().err
    assert main([*common, "--model", str(out), "--backend", "onnx", "--dtype", "bf16"]) == 2
    assert "float32 on the CPU" in capsys.readouterr().err


def test_generation_defaults_and_the_tokenizer_go_with_the_export(model_dir, tmp_path, capsys):
    """generation_config.json's defaults apply to --backend onnx as to PyTorch (the export left them out, and the
    two backends printed different text); a model object exports with the tokenizer it is given."""
    source = tmp_path / "model"
    shutil.copytree(model_dir, source)
    defaults = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "max_new_tokens": 12}
    (source / "generation_config.json").write_text(json.dumps(defaults))
    out = export_onnx(source, tmp_path / "onnx")
    assert OnnxLMHeadModel(out).generation_config == defaults
    common = ["generate", "--prompt", "I had always thought"]
    assert main([*common, "--model", str(source)]) == 0
    torch_text = capsys.readouterr().out
    assert main([*common, "--model", str(out), "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == torch_text

    lm, tokenizer = GPT2LMHeadModel.from_pretrained(source), GPT2Tokenizer.from_pretrained(source)
    assert main(["export", "onnx", "--model", str(source), "--output", str(tmp_path / "gpt2-vocab"), "--tokenizer",
                 "gpt2"]) == 2
    assert "the tokenizer has 50257 tokens but the model's vocab_size is 512" in capsys.readouterr().err
    assert not (tmp_path / "gpt2-vocab").exists()
    from_object = export_onnx(lm, tmp_path / "from-object", tokenizer=tokenizer)
    assert OnnxLMHeadModel(from_object).generation_config == defaults
    text = "I had always thought Jack"
    assert GPT2Tokenizer.from_pretrained(from_object).encode(text) == tokenizer.encode(text)


def test_a_graph_with_external_weights_is_gathered_into_one_data_file(exported, tmp_path):
    """What the exporter writes past 2 GB (one file per weight, named after it), placed as <graph>.onnx.data."""
    from gpt2kit.export import place_graph

    staging = tmp_path / ".prefill-export"
    staging.mkdir()
    graph = onnx.load(str(exported / PREFILL_NAME))
    onnx.save_model(graph, str(staging / PREFILL_NAME), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(staging.iterdir())) > 2
    place_graph(staging, tmp_path / PREFILL_NAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREFILL_NAME, f"{PREFILL_NAME}.data"]
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    expected = ort.InferenceSession(str(exported / PREFILL_NAME)).run(["logits"], feeds)[0]
    got = ort.InferenceSession(str(tmp_path / PREFILL_NAME)).run(["logits"], feeds)[0]
    np.testing.assert_array_equal(got, expected)


def test_a_short_context_exports_and_matches_pytorch(tmp_path):
    from gpt2kit import GPT2Config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=4, vocab_size=64)).eval()
    onnx_model = OnnxLMHeadModel(export_onnx(model, tmp_path / "short"))
    ids = torch.tensor([[1, 2]])
    assert torch.equal(generate(onnx_model, ids, max_new_tokens=2), generate(model, ids, max_new_tokens=2))
    with torch.no_grad():  # int32 ids work as in PyTorch
        torch.testing.assert_close(onnx_model(ids.int()).logits, model(ids.int()).logits, atol=1e-5, rtol=1e-5)


def test_exporting_leaves_the_callers_random_stream_alone(model, tmp_path):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    export_onnx(model, tmp_path / "onnx")  # its traced example inputs were drawn from the global generator
    assert torch.equal(torch.rand(3), expected)
    # The exporter restores its wrapper's (training) mode onto the wrapped model: the caller's mode comes back.
    assert not model.training


def test_exports_that_would_lose_the_model_or_misread_it_are_refused(model_dir, tmp_path):
    from gpt2kit import GPT2Config, GPT2ForSequenceClassification

    with pytest.raises(ValueError, match="the output would replace the model being exported"):
        export_onnx(model_dir, model_dir.parent, overwrite=True)
    assert (model_dir / "model.safetensors").is_file()
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "clf")
    with pytest.raises(ValueError, match="a sequence-classification checkpoint"):
        export_onnx(tmp_path / "clf", tmp_path / "out")
    with pytest.raises(TypeError, match="only a GPT2LMHeadModel .* got GPT2ForSequenceClassification"):
        export_onnx(GPT2ForSequenceClassification.from_pretrained(tmp_path / "clf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_onnx_or_onnxruntime_the_error_says_what_to_install(model_dir, exported, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as in an install without the [onnx] extra
    assert main(["export", "onnx", "--model", str(model_dir), "--output", str(tmp_path / "out")]) == 2
    # One line, said before the model is traced; nothing written, not even a temporary directory.
    assert capsys.readouterr().err == ("gpt2kit export: error: ONNX export needs the onnx package: "
                                       "pip install 'gpt2kit[onnx]'\n")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"^the onnx backend needs the onnxruntime package: "
                                          r"pip install 'gpt2kit\[onnx\]'$"):
        OnnxLMHeadModel(exported)


def test_a_corrupt_onnx_directory_is_one_error_naming_the_file(exported, tmp_path, capsys):
    generate_command = ["generate", "--backend", "onnx", "--prompt", "I had", "--max-new-tokens", "3", "--model"]
    truncated = shutil.copytree(exported, tmp_path / "truncated")
    (truncated / PREFILL_NAME).write_bytes((exported / PREFILL_NAME).read_bytes()[:1000])
    assert main([*generate_command, str(truncated)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2kit generate: error: {truncated / PREFILL_NAME}: onnxruntime cannot load it (")
    assert err.count("\n") == 1

    # A graph whose weights are in a .data file beside it (as past 2 GB), copied without that file.
    no_data = shutil.copytree(exported, tmp_path / "no-data")
    onnx.save_model(onnx.load(str(exported / DECODE_NAME)), str(no_data / DECODE_NAME), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{DECODE_NAME}.data")
    (no_data / f"{DECODE_NAME}.data").unlink()
    assert main([*generate_command, str(no_data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2kit generate: error: {no_data / DECODE_NAME}: onnxruntime cannot load it (")
    assert f"{DECODE_NAME}.data" in err and err.count("\n") == 1

    swapped = shutil.copytree(exported, tmp_path / "swapped")  # a graph without the cache inputs
    shutil.copyfile(exported / PREFILL_NAME, swapped / DECODE_NAME)
    with pytest.raises(ValueError, match=f"{DECODE_NAME}: not a graph of `gpt2kit export onnx` "
                                         r"\(no past_keys, past_values\)"):
        OnnxLMHeadModel(swapped)


@pytest.mark.parametrize("field, value, graph, tensor", [
    ("n_layer", 3, PREFILL_NAME, "present_keys"), ("n_head", 2, PREFILL_NAME, "present_keys"),
    ("n_embd", 96, PREFILL_NAME, "present_keys"), ("vocab_size", 600, PREFILL_NAME, "logits")])
def test_a_config_json_that_disagrees_with_the_graphs_is_refused(exported, tmp_path, field, value, graph, tensor):
    directory = shutil.copytree(exported, tmp_path / "mismatched")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError) as error:
        OnnxLMHeadModel(directory)
    assert str(error.value).startswith(f"{directory / graph}: {tensor} has shape ")
    assert f"but {directory / 'config.json'} has {field} {value} " in str(error.value)


def test_onnx_forward_checks_its_inputs_as_pytorch_does(exported, model):
    onnx_model = OnnxLMHeadModel(exported)
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])

    def error(module, *args, **kwargs):
        with pytest.raises(Exception) as info, torch.no_grad():
            module(*args, **kwargs)
        return info.type, str(info.value)

    for args, kwargs in [((ids,), {"past_key_values": KVCache(model.config, 2, 2)}),  # no room for 3 positions
                         ((ids, torch.ones(2, 5, dtype=torch.long)), {})]:  # a mask of 5 positions for 3
        expected = error(model, *args, **kwargs)
        assert expected[0] is ValueError and error(onnx_model, *args, **kwargs) == expected
    # Ids outside the vocabulary: onnxruntime's Gather would count -1 from the end and return logits.
    for bad in (-1, 512):
        assert error(model, torch.tensor([[3, bad]]))[0] is IndexError
        kind, message = error(onnx_model, torch.tensor([[3, bad]]))
        assert kind is IndexError and message.startswith(f"index out of range: token id {bad} ")


def test_the_exported_config_names_the_graphs_dtype(tmp_path):
    from gpt2kit import GPT2Config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=8, vocab_size=64))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    # transformers before 4.56 called it torch_dtype: both are carried over, both must say float32.
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    exported = export_onnx(tmp_path / "bf16", tmp_path / "onnx")
    config = json.loads((exported / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert json.loads((export_onnx(model, tmp_path / "onnx2") / "config.json").read_text())["dtype"] == "float32"


def test_an_output_that_would_replace_the_model_is_refused_before_already_exists(model_dir, capsys):
    for output in (model_dir, model_dir.parent):
        for overwrite in ([], ["--overwrite"]):
            assert main(["export", "onnx", "--model", str(model_dir), "--output", str(output), *overwrite]) == 2
            assert capsys.readouterr().err == (f"gpt2kit export: error: {output}: the output would replace the "
                                               f"model being exported ({model_dir})\n")
    assert (model_dir / "model.safetensors").is_file()

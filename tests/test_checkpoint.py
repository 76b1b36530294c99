"""HF-format directories in and out: round trips, layouts, and one clear error per kind of bad input."""

import json
import os

import pytest
import torch
import transformers

from gpt2kit import GPT2LMHeadModel, GPT2Model
from gpt2kit.checkpoint import CheckpointError, convert, load_state_dict, parse_size
from gpt2kit.cli import main
from gpt2kit.files import atomic_write_text

SHAPE = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=300, bos_token_id=0, eos_token_id=0)


@pytest.fixture
def hf_model():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def same(a, b):
    """Same weights through transformers' Conv1D and our nn.Linear: equal up to float summation order (relative to
    the logits' size: float32 products through oneDNN, see cpu_matmul, sum in another order than MKL's)."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


IDS = torch.randint(0, 300, (2, 11))


def test_transformers_to_gpt2kit_and_back(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "hf")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert same(logits(ours, IDS), logits(hf_model, IDS))
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(logits(again, IDS), logits(hf_model, IDS))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["n_ctx"] == 64  # llama.cpp's converter reads it


def test_generation_config_json_gives_the_models_generation_defaults(tmp_path, hf_model):
    """transformers' generate starts from a model's generation_config.json (EOS ids, lengths, sampling settings);
    so do gpt2kit's generate and pipelines, and save_pretrained writes it back. It was ignored: generation ran
    past an EOS id listed only there."""
    prompt = IDS[:1]
    hf_model.save_pretrained(tmp_path / "plain")
    free = GPT2LMHeadModel.from_pretrained(tmp_path / "plain").generate(prompt, max_new_tokens=8, eos_token_id=[])
    stop = int(free[0, prompt.shape[1] + 3])
    hf_model.generation_config.eos_token_id = [299, stop]
    hf_model.generation_config.max_new_tokens = 8
    hf_model.save_pretrained(tmp_path / "hf")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert ours.generation_config["eos_token_id"] == [299, stop] and ours.generation_config["max_new_tokens"] == 8
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    expected = theirs.generate(prompt, do_sample=False)
    assert torch.equal(ours.generate(prompt), expected) and expected.shape[1] < free.shape[1]
    ours.save_pretrained(tmp_path / "ours")
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "ours").generation_config == ours.generation_config
    # A model without generation defaults saved over it: the old file's settings became the new model's.
    GPT2LMHeadModel(ours.config).save_pretrained(tmp_path / "other")
    GPT2LMHeadModel.from_pretrained(tmp_path / "other").save_pretrained(tmp_path / "ours")
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "ours").generation_config == {}
    ours.save_pretrained(tmp_path / "ours")
    # transformers loads a file with both lengths (max_new_tokens wins) or a minimum above the default maximum.
    (tmp_path / "ours" / "generation_config.json").write_text(
        '{"max_length": 50, "max_new_tokens": 3, "min_new_tokens": 30, "eos_token_id": 299}')
    both = GPT2LMHeadModel.from_pretrained(tmp_path / "ours")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(both.generate(prompt), theirs.generate(prompt, do_sample=False))
    assert both.generate(prompt).shape[1] == prompt.shape[1] + 3
    (tmp_path / "ours" / "generation_config.json").write_text('{"top_p": 7}')
    with pytest.raises(CheckpointError, match=r"generation_config.json: top_p must be in \(0, 1\]"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "ours")


def test_pytorch_bin_and_sharded_layouts(tmp_path, hf_model):
    ref = logits(hf_model, IDS)
    (tmp_path / "bin").mkdir()
    hf_model.config.save_pretrained(tmp_path / "bin")
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ref = logits(GPT2LMHeadModel.from_pretrained(tmp_path / "bin"), IDS)
    assert same(ref, logits(hf_model, IDS))

    convert(tmp_path / "bin", tmp_path / "sharded", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "sharded"), IDS), ref)
    assert same(logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "sharded").eval(), IDS), ref)

    assert main(["convert", "--input", str(tmp_path / "sharded"), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "merged"), IDS), ref)
    assert main(["convert", "--input", str(tmp_path / "merged"), "--output", str(tmp_path / "bin2"),
                 "--format", "bin"]) == 0
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "bin2"), IDS), ref)


def test_bare_gpt2model_checkpoint_loads_into_both_classes(tmp_path):
    hf = transformers.GPT2Model(transformers.GPT2Config(**SHAPE)).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = GPT2Model.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert same(ours(IDS).last_hidden_state, hf(IDS).last_hidden_state)
    lm = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    assert torch.equal(lm.lm_head.weight, hf.wte.weight)


def test_name_resolves_in_local_hf_cache_only(tmp_path, monkeypatch, hf_model):
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "0123abc"
    hf_model.save_pretrained(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert same(logits(GPT2LMHeadModel.from_pretrained("gpt2"), IDS), logits(hf_model, IDS))
    with pytest.raises(CheckpointError, match="never downloads"):
        GPT2LMHeadModel.from_pretrained("gpt2-medium")


def test_save_is_atomic_and_replaces_old_dir(tmp_path, tiny_model, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "m")
    import safetensors.torch

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dir left, old model intact
    GPT2LMHeadModel.from_pretrained(tmp_path / "m")


def test_compiled_model_saves_clean_names(tmp_path, tiny_model):
    wrapper = torch.nn.Module()
    wrapper._orig_mod = tiny_model  # the attribute torch.compile's OptimizedModule uses
    wrapper.config = tiny_model.config
    from gpt2kit.checkpoint import gpt2kit_to_hf
    assert not any("_orig_mod" in k for k in gpt2kit_to_hf(wrapper))


def test_bad_inputs_give_one_clear_error(tmp_path, tiny_model, capsys):
    with pytest.raises(CheckpointError, match="no model directory"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "missing")
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m")

    tiny_model.save_pretrained(tmp_path / "m2")
    config = json.loads((tmp_path / "m2" / "config.json").read_text())
    (tmp_path / "m2" / "config.json").write_text(json.dumps({**config, "n_embd": 128, "n_head": 4}))
    with pytest.raises(CheckpointError, match=r"m2/model.safetensors: .*c_attn.bias has shape \(192,\), "
                                              r"config.json implies \(384,\)"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m2")
    # The shard that holds the tensor is named (the directory was).
    tiny_model.save_pretrained(tmp_path / "m3", max_shard_size="100KB")
    config = json.loads((tmp_path / "m3" / "config.json").read_text())
    (tmp_path / "m3" / "config.json").write_text(json.dumps({**config, "n_inner": 2 * config["n_embd"]}))
    index = json.loads((tmp_path / "m3" / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.raises(CheckpointError, match=rf"m3/{index['transformer.h.0.mlp.c_fc.bias']}: "
                                              r"transformer.h.0.mlp.c_fc.bias has shape \(256,\), config.json "
                                              r"implies \(128,\)"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m3")
    # A Conv1D weight's shapes as the file stores them, (in, out): they were shown transposed.
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "m4")
    state = load_file(tmp_path / "m4" / "model.safetensors")
    state["h.1.mlp.c_proj.weight" if "h.1.mlp.c_proj.weight" in state else "transformer.h.1.mlp.c_proj.weight"] = \
        torch.zeros(128, 64)
    save_file(state, tmp_path / "m4" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"m4/model.safetensors: transformer.h.1.mlp.c_proj.weight has shape "
                                              r"\(128, 64\), config.json implies \(256, 64\)"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m4")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_state_dict(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("[" * 100000 + "]" * 100000)  # a RecursionError's traceback
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "config.json: not valid JSON here (nested deeper than Python's parser goes)" in capsys.readouterr().err

    assert main(["info", "gpt3"]) == 2
    err = capsys.readouterr().err
    assert "no model directory or local HF cache entry for 'gpt3'" in err and "(presets: gpt2, " in err


def test_bin_files_are_never_unpickled_with_code(tmp_path, tiny_model):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    tiny_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save({"x": Evil()}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: holds more than tensors and plain containers, "
                                              r"which loading never runs \(Unsupported global: GLOBAL print") as caught:
        GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert "weights_only` set to `False`" not in str(caught.value) and "safe_globals" not in str(caught.value)
    (tmp_path / "m" / "pytorch_model.bin").unlink()
    tiny_model.save_pretrained(tmp_path / "s")
    os.replace(tmp_path / "s" / "model.safetensors", tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: is a safetensors file; name it model.safetensors"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m")


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("10KiB") == 10240
    assert parse_size(5) == 5
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")
    for nothing in ("0", 0, -1):  # one shard per tensor
        with pytest.raises(ValueError, match="less than one byte"):
            parse_size(nothing)


def test_atomic_outputs_get_the_permissions_open_and_mkdir_give(tmp_path, tiny_config):
    """Outputs are built as temporary siblings (which tempfile makes private) and renamed: the result must be
    as readable as any file the user writes, e.g. for a service account that serves the model."""
    umask = os.umask(0o022)
    os.umask(umask)
    model_dir = tmp_path / "model"
    GPT2LMHeadModel(tiny_config).save_pretrained(model_dir)
    text = atomic_write_text(tmp_path / "notes.txt", "hi")
    assert model_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in [text, *model_dir.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_save_keeps_the_directorys_other_files_and_drops_old_weights(tmp_path, hf_model):
    """Like transformers' save_pretrained: a tokenizer, a README or a folder beside the model stay (with their
    permissions); weights of an earlier layout (shards, .bin) go, so the loader cannot find stale ones."""
    from gpt2kit import GPT2Tokenizer

    model_dir = tmp_path / "m"
    convert_source = tmp_path / "hf"
    hf_model.save_pretrained(convert_source)
    convert(convert_source, model_dir, weights_format="bin", max_shard_size="100KB")
    GPT2Tokenizer.gpt2().save_pretrained(model_dir)
    (model_dir / "README.md").write_text("my notes")
    (model_dir / "README.md").chmod(0o600)
    (model_dir / "runs").mkdir()
    (model_dir / "runs" / "log.txt").write_text("log")
    GPT2LMHeadModel.from_pretrained(model_dir).save_pretrained(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md", "chat_template.jinja", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "runs", "tokenizer_config.json", "vocab.json"]  # generation_config.json: transformers' own, carried by convert
    assert (model_dir / "README.md").read_text() == "my notes"
    assert (model_dir / "README.md").stat().st_mode & 0o777 == 0o600
    assert (model_dir / "runs" / "log.txt").read_text() == "log"
    assert GPT2Tokenizer.from_pretrained(model_dir).encode("hello world") == GPT2Tokenizer.gpt2().encode("hello world")
    assert same(logits(transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval(), IDS), logits(hf_model, IDS))


def test_save_through_a_symlink_replaces_the_directory_it_points_to(tmp_path, tiny_model):
    real, link = tmp_path / "real", tmp_path / "link"
    tiny_model.save_pretrained(real)
    (real / "tokenizer.json").write_text("{}")
    link.symlink_to(real, target_is_directory=True)
    tiny_model.save_pretrained(link)
    assert link.is_symlink() and (link / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in real.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_config_dtype_follows_the_saved_tensors(tmp_path):
    """A bf16 checkpoint loaded as float32 and saved must not keep `dtype: bfloat16`: transformers would load the
    float32 weights rounded to bf16."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    with torch.no_grad():
        ours.transformer.wte.weight.add_(1e-4)  # float32 detail bf16 cannot hold
    ours.save_pretrained(tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fp32")
    assert again.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(again.transformer.wte.weight, ours.transformer.wte.weight)


def test_a_files_dtype_counts_its_old_mask_buffers_as_transformers_does(tmp_path):
    """Older hub files keep each layer's float32 causal mask (h.N.attn.bias) beside float16 weights; without a dtype
    in config.json transformers takes the first floating-point tensor's, a mask's, so gpt2kit does too."""
    from safetensors.torch import save_file

    hf = transformers.GPT2Model(transformers.GPT2Config(**SHAPE))
    state = {key: value.half().contiguous() for key, value in hf.state_dict().items()}
    state |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)}
    (tmp_path / "old").mkdir()
    save_file(state, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in hf.config.to_dict().items() if k not in ("dtype", "torch_dtype")}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    expected = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "old").dtype
    assert expected == torch.float32 and GPT2LMHeadModel.from_pretrained(tmp_path / "old").dtype == expected


def test_label_count_survives_without_label_names(tmp_path):
    from gpt2kit import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(**SHAPE, num_labels=3))
    model.save_pretrained(tmp_path / "cls")
    assert GPT2ForSequenceClassification.from_pretrained(tmp_path / "cls").config.num_labels == 3
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert hf.config.num_labels == 3 and torch.equal(hf.score.weight, model.score.weight)


def test_a_new_head_of_num_labels_over_a_config_naming_one_class(tmp_path, hf_model):
    """Configs of older transformers (distilgpt2's) name one class, LABEL_0: from_pretrained(num_labels=3), the
    documented start of a classifier, was refused for disagreeing with it."""
    from gpt2kit import GPT2ForSequenceClassification

    hf_model.save_pretrained(tmp_path / "lm")
    values = json.loads((tmp_path / "lm" / "config.json").read_text())
    values.update(_num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (tmp_path / "lm" / "config.json").write_text(json.dumps(values))
    ours = GPT2ForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3)
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3)
    assert ours.config.num_labels == theirs.config.num_labels == 3 and ours.score.weight.shape == (3, SHAPE["n_embd"])
    named = GPT2ForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2, id2label={0: "no", 1: "yes"})
    assert named.config.id2label == {0: "no", 1: "yes"}


def test_legacy_pytorch_bin_format_loads(tmp_path, hf_model):
    """torch's pre-1.6 (non-zip) format, still found in older hub uploads, cannot be memory-mapped: read it whole,
    still with weights_only."""
    (tmp_path / "old").mkdir()
    hf_model.config.save_pretrained(tmp_path / "old")
    torch.save(hf_model.state_dict(), tmp_path / "old" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert same(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "old"), IDS), logits(hf_model, IDS))


def test_gpt2model_skips_an_untied_lm_head(tmp_path):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE, tie_word_embeddings=False)).eval()
    hf.save_pretrained(tmp_path / "untied")
    with torch.no_grad():
        assert same(GPT2Model.from_pretrained(tmp_path / "untied")(IDS).last_hidden_state,
                    hf.transformer(IDS).last_hidden_state)


def test_a_directory_with_several_layouts_is_read_in_transformers_order(tmp_path, hf_model):
    """A hub repo given safetensors beside its .bin shards: transformers reads model.safetensors, so must we."""
    hf_model.save_pretrained(tmp_path / "m")
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()
    other.save_pretrained(tmp_path / "other")
    convert(tmp_path / "other", tmp_path / "bin", weights_format="bin", max_shard_size="100KB")
    for f in (tmp_path / "bin").glob("pytorch_model*"):
        f.rename(tmp_path / "m" / f.name)
    assert (tmp_path / "m" / "pytorch_model.bin.index.json").exists()
    expected = logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval(), IDS)
    assert same(expected, logits(hf_model, IDS)) and not same(expected, logits(other, IDS))
    assert same(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "m"), IDS), expected)


def test_a_malformed_shard_index_is_one_clear_error(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    for weight_map in ([], {"transformer.wte.weight": None}):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard file names"):
            load_state_dict(tmp_path / "m")


def test_the_cache_snapshot_is_the_one_refs_main_names(tmp_path, monkeypatch, hf_model):
    repo = tmp_path / "xdg" / "huggingface" / "hub" / "models--openai-community--gpt2"
    hf_model.save_pretrained(repo / "snapshots" / "aaa")
    newer = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()
    newer.save_pretrained(repo / "snapshots" / "bbb")  # modified last, but not what main names
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # huggingface_hub's default cache is under it
    assert same(logits(GPT2LMHeadModel.from_pretrained("gpt2"), IDS), logits(hf_model, IDS))
    (repo / "refs" / "main").unlink()
    assert same(logits(GPT2LMHeadModel.from_pretrained("gpt2"), IDS), logits(newer, IDS))  # no ref: the newest


def test_config_aliases_mean_their_fields(tmp_path, hf_model):
    """transformers reads num_attention_heads (and the other generic names) as n_head: so must we, or the
    weights load with the wrong number of heads and no shape to tell."""
    hf_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["num_attention_heads"] = config.pop("n_head")
    config["hidden_size"] = config.pop("n_embd")
    path.write_text(json.dumps(config))
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert (ours.config.n_head, ours.config.n_embd) == (4, 64)
    assert "num_attention_heads" not in ours.config.to_hf_dict()
    assert same(logits(ours, IDS), logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m"), IDS))
    path.write_text(json.dumps({**config, "n_head": 8}))
    with pytest.raises(CheckpointError, match=r"num_attention_heads \(4\) and n_head \(8\) disagree"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m")


def test_weights_load_in_the_dtype_transformers_gives_them(tmp_path, hf_model):
    """config.json's dtype decides when it names one; a file of mixed dtypes becomes one dtype; a file of integer
    weights is an error naming the tensor."""
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    for named in ("float32", "float16"):
        path.write_text(json.dumps({**config, "dtype": named}))
        expected = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").dtype
        assert expected == getattr(torch, named)
        assert GPT2LMHeadModel.from_pretrained(tmp_path / "m").transformer.wte.weight.dtype == expected
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    # Names as transformers takes them (a TypeError from .to() after every weight was read, before).
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "m", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "m", dtype="auto").lm_head.weight.dtype == expected
    with pytest.raises(ValueError, match="unknown dtype 'int8'; expected auto or one of float32"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "nowhere", dtype="int8")  # before the directory is looked for

    from safetensors.torch import load_file, save_file
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}))
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    # transformers takes the first floating-point tensor's dtype, by sorted name (not the file's byte order).
    for name, dtype in (("transformer.ln_f.weight", torch.bfloat16),
                        ("transformer.h.0.attn.c_attn.bias", torch.float32)):
        save_file({**state, name: state[name].float()}, weights)
        assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").dtype == dtype
        mixed = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
        assert {p.dtype for p in mixed.parameters()} == {dtype} and mixed.dtype == dtype
        mixed(IDS)  # one dtype: the forward runs
    save_file({**state, "transformer.ln_f.weight": state["transformer.ln_f.weight"].long()}, weights)
    with pytest.raises(CheckpointError, match="transformer.ln_f.weight is torch.int64, expected floating-point"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m")


def test_a_tied_checkpoint_may_store_its_one_matrix_as_the_lm_head(tmp_path, hf_model):
    from safetensors.torch import load_file, save_file

    hf_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state["lm_head.weight"] = state.pop("transformer.wte.weight")
    save_file(state, weights, metadata={"format": "pt"})
    assert same(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "m"), IDS), logits(hf_model, IDS))


def test_info_reads_cache_names_and_says_whether_the_head_is_tied(tmp_path, monkeypatch, capsys):
    from gpt2kit import GPT2Config

    GPT2LMHeadModel(GPT2Config(**SHAPE, tie_word_embeddings=False)).save_pretrained(
        tmp_path / "hub" / "models--someone--untied" / "snapshots" / "abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["info", "someone/untied"]) == 0
    out = capsys.readouterr().out
    assert "separate from wte" in out and f"{2 * 300 * 64 + 64 * 64:,}" not in out
    assert main(["info", "gpt2"]) == 0 and "tied to wte" in capsys.readouterr().out


def test_a_missing_config_names_the_directory_once(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError) as err:
        GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert str(err.value).count(str(tmp_path / "m")) == 1


def test_convert_carries_the_directorys_other_files_and_a_head_only_tied_matrix(tmp_path, hf_model):
    from safetensors.torch import load_file, save_file

    from gpt2kit import GPT2Tokenizer

    hf_model.save_pretrained(tmp_path / "m")
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text('{"max_new_tokens": 7}\n')
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state["lm_head.weight"] = state.pop("transformer.wte.weight")  # the tied matrix stored as the head only
    save_file(state, weights, metadata={"format": "pt"})
    convert(tmp_path / "m", tmp_path / "out", max_shard_size="100KB")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"vocab.json", "merges.txt", "generation_config.json"} <= names and "model.safetensors" not in names
    assert (tmp_path / "out" / "generation_config.json").read_text() == '{"max_new_tokens": 7}\n'
    expected = logits(hf_model, IDS)
    assert same(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "out"), IDS), expected)
    assert same(logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval(), IDS), expected)


def test_a_tied_config_with_a_different_head_in_the_file_loads_untied_like_transformers(tmp_path, hf_model):
    from safetensors.torch import load_file, save_file

    hf_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])  # config.json still says tied
    save_file(state, weights, metadata={"format": "pt"})
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    with pytest.warns(UserWarning, match="ties the LM head to the token embedding, but the weights hold an "
                                         "lm_head.weight of their own; loaded untied"):
        ours = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert same(logits(ours, IDS), logits(theirs, IDS))
    convert(tmp_path / "m", tmp_path / "out")  # keeps the head (it dropped it, and the logits changed)
    assert same(logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval(), IDS),
                logits(theirs, IDS))


def test_config_copies_never_share_their_dicts_with_the_presets(tmp_path):
    from gpt2kit import GPT2Config, GPT2ForSequenceClassification
    from gpt2kit.config import PRESETS

    config = GPT2Config.from_name("gpt2-tiny")
    assert config.extra is not PRESETS["gpt2-tiny"].extra
    GPT2ForSequenceClassification(GPT2Config.from_name("gpt2-tiny")).save_pretrained(tmp_path / "cls")
    GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).save_pretrained(tmp_path / "lm")  # was saved as a classifier
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    labelled = GPT2Config(**SHAPE, id2label={0: "neg", 1: "pos"})
    assert labelled.replace(n_layer=1).id2label is not labelled.id2label
    with pytest.raises(ValueError, match="num_labels=4 but id2label names 2 classes"):
        labelled.replace(num_labels=4)  # it was ignored
    assert labelled.replace(num_labels=4, id2label=None, label2id=None).num_labels == 4


def test_config_json_errors_name_the_file(tmp_path, hf_model, capsys):
    hf_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    for change, message in (({"n_head": 5}, r"config.json: n_embd \(64\) must be divisible by n_head \(5\)"),
                            ({"id2label": ["a", "b"]}, "config.json: id2label must map class ids to names")):
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            GPT2LMHeadModel.from_pretrained(tmp_path / "m")
        assert main(["convert", "--input", str(tmp_path / "m"), "--output", str(tmp_path / "out")]) == 2
        assert "config.json: " in capsys.readouterr().err


def test_convert_edge_cases(tmp_path, hf_model, monkeypatch):
    import stat

    # A .bin holding more than weights, e.g. a training checkpoint: one error naming the entry.
    (tmp_path / "ckpt").mkdir()
    hf_model.config.save_pretrained(tmp_path / "ckpt")
    torch.save({"model": hf_model.state_dict(), "step": 10}, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: 'model' holds a OrderedDict, not a tensor"):
        convert(tmp_path / "ckpt", tmp_path / "out")
    # An untied head stored as a view of the embedding's memory (safetensors refuses shared tensors).
    hf_model.config.tie_word_embeddings = False
    hf_model.config.save_pretrained(tmp_path / "ckpt")
    state = dict(hf_model.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"][:]
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    convert(tmp_path / "ckpt", tmp_path / "out")
    assert same(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "out"), IDS), logits(hf_model, IDS))
    # convert keeps the dtype the model loads in (config.json's), and the tensors as they are.
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    convert(tmp_path / "ckpt", tmp_path / "out", weights_format="bin")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").dtype == torch.float16
    # An existing output directory keeps its mode; "." works; a leftover set-aside directory blocks nothing.
    os.chmod(tmp_path / "out", 0o2750)
    (tmp_path / f".out.old-{os.getpid()}").mkdir()
    (tmp_path / f".out.old-{os.getpid()}" / "x").write_text("left by a killed run with this pid")
    convert(tmp_path / "ckpt", tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o2750
    # The current directory (or one above it) would be replaced under the process and its shell: refused.
    monkeypatch.chdir(tmp_path / "out")
    for target in (".", ".."):
        with pytest.raises(ValueError, match="is the current directory or one above it"):
            convert(tmp_path / "ckpt", target)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_tokenizer_saved_with_the_model_replaces_other_vocabulary_files(tmp_path, tiny_model):
    from gpt2kit import GPT2Tokenizer
    from gpt2kit.checkpoint import save_pretrained
    from gpt2kit.tokenizer import train_bpe

    (tmp_path / "corpus.txt").write_text("the cat sat on the mat " * 50)
    small = train_bpe([tmp_path / "corpus.txt"], 300, tmp_path / "small")
    small.save_pretrained(tmp_path / "out")  # an earlier export: tokenizer.json of 300 ids
    save_pretrained(tiny_model.float(), tmp_path / "out", tokenizer=GPT2Tokenizer.gpt2())  # as the DCP merge does
    assert GPT2Tokenizer.from_file(tmp_path / "out").vocab_size == 50257


def test_info_describes_what_loading_the_name_loads(tmp_path, monkeypatch, capsys):
    """A bare GPT2Model directory has no LM head (it was counted untied); a directory named like a preset is the
    directory, as from_pretrained and --model read it (info described the preset)."""
    from gpt2kit import GPT2Config

    bare = GPT2Model(GPT2Config(**SHAPE, tie_word_embeddings=False))
    bare.save_pretrained(tmp_path / "bare")
    assert main(["info", str(tmp_path / "bare")]) == 0
    out = capsys.readouterr().out
    assert f"{bare.num_parameters():,}" in out and "no LM head" in out
    GPT2LMHeadModel(GPT2Config(**SHAPE)).save_pretrained(tmp_path / "gpt2-tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "gpt2-tiny"]) == 0 and "hidden       64\n" in capsys.readouterr().out
    assert main(["info", "gpt2-tiny", "--parallel", "data=2"]) == 0 and "64" in capsys.readouterr().out


def test_convert_replaces_the_outputs_vocabulary_with_the_inputs(tmp_path, hf_model):
    """An earlier output's tokenizer.json outlived --overwrite beside the input's vocab.json + merges.txt, and
    loaders read it first: the new weights with the old vocabulary."""
    from gpt2kit import GPT2Tokenizer
    from gpt2kit.tokenizer import train_bpe

    hf_model.save_pretrained(tmp_path / "src")
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "src")
    hf_model.save_pretrained(tmp_path / "out")
    train_bpe([], 300, tmp_path / "out", texts=["hello world foo bar baz"] * 50, progress=False)
    convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert GPT2Tokenizer.from_file(tmp_path / "out").encode("hello world") == [31373, 995]


def test_convert_keeps_the_dtype_a_mixed_bin_loads_in(tmp_path, hf_model):
    """With no dtype in config.json, the first floating tensor in file order decides: a .bin whose first is
    float16 loaded in float16, its safetensors copy (sorted by name) in float32."""
    (tmp_path / "mix").mkdir()
    config = hf_model.config.to_dict()
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "mix" / "config.json").write_text(json.dumps(config))
    state = {k: (v.half() if k == "transformer.wte.weight" else v) for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    torch.save(state, tmp_path / "mix" / "pytorch_model.bin")
    convert(tmp_path / "mix", tmp_path / "out")
    for directory in ("mix", "out"):
        assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / directory).dtype == torch.float16
        assert next(GPT2LMHeadModel.from_pretrained(tmp_path / directory).parameters()).dtype == torch.float16


def test_info_counts_a_classifiers_head(tmp_path, capsys):
    from gpt2kit import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(**SHAPE, num_labels=3))
    model.save_pretrained(tmp_path / "cls")
    assert main(["info", str(tmp_path / "cls")]) == 0
    out = capsys.readouterr().out
    assert f"{model.num_parameters():,}" in out and "classification head of 3 labels" in out


def test_a_shard_index_that_is_not_utf8_is_one_clear_error(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    (tmp_path / "m" / "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xff"}')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not valid JSON"):
        load_state_dict(tmp_path / "m")


def test_saved_files_reach_the_disk_before_their_names_are_published(tmp_path, tiny_model, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    tiny_model.save_pretrained(tmp_path / "m")
    published = events.index(("replace", str(tmp_path / "m")))
    synced = [path for kind, path in events[:published] if kind == "fsync"]
    assert any(path.endswith("model.safetensors") for path in synced)
    assert any(path.endswith("config.json") for path in synced)
    atomic_write_text(tmp_path / "report.json", "{}")
    published = events.index(("replace", str(tmp_path / "report.json")))
    assert events[published - 1][0] == "fsync" and ".report.json." in events[published - 1][1]


def test_attention_variants_load_or_are_refused_by_name(tmp_path):
    """reorder_and_upcast_attn only changes transformers' rounding in half precision: it loads, with the same
    logits in float32. The variants that change the function are refused, each naming its field."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE, reorder_and_upcast_attn=True)).eval()
    hf.save_pretrained(tmp_path / "upcast")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "upcast")
    assert same(logits(ours, IDS), logits(hf, IDS)) and ours.config.reorder_and_upcast_attn
    ours.save_pretrained(tmp_path / "again")  # and saves back as it came
    assert json.loads((tmp_path / "again" / "config.json").read_text())["reorder_and_upcast_attn"] is True
    exact = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE, activation_function="gelu")).eval()
    exact.save_pretrained(tmp_path / "exact")  # exact GELU, as nanoGPT trains
    assert same(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "exact"), IDS), logits(exact, IDS))
    for field, value in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                         ("add_cross_attention", True)):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE, **{field: value}))
        model.save_pretrained(tmp_path / field)
        with pytest.raises(CheckpointError, match=rf"config.json: {field}={value} \(.*\) is not supported"):
            GPT2LMHeadModel.from_pretrained(tmp_path / field)


@pytest.mark.parametrize("head", ["GPT2DoubleHeadsModel", "GPT2ForTokenClassification", "GPT2ForQuestionAnswering"])
def test_another_heads_checkpoint_loads_its_backbone_as_transformers_does(tmp_path, head):
    getattr(transformers, head)(transformers.GPT2Config(**SHAPE)).save_pretrained(tmp_path / head)
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / head).eval()
    assert same(logits(GPT2LMHeadModel.from_pretrained(tmp_path / head), IDS), logits(reference, IDS))
    backbone = transformers.GPT2Model.from_pretrained(tmp_path / head).eval()
    with torch.no_grad():
        torch.testing.assert_close(GPT2Model.from_pretrained(tmp_path / head)(IDS).last_hidden_state,
                                   backbone(IDS).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_transformers_older_torch_dtype_name_and_the_device_and_dtype_properties(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "m", torch_dtype="float16").dtype == torch.float16
    with pytest.raises(ValueError, match="give dtype or its older name torch_dtype, not both"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "m", dtype=torch.float32, torch_dtype=torch.bfloat16)

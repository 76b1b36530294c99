"""Run configs: YAML loading, --section.key overrides, errors naming the key, and every shipped config."""

from pathlib import Path

import pytest

from gpt2kit.cli import main
from gpt2kit.training.config import ConfigError, RunConfig, load_config, parse_overrides, save_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  name: gpt2-tiny\ntrain:\n  max_steps: 10\n"
                           "optim:\n  lr: 1e-3\n  betas: [0.9, 0.99]\n")
    config = load_config(path, parse_overrides(["--train.max_steps", "20", "--optim.min_lr=1e-5",
                                                "--lora.target_modules", "c_attn,c_fc", "--data.seq_len", "64",
                                                "--model.config.resid_pdrop", "0", "--train.grad_clip", "null"]))
    assert config.train.max_steps == 20
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)  # PyYAML reads 1e-3 as a string
    assert config.optim.min_lr == 1e-5
    assert config.optim.betas == (0.9, 0.99)
    assert config.lora.target_modules == ["c_attn", "c_fc"]
    assert config.model.config == {"resid_pdrop": 0}
    assert config.train.grad_clip is None
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_a_warmup_rate_counts_steps_as_written():
    """int(0.29 * 100) is 28: the rate's binary float fell just below the product."""
    from gpt2kit.training.config import OptimArgs

    assert [OptimArgs(warmup_rate=rate).warmup_for(100) for rate in (0.29, 0.57, 0.03, 0.055)] == [29, 57, 3, 5]


def test_text_overrides_are_taken_as_typed(tmp_path):
    """YAML cut "Chapter #1:" at its comment, and refused "ROMEO:" (a mapping) and 2024-01-01 (a date)."""
    path = write(tmp_path, "model:\n  name: gpt2-tiny\ntrain:\n  max_steps: 10\nsample:\n  prompt: hi\n")
    for prompt in ("Chapter #1:", "ROMEO:", "[not a list]", "42"):
        assert load_config(path, [("sample.prompt", prompt)]).sample.prompt == prompt
    config = load_config(path, [("out_dir", "2024-01-01"), ("data.tokenizer", "tok #2"), ("sample.prompt", "null")])
    assert config.out_dir == "2024-01-01" and config.data.tokenizer == "tok #2" and config.sample.prompt is None
    assert load_config(path, [("train.max_steps", "12")]).train.max_steps == 12  # other fields: still YAML


@pytest.mark.parametrize("text, overrides, message", [
    ("train:\n  max_step: 10\n", [], r"run.yaml:2: train.max_step: unknown key; did you mean 'max_steps'\?"),
    ("trian:\n  max_steps: 10\n", [], r"run.yaml:1: trian: unknown key; did you mean 'train'\?"),
    # Other trainers' names (nanoGPT, transformers, MindFormers) point at gpt2kit's key.
    ("train:\n  learning_rate: 0.001\n", [], r"run.yaml:2: train.learning_rate: unknown key; gpt2kit's key for it "
                                            r"is optim.lr;"),
    ("", [("load_checkpoint", "x")], r"--load_checkpoint: unknown key; gpt2kit's key for it is model.checkpoint;"),
    ("", [("block_size", "128")], r"--block_size: unknown key; gpt2kit's key for it is data.seq_len;"),
    ("model:\n  config:\n    block_size: 128\n", [], r"model.config.block_size: not a GPT2Config field; gpt2kit's "
                                                    r"key for it is n_positions"),
    ("train:\n  max_steps: ten\n", [], r"run.yaml:2: train.max_steps: expected int, got 'ten'"),
    ("optim:\n  betas: [0.9]\n", [], r"optim.betas: expected tuple\[float, float\]"),
    ("train: 5\n", [], r"train: expected a mapping"),
    ("train:\n  max_steps: 10\n", [("train.micro_batch", "4")], r"^command line: --train.micro_batch: unknown key"),
    ("train:\n  max_steps: 10\n", [("train.precision", "fp8")], r"train.precision: expected fp32, bf16"),
    # A mapping given whole on the command line: its keys were blamed on the file's lines of the keys it replaced.
    ("model:\n  config:\n    n_positions: 128\n", [("model.config", "{n_positions: abc}")],
     r"^command line: --model.config: model.config.n_positions: expected int, got 'abc'"),
    ("train:\n  max_steps: 10\n", [("train", "{max_steps: ten}")],
     r"^command line: --train: train.max_steps: expected int"),
    ("train:\n  max_steps: 10\n  epochs: 1\n", [], r"give only one of train.max_steps and train.epochs"),
    ("task: summarize\n", [], r"task: expected one of text_generation, text_classification"),
    ("model:\n  config:\n    n_layers: 2\n", [], r"model.config.n_layers: not a GPT2Config field; did you mean "
                                                   r"'n_layer'\?"),
    ("optim:\n  lr: 1e-3\n  min_lr: 1e-2\n", [], r"optim.min_lr: must lie in \[0, lr"),
    ("train:\n  max_steps: 10\n  lr: [1\n", [], r"run.yaml:4:1: not valid YAML: expected ',' or ']'"),
    ("train:\n  grad_clip: -1.0\n", [], r"train.grad_clip: must be positive \(null disables clipping\)"),
    ("train:\n  eval_batches: 0\n", [], r"train.eval_batches: must be at least 1, got 0"),
    ("checkpoint:\n  keep_last: 0\n", [], r"checkpoint.keep_last: must be at least 1, got 0"),
    # checks of values and combinations name the line too
    ("train:\n  precision: bf17\n", [], r"run.yaml:2: train.precision: expected fp32, bf16"),
    ("train:\n  device: tpu\n", [], r"run.yaml:2: train.device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 5\noptim:\n  eps: 0\n", [],
     r"run.yaml:5: optim: given twice \(first on line 1\)"),
    ("train:\n  max_steps: 5\n  max_steps: 7\n", [], r"run.yaml:3: train.max_steps: given twice"),
    ("optim:\n  weight_decay: -5\n", [], r"run.yaml:2: optim.weight_decay: must not be negative"),
    ("optim:\n  warmup_steps: -3\n", [], r"optim.warmup_steps: must be at least 0"),
    ("optim:\n  decay_steps: 0\n", [], r"optim.decay_steps: must be at least 1"),
    ("optim:\n  eps: -1\n", [], r"optim.eps: must be positive"),
    ("optim:\n  lr: -1\n", [], r"run.yaml:2: optim.lr: must be positive, got -1.0"),
    ("optim:\n  betas: [2, 3]\n", [], r"optim.betas: must lie in \[0, 1\)"),
    ("train:\n  max_steps: 10\noptim:\n  warmup_steps: 20\n", [],
     r"run.yaml:4: optim.warmup_steps: 20 warmup steps are longer than the 10 decay"),
    ("data:\n  seq_len: 0\n", [], r"data.seq_len: must be at least 1"),
    # an impossible global batch is said before any data is read (it came after tokenizing, with no line)
    ("train:\n  micro_batch_size: 8\n  global_batch_size: 12\n", [],
     r"run.yaml:3: train.global_batch_size: must be a positive multiple of micro_batch_size 8 = 8, got 12"),
    ("train:\n  micro_batch_size: 4\n  global_batch_tokens: 1000\ndata:\n  seq_len: 64\n", [],
     r"run.yaml:3: train.global_batch_tokens: must be a positive multiple of micro_batch_size 4 x seq_len 64 = 256"),
    ("data:\n  num_workers: -1\n", [], r"data.num_workers: must be at least 0"),
    ("train:\n  eval_interval: -1\n", [], r"train.eval_interval: must be at least 0"),
    ("checkpoint:\n  save_interval: -1\n", [], r"checkpoint.save_interval: must be at least 0"),
    ("lora:\n  dropout: 2\n", [], r"lora.dropout: must lie in \[0, 1\)"),
    ("sample:\n  temperature: -1\n", [], r"sample.temperature: must not be negative"),
    ("model:\n  config:\n    resid_pdrop: 1e-1x\n", [], r"run.yaml:3: model.config.resid_pdrop: expected float"),
    # Not finite: .inf epochs ended in an OverflowError, a NaN weight decay in a diverged loss.
    ("train:\n  max_steps: null\n  epochs: .inf\n", [], r"run.yaml:3: train.epochs: expected a finite number"),
    ("optim:\n  weight_decay: .nan\n", [], r"run.yaml:2: optim.weight_decay: expected a finite number"),
    ("train:\n  max_steps: 5\n", [("sample.temperature", "nan")], r"sample.temperature: expected a finite"),
    ("train:\n  max_steps: 5\n", [("optim.lr", "inf")], r"optim.lr: expected a finite number, got 'inf'"),
    ("model:\n  config:\n    resid_pdrop: .nan\n", [], r"run.yaml:3: model.config.resid_pdrop: expected a finite"),
    ("seed: -5\n", [], r"run.yaml:1: seed: must lie in \[0, 2\*\*32\), got -5"),
    # found when the file is read, not when the trainer builds the model; with their lines
    ("model:\n  name: gpt2-tiny\n  config:\n    n_layer: 0\n", [],
     r"run.yaml:4: model.config.n_layer: n_layer must be an integer >= 1, got 0"),
    ("model:\n  config:\n    n_head: 5\n", [],
     r"run.yaml:3: model.config.n_head: n_embd \(256\) must be divisible by n_head"),
    ("parallel:\n  data: 0\n", [], r"run.yaml:2: parallel.data: must be a positive integer or -1, got 0"),
    ("out_dir: ''\n", [], r"run.yaml:1: out_dir: must not be empty"),
    ("data:\n  train: ' '\n", [], r"run.yaml:2: data.train: must not be empty \(null leaves it unset\)"),
])
def test_config_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_model_config_values_get_their_gpt2config_types(tmp_path):
    """PyYAML reads 1e-5 (no dot) as a string; model.config values are typed like GPT2Config's fields."""
    path = write(tmp_path, "model:\n  config:\n    layer_norm_epsilon: 1e-5\n    n_layer: 2.0\n")
    config = load_config(path, parse_overrides(["--model.config.resid_pdrop", "1e-1"]))
    assert config.model.config == {"layer_norm_epsilon": 1e-5, "n_layer": 2, "resid_pdrop": 0.1}
    assert all(type(v) is t for v, t in zip(config.model.config.values(), (float, int, float)))


def test_a_warmup_longer_than_an_epochs_long_decay_fails_when_the_schedule_is_built(tmp_path):
    import torch

    from gpt2kit.training.optim import build_scheduler

    config = load_config(write(tmp_path, "train:\n  epochs: 1\noptim:\n  warmup_steps: 20\n"))  # steps unknown yet
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="optim.warmup_steps: 20 warmup steps are longer than the 12 decay steps"):
        build_scheduler(optimizer, config.optim, max_steps=12)
    build_scheduler(optimizer, config.optim, max_steps=20)


def test_limits_that_mean_off_stay_valid(tmp_path):
    config = load_config(write(tmp_path, "sample:\n  top_k: 0\n"), parse_overrides(["--train.grad_clip", "null"]))
    assert config.sample.top_k == 0 and config.train.grad_clip is None


def test_a_config_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"train:\n  max_steps: 10\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: not UTF-8 text \(byte 28\)"):
        load_config(path)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="--train.max_steps: missing value"):
        parse_overrides(["--train.max_steps"])
    with pytest.raises(ConfigError, match="unexpected argument 'max_steps'"):
        parse_overrides(["max_steps", "3"])
    # The next option was taken as the left-out value, and its value then blamed as unexpected.
    with pytest.raises(ConfigError, match=r"--train.max_steps: missing value \(the next argument, --optim.lr, is an "):
        parse_overrides(["--train.max_steps", "--optim.lr", "1e-3"])
    assert parse_overrides(["--sample.prompt=--x", "--optim.lr", "-1"]) == [("sample.prompt", "--x"), ("optim.lr", "-1")]
    with pytest.raises(ConfigError, match="a config file is given as --config FILE"):
        parse_overrides(["configs/tiny_shakespeare.yaml"])


def test_cli_reports_config_errors(tmp_path, capsys):
    path = write(tmp_path, "train:\n  max_steps: 10\n")
    assert main(["train", "--config", str(path), "--train.max_stesp", "3"]) == 2
    err = capsys.readouterr().err
    assert "gpt2kit train: error:" in err and "train.max_stesp: unknown key; did you mean 'max_steps'" in err
    assert main(["finetune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "gpt2", "--train.max_steps", "3"])  # only train/finetune take overrides


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.train.max_steps or config.train.epochs


def test_the_configs_the_issue_asks_for_exist():
    names = {p.stem for p in SHIPPED}
    for size in ("small", "medium", "large", "xl", "13b", "52b"):
        assert f"gpt2_{size}" in names
    assert {"gpt2_small_finetune", "gpt2_small_lora", "gpt2_txtcls_sst2", "gpt2_txtcls_cola", "gpt2_txtcls_agnews",
            "tiny_shakespeare", "tiny_zh"} <= names
    lora = load_config(REPO / "configs" / "gpt2_small_lora.yaml")
    assert (lora.pet_method, lora.lora.rank, lora.lora.alpha, lora.lora.dropout) == ("lora", 64, 128, 0.1)
    assert (lora.optim.lr, lora.optim.min_lr, lora.optim.betas, lora.optim.eps, lora.optim.weight_decay) == \
        (1e-3, 1e-4, (0.9, 0.95), 1e-8, 0.1)


def test_a_config_built_in_python_may_hold_paths(tmp_path):
    RunConfig(out_dir=tmp_path / "run").validate()  # Path values: they were .strip()ped


def test_every_peer_name_is_in_the_migration_guide():
    from gpt2kit.training.config import PEER_KEYS

    guide = (REPO / "docs" / "migrating.md").read_text()
    assert [name for name in PEER_KEYS if f"`{name}`" not in guide] == []

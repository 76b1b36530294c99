"""LoRA: only adapters train, adapters save alone (in PEFT's layout), merge preserves outputs, resume is exact."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from gpt2kit import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from gpt2kit.checkpoint import CheckpointError, load_weight_file
from gpt2kit.cli import main
from gpt2kit.tokenizer import GPT2Tokenizer, tokenizer_files
from gpt2kit.training import Trainer, load_config
from gpt2kit.training.config import ConfigError
from gpt2kit.training.logging import read_metrics
from gpt2kit.training.checkpoints import list_checkpoints
from gpt2kit.training.lora import save_adapter

TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=64, bos_token_id=63, eos_token_id=63)
QUIET = {"progress": False, "tensorboard": False, "plot": False}

pytestmark = pytest.mark.usefixtures("one_thread")


class Sequences(Dataset):
    def __init__(self, n: int = 64, seq_len: int = 16, classify: bool = False) -> None:
        self.data = torch.randint(0, 62, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))
        self.data[:, 1::2] = (self.data[:, 0::2][:, : self.data[:, 1::2].shape[1]] + 1) % 62
        self.classify = classify
        if classify:
            self.labels = (self.data[:, 0] % 2).tolist()
            self.num_labels, self.id2label = 2, {0: "even", 1: "odd"}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        if self.classify:
            return {"input_ids": self.data[i, :-1], "labels": self.labels[i]}
        return {"input_ids": self.data[i, :-1], "targets": self.data[i, 1:]}


@pytest.fixture
def base_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    GPT2LMHeadModel(TINY).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_config(tmp_path: Path, base: Path, name: str = "run", **train):
    return load_config(
        out_dir=str(tmp_path / name), pet_method="lora", model={"name": str(base)},
        lora={"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["c_attn", "c_proj"]},
        train={"max_steps": 8, "micro_batch_size": 8, **train}, optim={"lr": 1e-2, "warmup_steps": 0},
        log=dict(QUIET))


def test_only_adapters_train_and_save_alone_and_merge_preserves_outputs(tmp_path, base_dir):
    trainer = Trainer(args=lora_config(tmp_path, base_dir), train_dataset=Sequences())
    trainer.finetune()
    model = trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = GPT2LMHeadModel.from_pretrained(base_dir).state_dict()
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer", "")]), name  # frozen
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # initialised to zero, moved by training

    final = tmp_path / "run" / "final"
    assert not (final / "model.safetensors").exists()
    adapter = load_weight_file(final / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.model.transformer.h.") and ".lora_" in k for k in adapter)
    assert len(adapter) == 2 * 2 * 3  # 2 layers x (c_attn, attn.c_proj, mlp.c_proj) x (A, B)
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(base_dir)
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()

    assert main(["lora", "merge", "--adapter", str(final), "--output", str(tmp_path / "merged")]) == 0
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    x = Sequences(4).data[:, :-1]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
        plain = GPT2LMHeadModel.from_pretrained(base_dir)
        assert not torch.allclose(plain(x).logits, merged(x).logits, atol=1e-3)  # the adapters did something
    assert set(merged.state_dict()) == set(plain.state_dict())
    # The run's output loads as it is, merged in memory (as PEFT's AutoPeftModel does): the same weights.
    direct = GPT2LMHeadModel.from_pretrained(final)
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), merged.state_dict().values()))
    assert all(p.requires_grad for p in direct.parameters())  # trainable, as any loaded model
    assert torch.equal(GPT2Model.from_pretrained(final).wte.weight, merged.transformer.wte.weight)
    with pytest.raises(CheckpointError, match="LoRA adapters of a language model, not of a classifier"):
        GPT2ForSequenceClassification.from_pretrained(final)
    (final / "model_config.json").rename(final / "elsewhere.json")
    with pytest.raises(CheckpointError, match="LoRA adapters without the adapted model's model_config.json; fold"):
        GPT2LMHeadModel.from_pretrained(final)
    (final / "elsewhere.json").rename(final / "model_config.json")

    (final / "notes.md").write_text("mine")  # saving again replaces the adapter files only
    save_adapter(model, final)
    assert (final / "notes.md").read_text() == "mine"
    assert load_weight_file(final / "adapter_model.safetensors").keys() == adapter.keys()
    # A whole model saved over the adapters replaces them (transformers with peft would load base + adapters), and
    # adapters saved over a whole model replace it (loaders would read it instead of them).
    plain.save_pretrained(final)
    assert not any(name.startswith("adapter_") or name == "model_config.json" for name in os.listdir(final))
    def c_attn(directory):  # a weight the adapters change
        return GPT2LMHeadModel.from_pretrained(directory).transformer.h[0].attn.c_attn.weight

    assert torch.equal(c_attn(final), plain.transformer.h[0].attn.c_attn.weight)
    save_adapter(model, final)
    assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()
    assert torch.equal(c_attn(final), merged.transformer.h[0].attn.c_attn.weight)
    assert (final / "notes.md").read_text() == "mine"


def test_adapters_load_into_transformers_gpt2_with_peft(tmp_path, base_dir):
    """The saved adapter directory is a valid PEFT adapter for HF's Conv1D GPT-2 and gives the same logits."""
    import warnings

    from peft import PeftModel
    from transformers import GPT2LMHeadModel as HFGPT2LMHeadModel

    trainer = Trainer(args=lora_config(tmp_path, base_dir, max_steps=3), train_dataset=Sequences())
    trainer.finetune()
    x = Sequences(2).data[:, :-1]
    trainer.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that Conv1D needs fan_in_fan_out and sets it
        hf = PeftModel.from_pretrained(HFGPT2LMHeadModel.from_pretrained(base_dir), tmp_path / "run" / "final")
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trainer.model(x).logits, rtol=1e-4, atol=1e-4)


def test_train_with_lora_says_it_starts_from_random_weights(tmp_path, base_dir, capsys):
    """`gpt2kit train` of a LoRA config trained adapters on random weights without a word (finetune was meant)."""
    Trainer(args=lora_config(tmp_path, base_dir, max_steps=1), train_dataset=Sequences()).train()
    assert "train starts LoRA from randomly initialised weights; `gpt2kit finetune`" in capsys.readouterr().err


def test_lora_resume_is_exact(tmp_path, base_dir):
    whole = Trainer(args=lora_config(tmp_path, base_dir, "whole"), train_dataset=Sequences())
    whole.finetune()

    class Interrupted(Trainer):
        def train_step(self):
            metrics = super().train_step()
            if self.step == 6:
                raise KeyboardInterrupt  # like Ctrl-C after step 6; the checkpoint of step 4 survives
            return metrics

    first = Interrupted(args=lora_config(tmp_path, base_dir, "split"), train_dataset=Sequences())
    first.config.checkpoint.save_interval = 4
    with pytest.raises(KeyboardInterrupt):
        first.finetune()
    second = Trainer(args=lora_config(tmp_path, base_dir, "split"), train_dataset=Sequences())
    second.finetune(resume="auto")
    losses = {name: [r["train_loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train_loss" in r]
              for name in ("whole", "split")}
    assert len(losses["split"]) == 8
    assert losses["split"] == losses["whole"]


def test_lora_text_classification_trains_and_merges(tmp_path, base_dir):
    config = lora_config(tmp_path, base_dir, max_steps=6)
    config.task = "text_classification"
    trainer = Trainer(args=config, train_dataset=Sequences(classify=True))
    trainer.finetune()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
    final = tmp_path / "run" / "final"
    assert main(["lora", "merge", "--adapter", str(final), "--output", str(tmp_path / "merged")]) == 0
    merged = GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "even", 1: "odd"}
    # The pad id finds each row's last real token when no mask is given: the merge keeps the trained one.
    assert merged.config.pad_token_id == trainer.model.config.pad_token_id is not None
    x = Sequences(4).data[:, :-1]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, trainer.model(x).logits, rtol=1e-4, atol=1e-5)
    direct = GPT2ForSequenceClassification.from_pretrained(final)
    assert direct.config.id2label == merged.config.id2label
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), merged.state_dict().values()))
    with pytest.raises(CheckpointError, match="LoRA adapters of a classifier, not of a language model"):
        GPT2LMHeadModel.from_pretrained(final)


def test_unknown_target_module_is_an_error(tmp_path, base_dir):
    config = lora_config(tmp_path, base_dir)
    for targets, message in ((["q_proj"], "q_proj"),
                             (["attn", "ln_1"], r"\['attn', 'ln_1'\] are not linear layers LoRA can adapt")):
        config.lora.target_modules = targets  # peft's own errors named neither the key nor the projections
        with pytest.raises(ValueError, match=message):
            Trainer(args=config, train_dataset=Sequences()).finetune()
    with pytest.raises(ConfigError, match="lora.target_modules: expected a non-empty list"):
        load_config(out_dir=str(tmp_path / "x"), pet_method="lora", lora={"target_modules": []})


def test_a_merge_keeps_the_runs_config_and_finds_a_tokenizer(tmp_path, base_dir):
    """model.config overrides (here LayerNorm's epsilon) were dropped by the merge (other logits); an adapter
    without tokenizer files takes the base's; the adapter's and the base's directories are never written, another
    non-empty one only with --overwrite."""
    GPT2Tokenizer.gpt2().save_pretrained(base_dir)
    config = lora_config(tmp_path, base_dir, max_steps=2)
    config.model.config = {"layer_norm_epsilon": 0.5}
    trainer = Trainer(args=config, train_dataset=Sequences())
    trainer.finetune()
    final = tmp_path / "run" / "final"
    for path in tokenizer_files(final):
        path.unlink()  # as peft writes an adapter
    assert main(["lora", "merge", "--adapter", str(final), "--output", str(tmp_path / "merged")]) == 0
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    assert merged.config.layer_norm_epsilon == 0.5
    x = Sequences(2).data[:, :-1]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, trainer.model(x).logits, rtol=1e-4, atol=1e-5)
    assert [p.name for p in tokenizer_files(tmp_path / "merged")] == [p.name for p in tokenizer_files(base_dir)]
    before = {d: sorted(p.name for p in d.iterdir()) for d in (final, base_dir)}
    for output in (final, base_dir):  # the base's weights were replaced silently
        assert main(["lora", "merge", "--adapter", str(final), "--output", str(output), "--overwrite"]) == 2
    assert {d: sorted(p.name for p in d.iterdir()) for d in (final, base_dir)} == before
    assert main(["lora", "merge", "--adapter", str(final), "--output", str(tmp_path / "merged")]) == 2  # not empty
    # An earlier merge's tokenizer.json (read before vocab.json + merges.txt) was kept: the wrong vocabulary.
    from gpt2kit.tokenizer import train_bpe

    train_bpe([], 300, tmp_path / "merged", texts=["abc abd"] * 20, progress=False)
    assert main(["lora", "merge", "--adapter", str(final), "--output", str(tmp_path / "merged"), "--overwrite"]) == 0
    assert not (tmp_path / "merged" / "tokenizer.json").exists()
    assert GPT2Tokenizer.from_file(tmp_path / "merged").vocab_size == 50257


def test_a_merge_that_fails_writing_its_tokenizer_leaves_no_output(tmp_path, base_dir, monkeypatch):
    """The tokenizer files were copied in after the model directory was published: a failure left a directory
    with config and weights but no vocabulary."""
    GPT2Tokenizer.gpt2().save_pretrained(base_dir)
    Trainer(args=lora_config(tmp_path, base_dir, max_steps=1), train_dataset=Sequences()).finetune()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GPT2Tokenizer, "save_pretrained", full_disk)
    assert main(["lora", "merge", "--adapter", str(tmp_path / "run" / "final"),
                 "--output", str(tmp_path / "merged")]) == 2
    assert not (tmp_path / "merged").exists()


def test_the_adapter_names_the_weights_it_was_trained_on(tmp_path, base_dir, monkeypatch):
    """train() starts from random weights: its adapter names no base, so merging asks for one instead of folding
    the adapters into weights they never saw. finetune() records the base as an absolute path."""
    Trainer(args=lora_config(tmp_path, base_dir, "random", max_steps=2), train_dataset=Sequences()).train()
    adapter = json.loads((tmp_path / "random" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] is None
    assert main(["lora", "merge", "--adapter", str(tmp_path / "random" / "final"),
                 "--output", str(tmp_path / "merged")]) == 2
    monkeypatch.chdir(tmp_path)
    Trainer(args=lora_config(tmp_path, Path("base"), "tuned", max_steps=2), train_dataset=Sequences()).finetune()
    adapter = json.loads((tmp_path / "tuned" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_dir.resolve())


def test_the_tied_head_is_no_lora_target(tmp_path, base_dir):
    config = lora_config(tmp_path, base_dir)
    config.lora.target_modules = ["c_attn", "lm_head"]
    with pytest.raises(ValueError, match=r"\['lm_head'\] is the tied embedding"):
        Trainer(args=config, train_dataset=Sequences()).finetune()


def test_a_classifiers_embedding_is_a_lora_target_and_a_bad_adapter_config_is_named(tmp_path):
    """A classifier has no LM head: its token embedding is no tied weight, and LoRA adapts it as peft does."""
    from gpt2kit.training.config import LoraArgs
    from gpt2kit.training.lora import apply_lora, lora_config, read_adapter_config

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16))
    apply_lora(model, lora_config(LoraArgs(target_modules=["c_attn", "wte"]), task="text_classification"))
    assert any("wte.lora_embedding_A" in name for name, _ in model.named_parameters())
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"adapter_config.json: expected a JSON object of LoRA settings, got list"):
        read_adapter_config(tmp_path)


def test_an_adapter_of_another_rank_is_one_clear_error(tmp_path, base_dir, capsys):
    Trainer(args=lora_config(tmp_path, base_dir, max_steps=2), train_dataset=Sequences()).finetune()
    config = lora_config(tmp_path, base_dir)
    config.lora.rank = 2
    trainer = Trainer(args=config, train_dataset=Sequences())
    trainer._setup(weights=str(base_dir))
    from gpt2kit.training.lora import load_adapter_weights

    with pytest.raises(ValueError, match=r"final: adapter weights do not fit the model \(size mismatch .*lora.rank"):
        load_adapter_weights(trainer.model, tmp_path / "run" / "final")


def test_peft_adapters_merge_from_bin_files_and_without_gpt2kit_config(tmp_path, base_dir):
    """peft's own layouts: adapter_model.bin (safe_serialization=False), a SEQ_CLS adapter made on
    transformers' GPT-2, whose label count is its saved head's rows, and adapters on the tied LM head, merged into
    a head of its own (merged into the shared weight they would change the token embedding too)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification as HFClassifier
    from transformers import GPT2LMHeadModel as HFGPT2LMHeadModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that Conv1D needs fan_in_fan_out and sets it
        lm = get_peft_model(HFGPT2LMHeadModel.from_pretrained(base_dir),
                            LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
        lm.save_pretrained(tmp_path / "bin", safe_serialization=False)
        classifier = HFClassifier.from_pretrained(base_dir, num_labels=3, pad_token_id=63)
        cls = get_peft_model(classifier, LoraConfig(r=4, target_modules=["c_attn"], task_type="SEQ_CLS",
                                                    init_lora_weights=False))
        cls.save_pretrained(tmp_path / "cls")
        head = get_peft_model(HFGPT2LMHeadModel.from_pretrained(base_dir),
                              LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False))
        head.save_pretrained(tmp_path / "head")
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    x = Sequences(2).data[:, :-1]
    for name, peft_model, loader in (("bin", lm, GPT2LMHeadModel), ("cls", cls, GPT2ForSequenceClassification),
                                     ("head", head, GPT2LMHeadModel)):
        assert main(["lora", "merge", "--adapter", str(tmp_path / name), "--base", str(base_dir),
                     "--output", str(tmp_path / f"{name}-merged")]) == 0
        merged = loader.from_pretrained(tmp_path / f"{name}-merged")
        peft_model.eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(x).logits, peft_model(x).logits, rtol=1e-4, atol=1e-5)
        if loader is GPT2LMHeadModel:  # tied unless the adapters changed the head
            assert merged.config.tie_word_embeddings == (name != "head")
            assert (merged.lm_head.weight is merged.transformer.wte.weight) == (name != "head")


def test_a_lora_output_is_a_base_for_classification_and_a_moved_base_is_named(tmp_path, base_dir):
    Trainer(args=lora_config(tmp_path, base_dir, max_steps=2), train_dataset=Sequences()).finetune()
    final = tmp_path / "run" / "final"
    merged = GPT2LMHeadModel.from_pretrained(final)
    config = lora_config(tmp_path, final, name="cls", max_steps=1)  # a classifier finetuned from the adapted LM
    config.task, config.pet_method = "text_classification", "none"
    assert Trainer(args=config, train_dataset=Sequences(classify=True)).finetune()["steps"] == 1
    # It starts from the adapted weights (a CheckpointError "no weights found" before).
    assert torch.equal(load_classifier_weights(final), merged.transformer.h[0].attn.c_attn.weight)
    base_dir.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=r"LoRA adapters of the base model .*base, which is not found .* pass "
                                              r"where it is now"):
        GPT2LMHeadModel.from_pretrained(final)
    again = GPT2LMHeadModel.from_pretrained(final, base_model=tmp_path / "moved")
    assert torch.equal(again.transformer.wte.weight, merged.transformer.wte.weight)


def load_classifier_weights(directory):
    from gpt2kit.training.trainer import load_classifier

    return load_classifier(directory, num_labels=2).transformer.h[0].attn.c_attn.weight


def test_a_lora_classifier_keeps_its_classes(tmp_path, base_dir):
    config = lora_config(tmp_path, base_dir, max_steps=2)
    config.task = "text_classification"
    Trainer(args=config, train_dataset=Sequences(classify=True)).finetune()
    final = tmp_path / "run" / "final"
    assert GPT2ForSequenceClassification.from_pretrained(final, num_labels=2).config.num_labels == 2
    with pytest.raises(CheckpointError, match=r"trained for the classes \{0: 'even', 1: 'odd'\}; num_labels cannot"):
        GPT2ForSequenceClassification.from_pretrained(final, num_labels=3)


def test_adapters_over_a_bf16_base_merge_in_float32(tmp_path, base_dir):
    Trainer(args=lora_config(tmp_path, base_dir, max_steps=2), train_dataset=Sequences()).finetune()
    final = tmp_path / "run" / "final"
    GPT2LMHeadModel.from_pretrained(base_dir, dtype=torch.bfloat16).save_pretrained(base_dir)
    assert GPT2LMHeadModel.from_pretrained(final).dtype == torch.bfloat16  # the base's dtype by default
    merged = GPT2LMHeadModel.from_pretrained(final, dtype="float32")
    adapter = load_weight_file(final / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.0.attn.c_attn."
    delta = adapter[prefix + "lora_B.weight"] @ adapter[prefix + "lora_A.weight"] * (8 / 4)  # alpha / rank
    base = GPT2LMHeadModel.from_pretrained(base_dir).transformer.h[0].attn.c_attn.weight.float()
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight, base + delta, rtol=0, atol=1e-6)


def test_tokens_added_for_a_lora_run_train_their_rows_and_the_output_loads(tmp_path):
    """The added-tokens recipe with LoRA: the new tokens' embedding rows train as peft's trainable tokens (the rest
    of the embedding stays frozen), are saved with the adapters, and the run's output loads and merges onto the
    base resized to the run's vocabulary, with the trained model's outputs, in gpt2kit and in transformers + peft."""
    import transformers
    from peft import PeftModel

    from gpt2kit.tokenizer import train_bpe

    verdict = Path(__file__).parents[1] / "examples" / "data" / "the-verdict" / "the-verdict.txt"
    tok = train_bpe([verdict], 300, tmp_path / "tok", progress=False)
    torch.manual_seed(0)
    config = TINY.replace(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    tok.add_tokens(["<tool>", "</tool>"])
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(len(tok))
    start = model.transformer.wte.weight.detach().clone()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"I had <tool>{i} pictures</tool> then\n\n" for i in range(64)))
    args = load_config(out_dir=str(tmp_path / "run"), pet_method="lora",
                       lora={"rank": 4, "target_modules": ["c_attn"]},
                       data={"train": str(corpus), "format": "paragraphs", "max_length": 24},
                       train={"max_steps": 4, "micro_batch_size": 4}, optim={"lr": 1e-2, "warmup_steps": 0},
                       log=dict(QUIET))
    trainer = Trainer(model=model, tokenizer=tok, args=args)
    trainer.finetune()
    final = tmp_path / "run" / "final"
    merged = GPT2LMHeadModel.from_pretrained(final, base_model=tmp_path / "base")
    weight = merged.transformer.wte.weight
    assert merged.config.vocab_size == len(tok) and merged.lm_head.weight is weight
    assert not torch.equal(weight[-2:], start[-2:]) and torch.equal(weight[:-2], start[:-2])  # only the new rows
    ids = torch.tensor([tok.encode("I had <tool>3 pictures</tool>")])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        theirs.resize_token_embeddings(len(tok))
        adapted = PeftModel.from_pretrained(theirs, final).eval()
        torch.testing.assert_close(adapted(ids).logits, expected, rtol=1e-4, atol=1e-5)

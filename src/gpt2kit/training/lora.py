"""LoRA adapters through HF PEFT: inject into gpt2kit's nn.Linear projections, save alone, merge into a plain model.

Adapters are written in PEFT's own layout (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads them onto HF transformers'
GPT-2 as well: the LoRA A/B matrices of a Linear and of HF's transposed Conv1D have the same shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import ADAPTED_CONFIG_NAME, ADAPTER_CONFIG_NAME, is_adapter_file, is_model_file
from ..files import atomic_directory, check_output_directory
from ..quantization import check_trainable
from .config import LoraArgs

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"  # what peft writes with safe_serialization=False
_PREFIX = "base_model.model."  # what PeftModel puts in front of module names


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft package: pip install 'gpt2kit[lora]'") from None
    return peft


def lora_config(args: LoraArgs, *, task: str, base_model: str | None = None, new_tokens: list[int] | None = None):
    """The peft.LoraConfig for `args`. Classification also trains (and saves) the new `score` head; the token
    embedding's rows of `new_tokens` (ids added to the tokenizer for this run) train too, as peft's trainable
    tokens, and are saved with the adapters."""
    peft = _peft()
    return peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=list(args.target_modules),
        bias="none", modules_to_save=["score"] if task == "text_classification" else None,
        trainable_token_indices={"wte": list(new_tokens)} if new_tokens else None,
        task_type="SEQ_CLS" if task == "text_classification" else "CAUSAL_LM", base_model_name_or_path=base_model)


def apply_lora(model: nn.Module, config) -> nn.Module:
    """Wrap the target projections of `model` in LoRA layers, in place; everything else is frozen."""
    from peft.tuners.lora import LoraModel

    _peft()
    check_trainable(model, "LoRA")
    matches = {t: [m for name, m in model.named_modules() if name == t or name.endswith(f".{t}")]
               for t in sorted(config.target_modules)}  # peft keeps them as a set
    missing = [t for t, found in matches.items() if not found]
    if missing:
        raise ValueError(f"lora.target_modules: no module named {missing} in the model (GPT-2 projections are "
                         "c_attn, attn.c_proj, c_fc, mlp.c_proj)")
    other = [t for t, found in matches.items() if not all(isinstance(m, (nn.Linear, nn.Embedding)) for m in found)]
    if other:
        raise ValueError(f"lora.target_modules: {other} are not linear layers LoRA can adapt; target the "
                         "projections (c_attn, attn.c_proj, c_fc, mlp.c_proj)")
    tied = [t for t in matches if t.split(".")[-1] in ("lm_head", "wte")]
    head = model.get_output_embeddings()  # a classifier has none: its wte is the embedding alone
    if tied and head is not None and head.weight is model.get_input_embeddings().weight:
        # The head and the embedding are one weight: a merged update would change the input embedding too.
        raise ValueError(f"lora.target_modules: {tied} is the tied embedding, which LoRA cannot adapt on one side "
                         "only; target the projections (c_attn, attn.c_proj, c_fc, mlp.c_proj)")
    LoraModel(model, config, "default")  # injects into `model` itself
    return model


def base_fingerprint(model: nn.Module) -> str:
    """A fingerprint of the weights adapters are trained on, to refuse resuming them on another base: a hash of
    up to 256 evenly spaced values of every tensor, rounded to bf16 so that the same base loaded in another
    precision or on another device has the same one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 256)][:256].cpu().float().to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def is_lora_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def adapter_state_dict(model: nn.Module) -> dict:
    peft = _peft()
    # save_embedding_layers=False: the embeddings are never resized here, and peft's check for that would
    # query the Hub for the base model's config.
    state = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    return {f"{_PREFIX}{k}": v.detach().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write only the adapter weights, their config and the model's config to `directory` (atomically; other
    files already there stay, as with peft, except a whole model's weights and config, which loaders would read
    instead of the adapters)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_directory(directory, keep=lambda name: not (is_model_file(name) or is_adapter_file(name))) as tmp:
        save_file(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(str(tmp))
        (tmp / ADAPTED_CONFIG_NAME).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike):
    peft = _peft()
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG_NAME} (not a LoRA adapter directory)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of LoRA settings, got {type(values).__name__}")
    if values.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {values['peft_type']!r}, expected 'LORA'")
    return peft.LoraConfig.from_pretrained(str(directory))


def read_adapter_weights(directory: str | os.PathLike) -> dict:
    """An adapter's saved tensors: adapter_model.safetensors, else peft's pickle-free-loaded adapter_model.bin."""
    from ..checkpoint import load_weight_file

    directory = Path(directory)
    bin_path = directory / ADAPTER_BIN_NAME
    return load_weight_file(bin_path if bin_path.exists() and not (directory / ADAPTER_WEIGHTS_NAME).exists()
                            else directory / ADAPTER_WEIGHTS_NAME)


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load saved adapter weights into a model that `apply_lora` already prepared."""
    peft = _peft()
    state = read_adapter_weights(directory)
    try:
        result = peft.set_peft_model_state_dict(model, {k.removeprefix(_PREFIX): v for k, v in state.items()})
    except RuntimeError as err:  # shapes that differ: another rank, or another base model's width
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(f"{directory}: adapter weights do not fit the model ({mismatch}); was it trained with "
                         f"another lora.rank or base model?") from None
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{directory}: adapter weights do not fit the model: missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")


def adapter_base(adapter_dir: Path, base_model: str | os.PathLike | None = None):
    """The adapter's peft config and its base model's directory: `base_model`, else the one the config records."""
    from ..checkpoint import CheckpointError, resolve_model_dir

    config = read_adapter_config(adapter_dir)
    base = base_model or config.base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter_dir}: the adapter config names no base model; pass the model it was trained on "
                         "(--base DIR, base_model=)")
    try:
        return config, resolve_model_dir(base)
    except CheckpointError as err:
        raise ValueError(f"{adapter_dir}: LoRA adapters of the base model {base}, which is not found ({err}); pass "
                         "where it is now (gpt2kit lora merge --base DIR, or from_pretrained(..., base_model=DIR))"
                         ) from None


def load_merged(adapter_dir: str | os.PathLike, *, base_model: str | os.PathLike | None = None,
                dtype: torch.dtype | None = None, **config_overrides) -> nn.Module:
    """The adapted model in memory: its base (`base_model`, else the one recorded at training) with the LoRA
    adapters folded in, as a plain GPT2LMHeadModel or GPT2ForSequenceClassification in `dtype` (default the
    base's; the merge itself runs in float32). It takes the adapted model's config (model_config.json: the run's
    overrides, a classifier's labels), then `config_overrides`."""
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import check_target_module_exists

    from ..config import GPT2Config
    from ..model import GPT2LMHeadModel

    adapter_dir = Path(adapter_dir)
    config, base_dir = adapter_base(adapter_dir, base_model)
    trained = (GPT2Config.from_json_file(adapter_dir / ADAPTED_CONFIG_NAME)
               if (adapter_dir / ADAPTED_CONFIG_NAME).exists() else None)
    # The run's model.config overrides (a LayerNorm epsilon, dropout, ...) are in it; labels go to the classifier
    # as its own arguments, other keys (architectures, ...) come from the base, and a vocabulary grown by added
    # tokens is the base's resized (their trained rows are among the adapter weights).
    labels = ("extra", "num_labels", "id2label", "label2id")
    overrides = ({k: v for k, v in vars(trained).items() if k not in (*labels, "vocab_size")}
                 if trained is not None else {})
    overrides.update({k: v for k, v in config_overrides.items() if k not in labels})
    asked = {k: config_overrides[k] for k in labels if k in config_overrides}
    if trained is not None and any(getattr(trained, k) != v for k, v in asked.items()):
        # Its head was trained with the adapters: other classes would be another model (merge, then start anew).
        raise ValueError(f"{adapter_dir}: the adapters were trained for the classes {trained.id2label}; "
                         f"{', '.join(asked)} cannot change them here")
    if str(config.task_type).endswith("SEQ_CLS"):
        from .trainer import load_classifier  # a fresh head; the adapter directory holds the trained one

        if trained is not None:
            model = load_classifier(base_dir, num_labels=trained.num_labels, id2label=trained.id2label,
                                    **overrides)  # pad_token_id among them: the row's last token is found by it
        else:  # an adapter peft made on transformers' model: the saved head's rows are the classes
            head = next((t for k, t in read_adapter_weights(adapter_dir).items() if k.endswith("score.weight")), None)
            if head is None:
                raise ValueError(f"{adapter_dir}: a sequence-classification adapter without its score head")
            model = load_classifier(base_dir, num_labels=head.shape[0], **overrides)
    else:
        model = GPT2LMHeadModel.from_pretrained(base_dir, **overrides)
    if trained is not None and trained.vocab_size != model.config.vocab_size:
        model.resize_token_embeddings(trained.vocab_size)
    dtype = dtype or model.dtype
    # peft's LoRA adapters may target one side of the tied LM head and embedding (lm_head, wte): merged into the
    # shared weight they would change the other side too. The two are merged apart, and tied again if neither
    # changed. (Trainable token rows reach both sides as they should: peft knows the tie.)
    tied = (model.get_output_embeddings() is not None and model.config.tie_word_embeddings
            and any(check_target_module_exists(config, name) for name in ("lm_head", "transformer.wte")))
    if tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    wrapper = LoraModel(model.float(), config, "default")  # a low-precision merge would round small updates away
    load_adapter_weights(model, adapter_dir)
    merged = wrapper.merge_and_unload()
    if tied and torch.equal(merged.lm_head.weight, merged.transformer.wte.weight):
        merged.config.tie_word_embeddings = True
        merged.tie_weights()
    return merged.to(dtype).requires_grad_(True).eval()  # peft froze the base; a loaded model trains as any other


def merge_lora(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
               base_model: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Fold LoRA adapters into their base model (`load_merged`) and save a plain HF-format model directory with
    the adapter's tokenizer files, else the base's. A non-empty `output_dir` is written into only with
    `overwrite`; the adapter's and the base's own directories never."""
    from ..checkpoint import save_pretrained
    from ..tokenizer import GPT2Tokenizer, has_tokenizer_files

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    _, base_dir = adapter_base(adapter_dir, base_model)
    if output_dir.resolve() in (adapter_dir.resolve(), base_dir.resolve()):
        raise ValueError(f"{output_dir}: the output must be another directory than the adapter's and the base's")
    check_output_directory(output_dir, overwrite=overwrite)
    merged = load_merged(adapter_dir, base_model=base_dir)
    # The tokenizer goes into the same atomic write, which also drops the vocabulary files of an earlier merge
    # (a stale tokenizer.json would be read before new vocab.json + merges.txt).
    source = next((d for d in (adapter_dir, base_dir) if has_tokenizer_files(d)), None)
    save_pretrained(merged, output_dir, tokenizer=GPT2Tokenizer.from_file(source) if source else None)
    return output_dir

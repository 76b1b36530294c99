"""`pipeline("text_generation", model=PATH_OR_NAME)`: strings in, generated strings out;
`pipeline("text_classification", model=DIR)`: strings in, labels and scores out."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from . import quantization
from .checkpoint import parse_dtype, resolve_model_dir
from .config import PRESETS, GPT2Config
from .conversation import turns_of
from .generation import (
    GenerationConfig,
    decode_completions,
    default_config,
    encode_prompt,
    eos_token_ids,
    generate,
    left_pad,
    model_placement,
    stream_generate,
)
from .model import GPT2ForSequenceClassification, GPT2LMHeadModel
from .tokenizer import GPT2Tokenizer, has_tokenizer_files, tokenizer_for

def parse_device(device: torch.device | str) -> torch.device:
    """A torch device this machine has; anything else is one ValueError naming it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this machine (or this torch build) has no CUDA GPU; use cpu")
    # The CPU is one device: "cpu:0" is "cpu", which is also what tensors put there report.
    return torch.device("cpu") if device.type == "cpu" else device


def text_options(tokenizer: GPT2Tokenizer, vocab_size: int, options: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Generation options for text in, text out with a model of `vocab_size` ids: `options` over the tokenizer's
    EOS (which ends a text) and padding; ids the tokenizer cannot decode are never generated, whatever
    `options` say (their suppress_tokens add to those ids)."""
    options = dict(options or {})
    suppress = sorted({*(options.pop("suppress_tokens", None) or ()), *tokenizer.unused_ids(vocab_size)})
    return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **options,
            "suppress_tokens": suppress or None}


def load_model_and_tokenizer(model: str | os.PathLike | GPT2LMHeadModel, *,
                             tokenizer: str | os.PathLike | GPT2Tokenizer | None = None,
                             dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                             random_init: bool = False, backend: str = "torch", quantize: str | None = None,
                             pack_weights: bool = False) -> tuple[GPT2LMHeadModel, GPT2Tokenizer]:
    """A model (HF-format directory, local HF cache name, or a preset with `random_init=True`) and its
    tokenizer: the one given, else the vocabulary files in the model directory, else GPT-2's bundled one.
    `backend="onnx"` runs a directory written by `gpt2kit export onnx` in onnxruntime instead.
    `quantize="int8"` loads the weights, then keeps the projections and LM head as int8 with bf16 scales, the
    rest in `dtype` (gpt2kit.quantization): a quarter of float32's bytes per decoded token. `pack_weights=True`
    keeps the float weights in oneDNN's packed layout instead (CPU): faster products, same precision. A
    GPT2LMHeadModel object is used as it is, in its own dtype and device; quantize and pack_weights convert it
    in place."""
    dtype = parse_dtype(dtype)
    model_dir = None
    if backend not in ("torch", "onnx"):
        raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'onnx'")
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantize {quantize!r}; expected 'int8'")
    device = parse_device(device)
    if quantize and backend != "torch":
        raise ValueError("quantize='int8' applies to the torch backend")
    if pack_weights and (quantize or backend != "torch" or device.type != "cpu"):
        raise ValueError("pack_weights applies to float weights of the torch backend on the CPU (not with quantize)")
    if isinstance(model, GPT2LMHeadModel):
        lm = model
    elif backend == "onnx":
        from .export import OnnxLMHeadModel

        if random_init or dtype not in (None, torch.float32) or device.type != "cpu":
            raise ValueError("the onnx backend runs an exported directory in float32 on the CPU; random_init, "
                             "dtype and device do not apply")
        model_dir = Path(model)
        lm = OnnxLMHeadModel(model_dir)
    elif random_init:
        if str(model) not in PRESETS:
            raise ValueError(f"random_init needs a preset name ({', '.join(PRESETS)}), got {str(model)!r}")
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same random model every time, without touching the caller's RNG
            lm = GPT2LMHeadModel(GPT2Config.from_name(str(model)))
        lm = lm.to(device=device, dtype=dtype).eval()
    else:
        model_dir = resolve_model_dir(model)
        lm = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype, device=device)
    if quantize:
        quantization.quantize_int8(lm)
    elif pack_weights:
        quantization.pack_weights(lm)  # the module's function: this argument shares its name
    tok = tokenizer_for(model_dir, tokenizer)
    try:
        tok.check_fits(lm.config.vocab_size)
    except ValueError as err:
        raise ValueError(f"{model_dir}: {err}" if model_dir is not None else str(err)) from None
    return lm, tok


def load_assistant(assistant_model: str | os.PathLike | GPT2LMHeadModel | None, model: GPT2LMHeadModel,
                   model_tokenizer: GPT2Tokenizer, *, random_init: bool = False) -> GPT2LMHeadModel | None:
    """Speculative decoding's assistant for `model`: a GPT2LMHeadModel object as it is; a directory (or a preset
    with `random_init`) loaded in the model's dtype on its device. A directory with vocabulary files of its own
    must hold the model's tokenizer."""
    if assistant_model is None or isinstance(assistant_model, GPT2LMHeadModel):
        return assistant_model
    device, dtype = model_placement(model)
    if random_init:
        return load_model_and_tokenizer(assistant_model, tokenizer=model_tokenizer, dtype=dtype, device=device,
                                        random_init=True)[0]
    directory = resolve_model_dir(assistant_model)
    # The same ids are what guessing needs (which token pads, say, does not matter).
    if has_tokenizer_files(directory) and GPT2Tokenizer.from_file(directory).fingerprint(roles=False) != \
            model_tokenizer.fingerprint(roles=False):
        raise ValueError(f"assistant_model {assistant_model}: its tokenizer differs from the model's; speculative "
                         "decoding needs the same one")
    return GPT2LMHeadModel.from_pretrained(directory, dtype=dtype, device=device)


def load_classifier_and_tokenizer(model: str | os.PathLike | GPT2ForSequenceClassification, *,
                                  tokenizer: str | os.PathLike | GPT2Tokenizer | None = None,
                                  dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
                                  ) -> tuple[GPT2ForSequenceClassification, GPT2Tokenizer]:
    """A finetuned classifier (a directory, or the model itself as it is) and its tokenizer: the one given, else
    the directory's vocabulary files, else GPT-2's."""
    if isinstance(model, GPT2ForSequenceClassification):
        return model, tokenizer_for(None, tokenizer)
    model_dir = resolve_model_dir(model)
    classifier = GPT2ForSequenceClassification.from_pretrained(model_dir, dtype=parse_dtype(dtype),
                                                               device=parse_device(device))
    return classifier, tokenizer_for(model_dir, tokenizer)


Conversation = Sequence[dict[str, str]]  # [{"role": "user", "content": "..."}, ...]


def _is_chat(text_inputs: Any) -> bool:
    """Messages rather than text: a list (or tuple) holding dicts (one conversation) or lists (a batch)."""
    return isinstance(text_inputs, (list, tuple)) and any(isinstance(item, (dict, list, tuple))
                                                          for item in text_inputs)


_BAD_INPUT = ("expected a string, a list of strings, or chat messages (a list of {'role': ..., 'content': ...} "
              "dicts, or a list of such lists)")


def _check_call_options(return_full_text: Any, batch_size: Any) -> None:
    if return_full_text not in (True, False):
        raise ValueError(f"return_full_text must be True or False, got {return_full_text!r}")
    if not (type(batch_size) is int and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


class TextGenerationPipeline:
    """Call with a string (-> list of {"generated_text"}, one per returned sequence) or a list of strings
    (-> one such list per string). Keyword arguments are GenerationConfig fields, and `return_full_text` and
    `batch_size` (given here, the defaults of every call, as in transformers). In text, the tokenizer decides
    what ends a text: EOS and padding default to its ids rather than the model config's. With `assistant_model`
    or `prompt_lookup_num_tokens`, decoding is speculative and prompts run one at a time."""

    def __init__(self, model: GPT2LMHeadModel, tokenizer: GPT2Tokenizer, *, return_full_text: bool | None = None,
                 batch_size: int | None = None, assistant_model: GPT2LMHeadModel | None = None, **defaults) -> None:
        self.model, self.tokenizer, self.defaults = model, tokenizer, defaults
        self.assistant_model = assistant_model  # speculative decoding's guesser (gpt2kit.speculative)
        self.return_full_text = True if return_full_text is None else return_full_text
        self.batch_size = 8 if batch_size is None else batch_size
        _check_call_options(self.return_full_text, self.batch_size)
        self._config({})  # bad defaults are an error now, not at the first call

    @property
    def config(self) -> GenerationConfig:
        """What a call without options generates with."""
        return self._config({})

    @config.setter
    def config(self, config: GenerationConfig) -> None:
        # One of the two lengths: the one the config holds (both given would be an error at every call).
        unused = "max_new_tokens" if config.max_length is not None else "max_length"
        self.defaults = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != unused}

    def _config(self, options: dict[str, Any]) -> GenerationConfig:
        defaults = self.defaults
        if "max_new_tokens" in options or "max_length" in options:  # a call's length replaces the default one
            defaults = {k: v for k, v in defaults.items() if k not in ("max_new_tokens", "max_length")}
        options = text_options(self.tokenizer, self.model.config.vocab_size, {**defaults, **options})
        return default_config(self.model).replace(**options)

    def __call__(self, text_inputs: str | Sequence[str] | Conversation | Sequence[Conversation], *,
                 return_full_text: bool | None = None, batch_size: int | None = None,
                 generator: torch.Generator | None = None, continue_final_message: bool | None = None,
                 **options) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        return_full_text = self.return_full_text if return_full_text is None else return_full_text
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_call_options(return_full_text, batch_size)
        if not isinstance(text_inputs, (str, list, tuple)):  # a generator or array of prompts or conversations
            if isinstance(text_inputs, (dict, bytes)) or not isinstance(text_inputs, Iterable):
                raise ValueError(_BAD_INPUT + f", got {text_inputs!r:.100}")
            text_inputs = list(text_inputs)
        if _is_chat(text_inputs):
            return self._chat(text_inputs, return_full_text=return_full_text, batch_size=batch_size,
                              generator=generator, continue_final_message=continue_final_message, **options)
        if continue_final_message is not None:
            raise ValueError("continue_final_message is for chat input (a list of messages)")
        config = self._config(options)
        prompts = [text_inputs] if isinstance(text_inputs, str) else list(text_inputs)
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(_BAD_INPUT + f", got {text_inputs!r:.100}")
        continuations = self._complete([encode_prompt(self.tokenizer, p) for p in prompts], config, batch_size,
                                       generator)
        results = [[{"generated_text": (prompt if return_full_text else "") + text} for text in texts]
                   for prompt, texts in zip(prompts, continuations)]
        return results[0] if isinstance(text_inputs, str) else results

    def _generator(self, seed: int) -> torch.Generator:
        """One random stream for the whole call: seeding each batch (or each kind of chat reply) anew would give
        prompts batch_size apart the same draws. A batch draws for all its rows at once, so the samples still
        depend on batch_size."""
        return torch.Generator(model_placement(self.model)[0]).manual_seed(seed)

    def _complete(self, rows: list[list[int]], config: GenerationConfig, batch_size: int,
                  generator: torch.Generator | None) -> list[list[str]]:
        """The continuations of each prompt's ids (num_return_sequences texts each), batch_size prompts at a time,
        left-padded."""
        if config.seed is not None and generator is None:
            generator, config = self._generator(config.seed), config.replace(seed=None)
        speculative = self.assistant_model is not None or config.prompt_lookup_num_tokens is not None
        n, out = config.num_return_sequences, []
        for start in range(0, len(rows), batch_size):
            batch, batch_config = [rows[start:start + batch_size]], config
            if speculative:  # one sequence at a time; max_length still counts the batch's padded prompt
                batch_config = config.for_prompt(max(map(len, batch[0])))
                batch = [[row] for row in batch[0]]
            for part in batch:
                input_ids, attention_mask = left_pad(part, self.tokenizer.pad_token_id)
                sequences = generate(self.model, input_ids, attention_mask, batch_config, tokenizer=self.tokenizer,
                                     generator=generator, assistant_model=self.assistant_model)
                texts = decode_completions(self.tokenizer, sequences, input_ids.shape[1],
                                           eos_token_ids(config, self.model.config), config.stop,
                                           config.skip_leading_space)
                out += [texts[i * n:(i + 1) * n] for i in range(len(input_ids))]
        return out

    def _chat(self, conversations: Conversation | Sequence[Conversation], *, return_full_text: bool,
              batch_size: int, generator: torch.Generator | None, continue_final_message: bool | None,
              **options) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Chat input, as transformers' pipeline takes it: the reply continues the conversation's transcript
        (gpt2kit.conversation). With return_full_text, generated_text is the conversation plus the assistant's
        message; without, the reply's text. A conversation ending with an assistant message has that message
        continued (continue_final_message, by default whether the last message is the assistant's; a user's message
        continues too, keeping its role, as in transformers)."""
        single = isinstance(conversations[0], dict)
        batch = [conversations] if single else list(conversations)
        chat_format = self.tokenizer.chat_format()
        prompts, continued = [], []
        for c, conversation in enumerate(batch):
            if not (isinstance(conversation, (list, tuple)) and conversation):
                raise ValueError(f"conversation {c}: expected a non-empty list of messages, got {conversation!r}")
            try:
                turns = turns_of(conversation)
            except ValueError as err:
                raise ValueError(f"conversation {c}, {err}") from None
            last_is_reply = turns[-1][0] == "assistant"
            continued.append(last_is_reply if continue_final_message is None else continue_final_message)
            # A continued message ends the text where it ends: no newline, no new "Assistant:".
            try:
                prompts.append(chat_format.transcript(turns, continue_final_message=continued[-1]))
            except ValueError as err:
                raise ValueError(f"conversation {c}: {err}") from None
        config = self._config(options)
        stop = chat_format.reply_stops(config.stop)
        end, end_id = chat_format.end_of_turn, self.tokenizer.get_vocab().get(chat_format.end_of_turn)
        if end in self.tokenizer.encoding.special_tokens_set and end_id < self.model.config.vocab_size:
            # A template's end-of-turn token ends a reply as EOS does: as an EOS id, beam search can end there too.
            stop.remove(end)
            options = {**options, "eos_token_id": [*eos_token_ids(config, self.model.config), end_id]}
        if config.num_beams > 1 and stop:
            raise ValueError(f"chat input ends each reply at a stop string ({stop[0]!r}), which beam search does not "
                             "support: use num_beams=1")
        if config.seed is not None and generator is None:
            generator, options = self._generator(config.seed), {**options, "seed": None}
        # A new plain reply starts after the space that follows "Assistant:" (stop strings too); a continued message
        # keeps what it generated. The two kinds run apart, in their order.
        outputs: list[Any] = [None] * len(prompts)
        for extends in (False, True):
            rows = [i for i, flag in enumerate(continued) if flag == extends]
            if rows:
                skip = chat_format.skip_leading_space and not extends
                group = self._config({**options, "stop": stop or None, "skip_leading_space": skip})
                ids = [chat_format.encode(self.tokenizer, prompts[i]) for i in rows]
                for i, replies in zip(rows, self._complete(ids, group, batch_size, generator)):
                    outputs[i] = replies
        results = []
        for conversation, replies, extends in zip(batch, outputs, continued, strict=True):
            # A continued message keeps its role (a user's too, as in transformers).
            head, role, last = ((conversation[:-1], conversation[-1]["role"], conversation[-1]["content"]) if extends
                                else (conversation, "assistant", ""))
            results.append([{"generated_text": [*head, {"role": role, "content": last + reply}]
                             if return_full_text else reply} for reply in replies])
        return results[0] if single else results

    def stream(self, prompt: str, *, generator: torch.Generator | None = None, **options) -> Iterator[str]:
        """The continuation of one prompt as text pieces while it is generated."""
        return stream_generate(self.model, self.tokenizer, prompt, self._config(options),
                               generator=generator, assistant_model=self.assistant_model)


_TOP_LABEL = object()  # top_k not given: transformers' first shape, one dict per text


class TextClassificationPipeline:
    """Call with a text, a list of texts, or sentence pairs as transformers takes them ({"text", "text_pair"}, or a
    list of those; the pair is one text, a sentence per line, as training joins it). Returns what transformers'
    pipeline("text-classification") does, shapes included: without `top_k`, each text's most likely label and
    its score (one such dict per text of a list; [{"label", "score"}] for one text, the bare dict for one pair);
    with `top_k` (None: every label), the top labels of each text, best first (a list for one text, a list of
    lists for several; one text with `top_k` given to the pipeline only is wrapped in a list once more, as
    there). Scores are the softmax over the classes (a sigmoid per class for one output or multi-label models, a
    regression's value as predicted).
    Texts are encoded as training encodes them (gpt2kit.evaluation.classification.classify). `top_k` and
    `batch_size` given here are the defaults of every call."""

    def __init__(self, model: GPT2ForSequenceClassification, tokenizer: GPT2Tokenizer, *,
                 max_length: int | None = None, batch_size: int = 8, top_k: Any = _TOP_LABEL) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size, self.top_k = max_length, batch_size, top_k
        _check_call_options(True, batch_size)
        _check_top_k(top_k)

    def __call__(self, inputs: str | dict[str, str] | Sequence[str | dict[str, str]], *, top_k: Any = _TOP_LABEL,
                 batch_size: int | None = None) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        from .evaluation.classification import classify

        single = isinstance(inputs, (str, dict))
        texts = [_pair_text(item) for item in ([inputs] if single else list(inputs))]
        if not texts:
            raise ValueError("expected a text, a list of texts or {'text', 'text_pair'} pairs, got an empty list")
        call_top_k = top_k is not _TOP_LABEL
        top_k = top_k if call_top_k else self.top_k
        _check_top_k(top_k)
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_call_options(True, batch_size)
        logits = classify(self.model, self.tokenizer, texts, max_length=self.max_length, batch_size=batch_size)
        config = self.model.config
        problem = config.extra.get("problem_type")  # transformers' choice of function: a regression's value as is
        scores = (logits if problem == "regression" else logits.sigmoid()
                  if problem == "multi_label_classification" or logits.shape[-1] == 1 else logits.softmax(-1))
        names = config.id2label or {}
        ranked = [[{"label": names.get(i, f"LABEL_{i}"), "score": float(row[i])}
                   for i in row.argsort(descending=True).tolist()] for row in scores]
        results = [labels[0] if top_k is _TOP_LABEL else labels[:top_k] for labels in ranked]
        if not single:
            return results
        # transformers' own quirk: one text without top_k in the call comes back in a list, a pair does not.
        return [results[0]] if isinstance(inputs, str) and not call_top_k else results[0]


def _check_top_k(top_k: Any) -> None:
    if top_k is not _TOP_LABEL and top_k is not None and not (type(top_k) is int and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1 or None (every label), got {top_k!r}")


def _pair_text(item: Any) -> str:
    """A text to classify: a string, or {"text", "text_pair"} joined a sentence per line as training joins pairs."""
    if isinstance(item, str):
        return item
    if (isinstance(item, dict) and "text" in item and set(item) <= {"text", "text_pair"}
            and all(isinstance(value, str) for value in item.values())):
        return item["text"] if "text_pair" not in item else f"{item['text'].strip()}\n{item['text_pair'].strip()}"
    raise ValueError(f"expected a text or {{'text': ..., 'text_pair': ...}}, got {item!r:.100}")


def pipeline(task: str, model: str | os.PathLike | GPT2LMHeadModel | GPT2ForSequenceClassification, *,
             tokenizer: str | os.PathLike | GPT2Tokenizer | None = None, dtype: torch.dtype | str | None = None,
             device: torch.device | str = "cpu", random_init: bool = False, backend: str = "torch",
             quantize: str | None = None, pack_weights: bool = False,
             assistant_model: str | os.PathLike | GPT2LMHeadModel | None = None,
             **defaults) -> TextGenerationPipeline | TextClassificationPipeline:
    """`pipeline("text_generation", model="runs/demo/final")("ROMEO:", max_new_tokens=40)`. `defaults` are
    generation options every call starts from; `backend="onnx"` runs an exported directory in onnxruntime;
    `assistant_model` (a model, or a directory loaded in the model's dtype on its device) decodes speculatively.
    `pipeline("text_classification", model="runs/sst2/final")("a gem of a film")` classifies with a trained
    classifier (options: max_length, batch_size, top_k)."""
    kind = task.replace("-", "_")
    if kind == "text_classification":
        if random_init or backend != "torch" or quantize or pack_weights or assistant_model is not None:
            raise ValueError("text_classification runs a trained classifier (a directory or a "
                             "GPT2ForSequenceClassification) with the torch backend: random_init, backend, quantize, "
                             "pack_weights and assistant_model do not apply")
        return TextClassificationPipeline(*load_classifier_and_tokenizer(model, tokenizer=tokenizer, dtype=dtype,
                                                                         device=device), **defaults)
    if kind != "text_generation":
        raise ValueError(f"unknown pipeline task {task!r}; expected 'text_generation' or 'text_classification'")
    lm, tok = load_model_and_tokenizer(model, tokenizer=tokenizer, dtype=dtype, device=device,
                                       random_init=random_init, backend=backend, quantize=quantize,
                                       pack_weights=pack_weights)
    return TextGenerationPipeline(lm, tok, assistant_model=load_assistant(assistant_model, lm, tok,
                                                                          random_init=random_init), **defaults)


def generate_text(model: str | os.PathLike, prompt: str, *, tokenizer: str | os.PathLike | None = None,
                  dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                  random_init: bool = False, backend: str = "torch", quantize: str | None = None,
                  pack_weights: bool = False, return_full_text: bool = True, stream_to: TextIO | None = None,
                  assistant_model: str | os.PathLike | None = None, **options) -> list[str]:
    """Load a model and continue `prompt`; one text per returned sequence. With `stream_to`, a single
    sequence is also written there piece by piece as it is generated (the `gpt2kit generate` command)."""
    pipe = pipeline("text_generation", model, tokenizer=tokenizer, dtype=dtype, device=device,
                    random_init=random_init, backend=backend, quantize=quantize, pack_weights=pack_weights,
                    assistant_model=assistant_model)
    config = pipe._config(options)  # the call's options over the model's generation_config.json
    if stream_to is None or config.num_return_sequences != 1 or config.num_beams > 1:
        texts = [r["generated_text"] for r in pipe(prompt, return_full_text=return_full_text, **options)]
        if stream_to is not None and len(texts) == 1:  # beam search: the text is known only at the end
            stream_to.write(texts[0])
        return texts
    stream = pipe.stream(prompt, **options)  # checks the options before anything is written
    pieces = [prompt] if return_full_text else []
    if pieces:
        stream_to.write(prompt)
    for piece in stream:
        stream_to.write(piece)
        stream_to.flush()
        pieces.append(piece)
    return ["".join(pieces)]

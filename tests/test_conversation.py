"""Chat formats: the text each writes, its Jinja form rendering to the same text, and the model's own template."""

import json

import pytest
import torch
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gpt2kit import GPT2Tokenizer
from gpt2kit.conversation import ALPACA, PLAIN, chat_format, turns_of
from gpt2kit.data.datasets import alpaca_prompt

SYSTEM = {"role": "system", "content": "You are a pirate.\nAnswer briefly."}
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "Hi {{ there }} 'you' \\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "developer", "content": "Be kind."}, {"role": "user", "content": "And then?"}],
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
]


def test_plain_transcript():
    assert PLAIN.transcript(turns_of(CONVERSATIONS[0])) == (
        "You are a pirate.\nAnswer briefly.\nUser: Hi {{ there }} 'you' \\n\nAssistant:")
    turns = turns_of(CONVERSATIONS[2])
    assert PLAIN.transcript(turns, add_generation_prompt=False).endswith("User: Hi\nAssistant: Hello.\n")
    assert PLAIN.transcript(turns, continue_final_message=True).endswith("User: Hi\nAssistant: Hello.")
    assert PLAIN.transcript([("user", "Hi"), ("assistant", "")], continue_final_message=True) == (
        "User: Hi\nAssistant: ")
    assert PLAIN.reply_stops(["!"]) == ["\nUser:", "!"] and PLAIN.skip_leading_space


def test_one_alpaca_question_is_the_instruction_finetunes_training_prompt():
    assert ALPACA.transcript([("user", "Name three colors.")]) == alpaca_prompt("Name three colors.")
    assert ALPACA.transcript(turns_of(CONVERSATIONS[2]), continue_final_message=True) == (
        "You are a pirate.\nAnswer briefly.\n\n### Instruction:\nHi\n\n### Response:\nHello.")
    assert ALPACA.reply_stops(None) == ["### Instruction:"] and not ALPACA.skip_leading_space


@pytest.mark.parametrize("fmt", [PLAIN, ALPACA], ids=lambda f: f.name)
def test_each_formats_jinja_template_renders_its_transcript(fmt):
    """What the tokenizer saves and a GGUF carries, rendered as transformers and llama-cpp-python render it."""
    render = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(fmt.template)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = fmt.transcript(turns_of(messages), add_generation_prompt=add_generation_prompt)
            assert render.render(messages=messages, add_generation_prompt=add_generation_prompt) == expected
    assert chat_format(fmt.template) is fmt  # a saved template is known again by its text


def test_a_models_own_jinja_template_is_rendered_as_transformers_renders_it(tmp_path):
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
              "{% if messages[0]['role'] == 'assistant' %}"
              "{{ raise_exception('starts with the assistant') }}{% endif %}")
    tok = GPT2Tokenizer.gpt2()
    tok.chat_template = chatml
    tok.save_pretrained(tmp_path)
    again = GPT2Tokenizer.from_file(tmp_path)
    assert again.chat_template == chatml and again.chat_format().name == "jinja"
    text = again.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                  add_generation_prompt=True) == text
    with pytest.raises(ValueError, match="chat_template: starts with the assistant"):
        again.apply_chat_template([{"role": "assistant", "content": "Hi"}])
    # The reply ends at EOS or at the text the template closes an assistant message with.
    assert again.chat_format().reply_stops(None) == ["<|im_end|>"]
    # Phi-3 closes each message with <|end|> and the whole conversation with EOS: only <|end|> ends a reply.
    phi3 = GPT2Tokenizer.gpt2()
    phi3.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}"
                          "{{ eos_token }}{% endif %}")
    assert phi3.chat_format().end_of_turn == "<|end|>"
    zephyr = GPT2Tokenizer.gpt2()  # closes every message with EOS itself: that is its end of turn
    zephyr.chat_template = phi3.chat_template.replace("<|end|>", "' + eos_token + '").replace(
        "{% else %}{{ eos_token }}", "{% else %}")
    assert zephyr.chat_format().end_of_turn == "<|endoftext|>"
    plain_end = GPT2Tokenizer.gpt2()
    plain_end.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    assert plain_end.chat_format().reply_stops(None) == [] and plain_end.chat_format().end_of_turn == ""


@pytest.mark.parametrize("fmt", [PLAIN, ALPACA], ids=lambda f: f.name)
def test_a_saved_tokenizer_prompts_transformers_as_gpt2kit(tmp_path, fmt):
    """gpt2kit's own formats are saved too (the plain one included): transformers writes the same prompt."""
    tok = GPT2Tokenizer.gpt2()
    tok.chat_template = None if fmt is PLAIN else fmt.template
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == fmt.template
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert GPT2Tokenizer.from_file(tmp_path).chat_format() is fmt


def test_a_model_template_renders_and_tokenizes_as_in_transformers(tmp_path):
    """Special tokens the template writes are their ids; transformers' tag, functions and tojson are there; the
    continued final message is cut as transformers cuts it; a template that fails is one ValueError."""
    template = ("{% for m in messages %}{{ m['role'] | tojson }}: {% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] | trim }}{% endgeneration %}{{ eos_token }}{% else %}{{ m['content'] }}{% endif %}"
                "\n{% endfor %}{% if add_generation_prompt %}\"assistant\": {% endif %}"
                "{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('no year') }}{% endif %}")
    tok = GPT2Tokenizer.gpt2()
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "the .jinja file wins"}))
    ours = GPT2Tokenizer.from_file(tmp_path)
    assert ours.chat_template == template
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "a < b & 'c' é"}, {"role": "assistant", "content": "Sure, "}]
    for options in ({"add_generation_prompt": True}, {"continue_final_message": True}):
        text = ours.apply_chat_template(messages, tokenize=False, **options)
        assert text == hf.apply_chat_template(messages, tokenize=False, **options)
        assert ours.apply_chat_template(messages, **options) == hf.apply_chat_template(messages, **options)
        assert ours.apply_chat_template(messages, return_dict=False, **options) == hf.apply_chat_template(
            messages, return_dict=False, **options)
    assert ours.eos_token_id in ours.apply_chat_template(messages, return_dict=False)
    hf.pad_token = hf.eos_token  # gpt2kit pads with EOS unless told otherwise; transformers needs telling
    for options in ({"padding": True, "return_tensors": "pt"}, {"padding": "max_length", "max_length": 40,
                                                               "truncation": True}, {"tokenize": False}):
        mine = ours.apply_chat_template([messages, messages[:1]], add_generation_prompt=True, **options)
        theirs = hf.apply_chat_template([messages, messages[:1]], add_generation_prompt=True, **options)
        assert mine == theirs if isinstance(mine, list) else all(
            torch.equal(torch.as_tensor(mine[k]), torch.as_tensor(theirs[k])) for k in ("input_ids", "attention_mask"))
    ours.chat_template = "{{ messages[0]['content'] + loop }}"  # a TypeError inside the template
    with pytest.raises(ValueError, match="^chat_template: "):
        ours.apply_chat_template(messages)


CHATML_TAGGED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
                 "{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_assistant_tokens_mask_is_transformers(tmp_path):
    """return_assistant_tokens_mask: 1 for every token overlapping the {% generation %} text, truncated and padded
    with the ids, for one conversation or a batch, as lists or tensors."""
    tok = GPT2Tokenizer.gpt2()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TAGGED
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf.pad_token = hf.eos_token
    batch = [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend. How are you?"},
              {"role": "user", "content": "ok"}, {"role": "assistant", "content": "good"}],
             [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Q?"},
              {"role": "assistant", "content": "A lot of text here"}],
             # characters split across byte tokens: each of them covers the whole character, as there
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "日本 🎉"},
              {"role": "user", "content": "🎉"}, {"role": "assistant", "content": "🎉🎉 ok"}]]
    for options in ({}, {"add_generation_prompt": True}, {"padding": True, "return_tensors": "pt"},
                    {"truncation": True, "max_length": 12, "padding": True}):
        options = {"add_generation_prompt": False, "return_assistant_tokens_mask": True, **options}
        for conversation in (batch, batch[0]):
            mine = tok.apply_chat_template(conversation, **options)
            theirs = hf.apply_chat_template(conversation, return_dict=True, **options)
            assert list(mine) == ["input_ids", "attention_mask", "assistant_masks"]
            for key in mine:
                as_lists = [v.tolist() if isinstance(v, torch.Tensor) else v for v in (mine[key], theirs[key])]
                assert as_lists[0] == as_lists[1], (options, key)
    masked = tok.apply_chat_template(batch[1], add_generation_prompt=False, return_assistant_tokens_mask=True)
    assert tok.decode([t for t, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]) == (
        "A lot of text here<|im_end|>")
    masked = tok.apply_chat_template(batch[2], add_generation_prompt=False, return_assistant_tokens_mask=True)
    assert tok.decode([t for t, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]) == (
        "日本 🎉<|im_end|>🎉🎉 ok<|im_end|>")
    # A lone surrogate (JSON's "\ud83d" alone) is U+FFFD to the tokenizer; counting its bytes raised.
    lone = [{"role": "user", "content": "x\ud800y"}, {"role": "assistant", "content": "\ud83d ok"}]
    masked = tok.apply_chat_template(lone, add_generation_prompt=False, return_assistant_tokens_mask=True)
    assert tok.decode([t for t, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]) == (
        "\ufffd ok<|im_end|>")
    with pytest.raises(ValueError, match="needs tokenize=True and return_dict=True"):
        tok.apply_chat_template(batch[0], return_assistant_tokens_mask=True, return_dict=False)
    with pytest.raises(ValueError, match="not compatible"):
        tok.apply_chat_template(batch[0], return_assistant_tokens_mask=True, continue_final_message=True)
    tok.chat_template = None  # the plain transcript marks nothing: all 0, as transformers gives without the tag
    with pytest.warns(UserWarning, match="no {% generation %} tag"):
        plain = tok.apply_chat_template(batch[0], return_assistant_tokens_mask=True)
    assert plain["assistant_masks"] == [0] * len(plain["input_ids"]) and plain["input_ids"]


@pytest.mark.parametrize("prefill", ["<", "end", "", "Sure, "])
def test_a_continued_message_ends_where_transformers_ends_it(tmp_path, prefill):
    """The cut is after the message itself, not at a later place its text recurs (ChatML's closing tags)."""
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if tools is not none %}[TOOLS]{% endif %}")
    tok = GPT2Tokenizer.gpt2()
    tok.chat_template = chatml
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": prefill}]
    ours = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours == hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours.endswith("assistant\n" + prefill) and "[TOOLS]" not in ours  # tools is none, as there

"""Datasets: pretraining windows over shards, the resumable sampler, classification and instruction data, collate."""

import json
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from gpt2kit import GPT2Tokenizer
from gpt2kit.conversation import ALPACA
from gpt2kit.data import (ChatDataset, ClassificationDataset, DataError, InstructionDataset, PretrainingDataset,
                          ResumableSampler, collate, load_tokenizer, preprocess)

from .conftest import DATA


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.gpt2()


@pytest.fixture(scope="module")
def verdict_dirs(tmp_path_factory):
    """the-verdict preprocessed twice: one shard, and shards of 1000 tokens."""
    root = tmp_path_factory.mktemp("verdict")
    src = DATA / "the-verdict" / "the-verdict.txt"
    preprocess(src, root / "one", workers=1, progress=False)
    preprocess(src, root / "many", workers=1, shard_tokens=1000, progress=False)
    return root / "one", root / "many"


# ---- PretrainingDataset --------------------------------------------------------------------------------------
def test_windows_cover_the_stream_once(verdict_dirs, tok):
    one, many = verdict_dirs
    stream = tok.encode((DATA / "the-verdict" / "the-verdict.txt").read_text()) + [tok.eos_token_id]
    for seq_len in (1, 7, 64):
        ds = PretrainingDataset(one, seq_len)
        assert len(ds) == (len(stream) - 1) // seq_len
        targets = []
        for i in range(len(ds)):
            item = ds[i]
            assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (seq_len,)
            assert item["input_ids"].tolist() == stream[i * seq_len:(i + 1) * seq_len]
            assert item["targets"].tolist() == stream[i * seq_len + 1:(i + 1) * seq_len + 1]
            targets += item["targets"].tolist()
        assert targets == stream[1:1 + len(ds) * seq_len]  # each token after the first is a target once
    with pytest.raises(IndexError):
        PretrainingDataset(one, 64)[len(PretrainingDataset(one, 64))]


def test_windows_across_shards_equal_one_shard(verdict_dirs):
    one, many = verdict_dirs
    a, b = PretrainingDataset(one, 100), PretrainingDataset(many, 100)
    assert len(b._files) > 4  # several shards, so windows cross shard ends
    assert len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["targets"], b[i]["targets"])


def test_dataset_pickles_without_data_and_knows_its_tokenizer(verdict_dirs, tok):
    one, _ = verdict_dirs
    ds = PretrainingDataset(one, 32)
    ds[0]  # open the memmaps
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the shard (~10k tokens) is not copied into DataLoader workers
    assert torch.equal(pickle.loads(blob)[3]["input_ids"], ds[3]["input_ids"])
    assert ds.tokenizer_spec["name"] == "gpt2"
    assert load_tokenizer(one).encode("Hello world") == tok.encode("Hello world")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    first = next(iter(loader))
    assert torch.equal(first["input_ids"][1], ds[1]["input_ids"])


def test_dataset_errors(verdict_dirs, tmp_path):
    one, _ = verdict_dirs
    with pytest.raises(DataError, match="no split 'val'"):
        PretrainingDataset(one, 8, split="val")
    with pytest.raises(DataError, match="fewer than one window"):
        PretrainingDataset(one, 10**6)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        PretrainingDataset(tmp_path, 8)
    assert len(PretrainingDataset(one, 8).tokens(5, 5)) == 0
    n = PretrainingDataset(one, 8).n_tokens
    for start, stop in ((-2, 2), (0, n + 1), (5, 4)):  # a negative start read from the last shard's end
        with pytest.raises(IndexError, match=rf"tokens \[{start}, {stop}\) out of range for the {n} tokens"):
            PretrainingDataset(one, 8).tokens(start, stop)
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    shard = sorted(copy.glob("train-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(DataError, match=rf"{shard.name}: 100 bytes, but meta.json records \d+ tokens"):
        PretrainingDataset(copy, 8)


# ---- ResumableSampler ----------------------------------------------------------------------------------------
def test_sampler_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(100, seed=3), ResumableSampler(100, seed=3)
    b.set_epoch(5)
    b.set_epoch(0)
    assert list(a) == list(b)
    assert sorted(a) == list(range(100)) and list(a) != list(range(100))
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(ResumableSampler(100, seed=4)) != list(b)
    # no collision between (seed, epoch) = (0, 1) and (1, 0)
    s01, s10 = ResumableSampler(50, seed=0), ResumableSampler(50, seed=1)
    s01.set_epoch(1)
    assert list(s01) != list(s10)
    assert list(ResumableSampler(10, shuffle=False)) == list(range(10))


def test_sampler_resumes_exactly():
    full = ResumableSampler(37, seed=7)
    full.set_epoch(2)
    order = list(full)
    run = ResumableSampler(37, seed=7)
    run.set_epoch(2)
    consumed = []
    for n in (5, 8, 3):
        consumed += list(run)[:n]
        run.advance(n)
    state = run.state_dict()
    assert state == {"seed": 7, "epoch": 2, "position": 16}
    resumed = ResumableSampler(37, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert len(resumed) == 37 - 16
    assert consumed + list(resumed) == order
    with pytest.raises(ValueError, match="set_epoch"):
        resumed.advance(22)


@pytest.mark.parametrize("num_samples,world_size", [(100, 4), (103, 4), (7, 7), (50, 3)])
def test_sampler_ranks_are_disjoint_and_equal(num_samples, world_size):
    ranks = [ResumableSampler(num_samples, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for s in ranks:
        s.set_epoch(4)
    parts = [list(s) for s in ranks]
    assert {len(p) for p in parts} == {num_samples // world_size}
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat)  # disjoint
    whole = ResumableSampler(num_samples, seed=1)
    whole.set_epoch(4)
    kept = list(whole)[:len(flat)]  # strided slices of the same permutation, tail dropped
    assert sorted(flat) == sorted(kept)
    assert [kept[i] for i in range(1, len(kept), world_size)] == parts[1]
    with pytest.raises(ValueError):
        ResumableSampler(10, rank=2, world_size=2)


@pytest.mark.parametrize("num_samples", [38, 40, 47])
def test_each_step_holds_the_same_samples_on_any_number_of_ranks(num_samples):
    """An epoch keeps its first floor(n / B) x B samples (B = global batch): a step never straddles two epochs,
    and the ranks' slices of step k together are step k of one process."""
    batch, steps = 8, []
    for world_size in (1, 2, 4):
        ranks = [ResumableSampler(num_samples, seed=5, rank=r, world_size=world_size, batch_size=batch)
                 for r in range(world_size)]
        share = batch // world_size
        orders = [list(s) for s in ranks]
        assert {len(order) for order in orders} == {num_samples // batch * share}
        steps.append([sorted(i for order in orders for i in order[k * share:(k + 1) * share])
                      for k in range(num_samples // batch)])
    assert steps[0] == steps[1] == steps[2]
    with pytest.raises(ValueError, match="multiple of world_size"):
        ResumableSampler(40, world_size=3, batch_size=8)
    with pytest.raises(ValueError, match="fewer than one batch of 48"):
        ResumableSampler(num_samples, batch_size=48)


# ---- ClassificationDataset -----------------------------------------------------------------------------------
def _label_counts(ds):
    return np.bincount(ds.labels).tolist()


def test_sst2(tok):
    ds = ClassificationDataset(DATA / "glue" / "SST-2" / "dev.tsv", tok)
    assert ds.format == "sst2" and len(ds) == 872 and _label_counts(ds) == [428, 444]
    assert ds.id2label == {0: "negative", 1: "positive"} and ds.num_labels == 2
    first = ds[0]
    assert tok.decode(first["input_ids"]) == "it 's a charming and often affecting journey ."  # trailing space cut
    assert first["labels"] == 1 and first["input_ids"].dtype == torch.long


def test_cola(tok):
    ds = ClassificationDataset(DATA / "glue" / "CoLA" / "dev.tsv", tok)
    assert ds.format == "cola" and len(ds) == 1043 and _label_counts(ds) == [322, 721]
    assert tok.decode(ds[0]["input_ids"]) == "The sailors rode the breeze clear of the rocks."
    assert ds.id2label[0] == "unacceptable"


def test_agnews(tok):
    ds = ClassificationDataset(DATA / "ag_news" / "test.csv", tok, max_length=16)
    assert ds.format == "agnews" and len(ds) == 7600 and _label_counts(ds) == [1900] * 4
    assert ds.id2label == {0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"}
    assert ds[0]["labels"] == 2  # class "3" in the file
    assert max(len(ds[i]["input_ids"]) for i in range(len(ds))) == 16
    full = ClassificationDataset(DATA / "ag_news" / "test.csv", tok, format="agnews")
    assert tok.decode(full[0]["input_ids"]).startswith("Fears for T N pension after talks Unions representing")


def test_imdb_style_csv_with_label_map(tmp_path, tok):
    path = tmp_path / "imdb.csv"
    path.write_text('review,sentiment\n"A great, moving film.",positive\nDull.,negative\n"Fine, ""ok"".",positive\n')
    ds = ClassificationDataset(path, tok)
    assert ds.format == "csv" and ds.id2label == {0: "negative", 1: "positive"} and ds.labels == [1, 0, 1]
    assert tok.decode(ds[2]["input_ids"]) == 'Fine, "ok".'
    mapped = ClassificationDataset(path, tok, label_names=["positive", "negative"])
    assert mapped.labels == [0, 1, 0] and mapped.label2id == {"positive": 0, "negative": 1}
    numeric = tmp_path / "numeric.csv"
    numeric.write_text("text,label\ngood,1\nbad,0\nmeh,2\n")
    assert ClassificationDataset(numeric, tok).num_labels == 3
    mixed = tmp_path / "mixed.csv"  # words among numbers: every label is a name
    mixed.write_text("text,label\ngood,1\nbad,0\nmeh,neutral\n")
    assert ClassificationDataset(mixed, tok, label_names=["0", "1", "neutral"]).labels == [1, 0, 2]


def test_text_columns_and_sentence_pairs(tmp_path, tok):
    """GLUE's pair tasks (RTE, QNLI, MRPC, ...) and files whose text column has another name."""
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps. \tSomeone rests.\tentailment\n"
                   "1\tIt rains.\tIt is dry.\tnot_entailment\n")
    pairs = ClassificationDataset(rte, tok, text_columns=["sentence1", "sentence2"])
    assert tok.decode(pairs[0]["input_ids"]) == "A man sleeps.\nSomeone rests."
    assert pairs.id2label == {0: "entailment", 1: "not_entailment"} and pairs.labels == [0, 1]
    first = ClassificationDataset(rte, tok, text_columns=["sentence2"])
    assert tok.decode(first[1]["input_ids"]) == "It is dry."
    with pytest.raises(DataError, match=r"rte.tsv:1: no text column in header .*; expected one of sentence3"):
        ClassificationDataset(rte, tok, text_columns=["sentence1", "sentence3"])
    with pytest.raises(DataError, match="rte.tsv:1: no text column"):  # no column named like a text by default
        ClassificationDataset(rte, tok)
    with pytest.raises(DataError, match="text columns are chosen in a file with a header .* not in cola"):
        ClassificationDataset(DATA / "glue" / "CoLA" / "dev.tsv", tok, text_columns=["sentence"])
    with pytest.raises(ValueError, match="one column, or the two of a sentence pair"):
        ClassificationDataset(rte, tok, text_columns=["a", "b", "c"])
    mrpc = tmp_path / "mrpc.tsv"  # GLUE's MRPC: capitals, spaces and '#' in the names, labels under Quality
    mrpc.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe left.\tHe went away.\n")
    same = ClassificationDataset(mrpc, tok, text_columns=["#1 String", "#2 string"])
    assert tok.decode(same[0]["input_ids"]) == "He left.\nHe went away." and same.labels == [1]


def test_headered_tsv_with_its_own_labels_and_files_with_a_byte_order_mark(tmp_path, tok):
    strings = tmp_path / "strings.tsv"
    strings.write_text("text\tlabel\ngood film\tpositive\nbad film\tnegative\n")
    assert ClassificationDataset(strings, tok).id2label == {0: "negative", 1: "positive"}
    five = tmp_path / "five.tsv"
    five.write_text("sentence\tlabel\n" + "".join(f"review {i}\t{i}\n" for i in range(5)))
    assert ClassificationDataset(five, tok).num_labels == 5
    sst2 = DATA / "glue" / "SST-2" / "dev.tsv"  # as a spreadsheet's "CSV UTF-8" export writes it: BOM first
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + sst2.read_bytes())
    assert ClassificationDataset(tmp_path / "bom.tsv", tok).input_ids == ClassificationDataset(sst2, tok).input_ids
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    assert len(InstructionDataset(tmp_path / "bom.json", tok, max_length=64)) == len(RECORDS)
    (tmp_path / "bad.json").write_bytes(b"\xef\xbb\xbf[\xff]")  # the offset counts the BOM: byte 4 of the file
    with pytest.raises(DataError, match="invalid UTF-8 at byte offset 4"):
        InstructionDataset(tmp_path / "bad.json", tok, max_length=64)
    # An integer longer than Python converts (4300 digits) is valid JSON: it stopped the run.
    big = dict(RECORDS[0], id=int("1" * 4000))
    (tmp_path / "big.jsonl").write_text(json.dumps(big).replace("1" * 4000, "1" * 5000) + "\n")
    (tmp_path / "big.json").write_text("[" + json.dumps(big).replace("1" * 4000, "1" * 5000) + "]")
    for name in ("big.jsonl", "big.json"):
        assert InstructionDataset(tmp_path / name, tok, max_length=64).examples \
            == InstructionDataset(tmp_path / "bom.json", tok, max_length=64).examples[:1]


@pytest.mark.parametrize("name,content,fmt,message", [
    ("bad.tsv", "sentence\tlabel\ngood movie\t1\nbad movie\tx\n", "sst2",
     r"bad.tsv:3: label 'x' is not an integer in 0..1"),
    ("bad.tsv", "a\t1\t\tok\nb\t0\tnot enough\n", "cola", r"bad.tsv:2: expected 4 tab-separated columns"),
    ("bad.csv", '"5","title","text"\n', "agnews", r"bad.csv:1: label '5' is not an integer in 1..4"),
    ("bad.csv", "words,stars\nhi,1\n", "csv", r"bad.csv:1: no text column"),
    ("bad.csv", "text,label\n,1\n", "csv", r"bad.csv:2: empty text"),
    ("bad.csv", "text,label\ngood,1\nfine,\nbad,0\n", "csv", r"bad.csv:3: empty label"),
    ("bad.tsv", "sentence\tlabel\ngood\t1\nbad\t--1\n", "sst2", r"bad.tsv:3: label '--1' is not an integer in 0..1"),
    ("bad.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n", "sst2", r"bad.tsv:3: invalid UTF-8 at byte offset 25"),
    # Sorted as words, "10" would come before "2": every class renumbered, silently.
    ("bad.csv", "text,label\n" + "".join(f"t{i},{i}\n" for i in range(11)) + "oops,N/A\n", "csv",
     r"bad.csv:13: label 'N/A' is not an integer, but other labels are"),
    # An error names the first line of a record whose quoted text spans several.
    ("bad.csv", 'text,label\n"first\nsecond\nthird",\nfoo,1\n', "csv", r"bad.csv:2: empty label"),
])
def test_classification_errors(tmp_path, tok, name, content, fmt, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        ClassificationDataset(path, tok, format=fmt)


# ---- InstructionDataset --------------------------------------------------------------------------------------
RECORDS = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red, for example."},
]


@pytest.mark.parametrize("as_jsonl", [False, True])
def test_instruction_masking(tmp_path, tok, as_jsonl):
    path = tmp_path / ("alpaca.jsonl" if as_jsonl else "alpaca.json")
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) if as_jsonl else json.dumps(RECORDS))
    ds = InstructionDataset(path, tok, max_length=256)
    assert len(ds) == 2
    for item, record in zip(ds, RECORDS):
        ids, targets = item["input_ids"], item["targets"]
        assert ids.shape == targets.shape
        text = tok.decode(ids)
        assert text.startswith("Below is an instruction") and f"### Instruction:\n{record['instruction']}" in text
        assert ("### Input:\nhot" in text) == bool(record["input"])
        assert text.endswith("### Response:\n" + record["output"])  # the EOS is a target, not an input
        learned = targets[targets != -100].tolist()
        assert learned == tok.encode(record["output"]) + [tok.eos_token_id]
        n_prompt = len(ids) + 1 - len(learned)
        assert (targets[:n_prompt - 1] == -100).all() and (targets[n_prompt - 1:] != -100).all()
        assert torch.equal(targets[n_prompt - 1:-1], ids[n_prompt:])  # aligned: targets[t] is token t + 1


def test_instruction_truncation_and_errors(tmp_path, tok):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(RECORDS))
    full = InstructionDataset(path, tok, max_length=256)
    prompt_len = len(full[0]["input_ids"]) + 1 - len(tok.encode("cold")) - 1
    cut = InstructionDataset(path, tok, max_length=prompt_len)  # room for exactly one response token
    assert len(cut[0]["input_ids"]) == prompt_len and (cut[0]["targets"] != -100).sum() == 1
    assert InstructionDataset(path, tok, max_length=10).skipped == 2
    path.write_text('{"instruction": "x", "input": ""}\n')
    with pytest.raises(DataError, match=r"a.json:1: missing or non-string 'output'"):
        InstructionDataset(path, tok, max_length=64)
    path.write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"a.json:2: malformed JSON"):
        InstructionDataset(path, tok, max_length=64)
    path.write_text(json.dumps(RECORDS[0], indent=1))  # valid JSON, but one record written over several lines
    with pytest.raises(DataError, match=r"a.json: one JSON object; expected a JSON list of records or JSON lines"):
        InstructionDataset(path, tok, max_length=64)


CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue, é."}]},
    {"messages": [{"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1 2 3"}]},
]
# Templates with transformers' {% generation %} tag around what the assistant writes, so that transformers' own
# assistant-token mask is the reference: ChatML (the tag covering the end-of-turn token and the newline, or the
# token only), and a transcript whose generation prompt ends in a space the reply's first token starts with.
TAGGED = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
              "{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "chatml-inner": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
                    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "spaced": "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' }}{% generation %}"
              "{{ m['content'] + '\\n' }}{% endgeneration %}{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}",
}


@pytest.mark.parametrize("fmt", ["plain", "alpaca", *TAGGED, *(f"{name} untagged" for name in TAGGED)])
def test_chat_conversations_learn_the_assistant_turns(tmp_path, fmt):
    """The conversation is tokenized as apply_chat_template tokenizes it; the learned tokens are the assistant's
    turns (with what the template closes them with), then EOS where no end-of-turn token closes them; with a
    template marking them, exactly transformers' assistant-token mask, and without the marks the same where they
    would cover each message to its end."""
    import transformers

    tok = GPT2Tokenizer.gpt2()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    name = fmt.removesuffix(" untagged")
    if fmt == "alpaca":
        tok.chat_template = ALPACA.template
    elif name in TAGGED:
        tok.chat_template = TAGGED[name]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CONVERSATIONS))
    tok.save_pretrained(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    if fmt.endswith("untagged"):
        tok.chat_template = re.sub(r"{% (end)?generation %}", "", TAGGED[name])
    ds = ChatDataset(path, tok, max_length=256)
    assert len(ds) == 2
    # ChatML closes turns with <|im_end|>, where chat stops: no EOS is added after the last one.
    for (ids, _), item, conversation in zip(ds.examples, ds, CONVERSATIONS):
        messages = conversation["messages"]
        assert torch.equal(item["input_ids"], torch.tensor(ids[:-1]))
        whole = tok.apply_chat_template(messages, add_generation_prompt=False, return_dict=False)
        assert ids == whole + ([] if "chatml" in fmt else [tok.eos_token_id])
        learned = (item["targets"] != -100).tolist()
        text = tok.decode([t for t in item["targets"].tolist() if t != -100])
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert all(reply in text for reply in replies) and text.endswith("<|endoftext|>") != ("chatml" in fmt)
        assert "User" not in text and "Instruction" not in text and "<|im_start|>" not in text
        if name in TAGGED and fmt != "chatml-inner untagged":  # untagged, "\n" closes the message too
            reference = hf.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
            assert reference["input_ids"] == whole
            assert learned == [bool(m) for m in reference["assistant_masks"][1:]] + ([] if "chatml" in fmt
                                                                                      else [True])


def test_chat_data_errors_and_truncation(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[1]))
    full = ChatDataset(path, tok, max_length=256)
    prompt_len = len(tok.encode("User: Count to 3.\nAssistant:"))
    assert len(full[0]["input_ids"]) == prompt_len + len(tok.encode(" 1 2 3\n"))
    assert ChatDataset(path, tok, max_length=prompt_len - 1).skipped == 1  # no reply token left
    # Ending on the user's message: it is context, and no EOS is learned after it.
    path.write_text(json.dumps({"messages": [*CONVERSATIONS[1]["messages"], {"role": "user", "content": "Bye"}]}))
    trailing = ChatDataset(path, tok, max_length=256)
    targets = trailing[0]["targets"]
    assert tok.decode(targets[targets != -100].tolist()) == " 1 2 3\n"
    assert tok.decode(trailing.examples[0][0]).endswith("User: Bye\n")
    for record, message in [
        ({"text": "hi"}, r"c.jsonl:1: expected an object with a non-empty 'messages' list \(got text\)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"c.jsonl:1: no assistant message to learn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"c.jsonl:1: message 0: expected"),
    ]:
        path.write_text(json.dumps(record))
        with pytest.raises(DataError, match=message):
            ChatDataset(path, tok, max_length=64)
    # A template that writes the last reply differently from how it wrote it as history.
    odd = GPT2Tokenizer.gpt2()
    odd.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    path.write_text(json.dumps(CONVERSATIONS[0]))
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template does not write the conversation up to "
                                        r"message 2 as the start of the whole"):
        ChatDataset(path, odd, max_length=64)


# ---- collate -------------------------------------------------------------------------------------------------
def test_collate_reads_transformers_causal_lm_items():
    """labels aligned with input_ids become the next token's targets; an item's padding keeps its mask of 0."""
    items = [{"input_ids": [5, 6, 7, 0, 0], "labels": [5, 6, 7, -100, -100], "attention_mask": [1, 1, 1, 0, 0]},
             {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = collate(items, pad_token_id=0)
    assert batch["targets"].tolist() == [[6, 7, -100, -100, -100], [9, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert "labels" not in batch


def test_collate_all_three(verdict_dirs, tok, tmp_path):
    lm = PretrainingDataset(verdict_dirs[0], 8)
    batch = collate([lm[0], lm[1]], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].all()
    assert torch.equal(batch["targets"][1], lm[1]["targets"])

    cls = ClassificationDataset(DATA / "glue" / "CoLA" / "dev.tsv", tok)
    batch = collate([cls[0], cls[1], cls[2]], pad_token_id=99)
    lengths = [len(cls[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].tolist() == [cls.labels[i] for i in range(3)] and "targets" not in batch
    short = lengths.index(min(lengths))
    assert (batch["input_ids"][short, min(lengths):] == 99).all()

    path = tmp_path / "a.json"
    path.write_text(json.dumps(RECORDS))
    inst = InstructionDataset(path, tok, max_length=256)
    batch = collate([inst[0], inst[1]], tok.pad_token_id)
    n0 = len(inst[0]["input_ids"])
    assert (batch["targets"][0, n0:] == -100).all() and torch.equal(batch["targets"][0, :n0], inst[0]["targets"])

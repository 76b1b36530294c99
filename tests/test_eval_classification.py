"""Classification metrics on fixed predictions (hand-computed, and sklearn for the multi-class MCC), and a
classifier evaluated end to end agrees with classifying each text alone."""

import math
import random

import pytest
import torch
import transformers

from gpt2kit import GPT2Config, GPT2ForSequenceClassification, GPT2Tokenizer
from gpt2kit.data import ClassificationDataset
from gpt2kit.evaluation import classification_metrics, evaluate_classification
from gpt2kit.pipeline import pipeline

from .conftest import DATA

SST2 = DATA / "glue" / "SST-2" / "dev.tsv"


def test_binary_metrics_by_hand():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    predictions = [1, 1, 1, 0, 0, 0, 1, 0, 1, 1]  # TP 4, FN 1, TN 3, FP 2
    m = classification_metrics(labels, predictions, ["negative", "positive"])
    assert m["accuracy"] == 0.7 and m["correct"] == 7 and m["examples"] == 10
    assert m["matthews_correlation"] == pytest.approx((4 * 3 - 2 * 1) / math.sqrt(6 * 5 * 5 * 4))
    assert m["confusion_matrix"] == [[3, 2], [1, 4]]
    assert m["per_class"]["negative"] == {"support": 5, "predicted": 4, "correct": 3, "recall": 0.6,
                                          "precision": 0.75}
    assert m["per_class"]["positive"] == {"support": 5, "predicted": 6, "correct": 4, "recall": 0.8,
                                          "precision": 4 / 6}


def test_constant_predictions_have_zero_correlation():
    m = classification_metrics([0, 1, 1, 0], [1, 1, 1, 1], ["a", "b"])
    assert m["accuracy"] == 0.5 and m["matthews_correlation"] == 0.0
    assert m["per_class"]["a"]["precision"] is None  # never predicted


def test_multiclass_matthews_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed")
    rng = random.Random(0)
    labels = [rng.randrange(4) for _ in range(300)]
    predictions = [y if rng.random() < 0.6 else rng.randrange(4) for y in labels]
    m = classification_metrics(labels, predictions, ["World", "Sports", "Business", "Sci/Tech"])
    assert m["matthews_correlation"] == pytest.approx(sklearn_metrics.matthews_corrcoef(labels, predictions))
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=2)
    return GPT2ForSequenceClassification(config).eval()


def test_batched_evaluation_equals_one_text_at_a_time(classifier):
    tok = GPT2Tokenizer.gpt2()
    result = evaluate_classification(classifier, tok, SST2, limit=20, batch_size=8, progress=False)
    data = ClassificationDataset(SST2, tok, max_length=64)
    with torch.no_grad():
        predictions = [int(classifier(data[i]["input_ids"][None]).logits.argmax()) for i in range(20)]
    expected = classification_metrics(data.labels[:20], predictions, ["0", "1"])
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["accuracy"] == expected["accuracy"]
    assert sum(c["support"] for c in result["per_class"].values()) == 20


def test_class_count_mismatch_is_one_clear_error(classifier):
    with pytest.raises(ValueError, match=r"test.csv: 4 classes \(World, Sports, Business, Sci/Tech\) but the "
                                         r"model has 2 outputs"):
        evaluate_classification(classifier, GPT2Tokenizer.gpt2(), DATA / "ag_news" / "test.csv", progress=False)


def test_no_examples_is_one_clear_error(classifier):
    with pytest.raises(ValueError, match=r"dev.tsv: no examples to evaluate"):
        evaluate_classification(classifier, GPT2Tokenizer.gpt2(), DATA / "glue" / "SST-2" / "dev.tsv", limit=0,
                                progress=False)


def test_the_models_label_names_decide_its_output_order(tmp_path):
    """A classifier trained with id2label {0: positive, 1: negative}: the data's string labels map through it,
    not through their sorted order (which would swap them)."""
    tok = GPT2Tokenizer.gpt2()
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, id2label={0: "positive", 1: "negative"},
                        pad_token_id=tok.pad_token_id)
    model = GPT2ForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.weight[0] = 1.0  # the hidden state is layer-normed with weight 1: row 0 scores >= 0
        model.transformer.ln_f.bias.fill_(1.0)  # every logit 0 but output 0's, positive: predicts "positive"
    data = tmp_path / "pos.csv"
    data.write_text("text,label\ngreat,positive\nlovely,positive\nawful,negative\n")
    result = evaluate_classification(model, tok, data, progress=False)
    assert result["accuracy"] == pytest.approx(2 / 3)
    # A dataset read without the model's names numbers them sorted (negative 0): scored so, accuracy was 1/3.
    with pytest.raises(ValueError, match=r"pos.csv: the dataset numbers its classes \['negative', 'positive'\], the "
                                         r"model \['positive', 'negative'\]"):
        evaluate_classification(model, tok, ClassificationDataset(data, tok), progress=False)
    named = ClassificationDataset(data, tok, label_names=["positive", "negative"])
    assert evaluate_classification(model, tok, named, progress=False)["accuracy"] == pytest.approx(2 / 3)
    # Integer labels are the file's own ids whatever the names: nothing to swap, so no refusal.
    (tmp_path / "ids.csv").write_text("text,label\ngreat,0\nlovely,0\nawful,1\n")
    by_ids = ClassificationDataset(tmp_path / "ids.csv", tok, label_names=["negative", "positive"])
    assert evaluate_classification(model, tok, by_ids, progress=False)["accuracy"] == pytest.approx(2 / 3)
    small = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1000))
    with pytest.raises(ValueError, match="tokenizer has 50257 tokens but the model's vocab_size is 1000"):
        evaluate_classification(small, tok, data, progress=False)


def test_a_fixed_class_format_maps_its_labels_to_the_models_classes_by_name(tmp_path):
    """SST-2's 1 is "positive": a model whose output 0 is "positive" was scored as if 1 meant its output 1, so
    every class was swapped (AG News alike, against a model with its classes sorted)."""
    tok = GPT2Tokenizer.gpt2()
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\ngreat\t1\nlovely\t1\nawful\t0\n")
    for id2label, accuracy in (({0: "positive", 1: "negative"}, 2 / 3), ({0: "NEGATIVE", 1: "POSITIVE"}, 1 / 3)):
        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, id2label=id2label,
                            pad_token_id=tok.pad_token_id)
        model = GPT2ForSequenceClassification(config)
        with torch.no_grad():  # always output 0, as in the test above
            model.score.weight.zero_()
            model.score.weight[0] = 1.0
            model.transformer.ln_f.bias.fill_(1.0)
        result = evaluate_classification(model, tok, dev, progress=False)
        assert result["accuracy"] == pytest.approx(accuracy) and result["labels"] == list(id2label.values())
    model.config.id2label = {0: "bad", 1: "good"}
    with pytest.raises(ValueError, match=r"dev.tsv: sst2 labels its classes negative, positive; the model \(or "
                                         r"label_names\) names bad, good"):
        evaluate_classification(model, tok, dev, progress=False)
    # Read as a dataset object without the model's names, SST-2's classes keep its numbering: refused, not
    # scored swapped (accuracy 1/3 for 2/3); read with them, mapped by name.
    model.config.id2label = {0: "positive", 1: "negative"}
    with pytest.raises(ValueError, match=r"dev.tsv: the dataset numbers its classes \['negative', 'positive'\], the "
                                         r"model \['positive', 'negative'\]; read it with label_names="):
        evaluate_classification(model, tok, ClassificationDataset(dev, tok), progress=False)
    named = ClassificationDataset(dev, tok, label_names=["positive", "negative"])
    assert evaluate_classification(model, tok, named, progress=False)["accuracy"] == pytest.approx(2 / 3)
    model.config.id2label = {0: "NEGATIVE", 1: "POSITIVE"}  # the same order, named in capitals
    assert evaluate_classification(model, tok, ClassificationDataset(dev, tok), progress=False)["accuracy"] == \
        pytest.approx(1 / 3)
    ag = ClassificationDataset(DATA / "ag_news" / "test.csv", tok, max_length=8,
                               label_names=["Business", "Sci/Tech", "Sports", "World"])
    plain = ClassificationDataset(DATA / "ag_news" / "test.csv", tok, max_length=8)
    assert [ag.id2label[i] for i in ag.labels[:50]] == [plain.id2label[i] for i in plain.labels[:50]]


def test_transformers_default_class_names_name_nothing(tmp_path):
    """transformers writes LABEL_0, LABEL_1, ... for three or more classes: such a model read a CSV of string labels
    as if those were its classes ("label 'pos' is not one of ['LABEL_0', ...]")."""
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=3,
                                                     id2label={i: f"LABEL_{i}" for i in range(3)})).eval()
    data = tmp_path / "three.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\nso so,mid\n")
    result = evaluate_classification(model, GPT2Tokenizer.gpt2(), data, progress=False)
    assert result["labels"] == ["mid", "neg", "pos"] and result["examples"] == 3


def test_a_file_without_the_last_class_is_scored_by_the_models_classes(tmp_path):
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64,
                                                     num_labels=3)).eval()
    data = tmp_path / "two.CSV"
    data.write_text("text,label\ngood film,0\nbad film,1\nfine,1\n")
    result = evaluate_classification(model, GPT2Tokenizer.gpt2(), data, progress=False)  # "2 classes" before
    assert result["labels"] == ["0", "1", "2"] and result["examples"] == 3
    data.write_text("text,label\ngood film,0\nbad film,3\n")
    with pytest.raises(ValueError, match=r"two.CSV:3: label '3' is not an integer in 0..2"):
        evaluate_classification(model, GPT2Tokenizer.gpt2(), data, progress=False)


def test_long_fields_and_upper_case_suffixes(tmp_path):
    tok = GPT2Tokenizer.gpt2()
    long = tmp_path / "long.csv"
    long.write_text('text,label\n"' + "a " * 100_000 + '",1\nshort,0\n')  # past the csv module's 128 KiB
    data = ClassificationDataset(long, tok, max_length=8)
    assert data.labels == [1, 0] and len(data.input_ids[0]) == 8
    tsv = tmp_path / "x.TSV"
    tsv.write_text("sentence\tlabel\nit is good\t1\nit is bad\t0\n")
    assert ClassificationDataset(tsv, tok).format == "sst2"


def test_a_format_with_fixed_classes_is_refused_for_a_model_of_another_count(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64,
                        id2label={0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"})
    model = GPT2ForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match=r"dev.tsv: sst2 has 2 classes \(negative, positive\), but it is read for 4 "
                                         r"\(World, Sports, Business, Sci/Tech: the model's labels"):
        evaluate_classification(model, GPT2Tokenizer.gpt2(), DATA / "glue" / "SST-2" / "dev.tsv", limit=4,
                                progress=False)  # it scored SST-2's labels as World and Sports


def test_a_dev_tsv_lacking_a_class_of_a_numbered_three_class_set_is_read(tmp_path):
    dev = tmp_path / "dev.tsv"  # labels 0/1 only: sniffed like SST-2, but read for the training set's 3 classes
    dev.write_text("sentence\tlabel\ngood\t0\nbad\t1\n")
    data = ClassificationDataset(dev, GPT2Tokenizer.gpt2(), label_names=["0", "1", "2"])
    assert data.num_labels == 3 and data.labels == [0, 1]


def test_text_classification_pipeline_labels_and_scores_as_transformers_shapes_them(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, id2label={0: "neg", 1: "neutral", 2: "pos"})
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    model = GPT2ForSequenceClassification.from_pretrained(tmp_path / "clf")
    tok = GPT2Tokenizer.gpt2()
    tok.save_pretrained(tmp_path / "clf")  # for transformers' pipeline below
    texts = ["a gem of a film", "dull", "  it is what it is "]
    pipe = pipeline("text-classification", model=str(tmp_path / "clf"))
    with torch.no_grad():  # each text alone, stripped as training strips it
        probs = [model(torch.tensor([tok.encode(t.strip())])).logits[0].softmax(-1) for t in texts]
    expected = [sorted(({"label": config.id2label[i], "score": float(p[i])} for i in range(3)),
                       key=lambda d: -d["score"]) for p in probs]

    def close(a, b):
        return a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-6)

    got = pipe(texts, batch_size=2)
    assert len(got) == 3 and all(close(g, e[0]) for g, e in zip(got, expected))
    [single] = pipe(texts[0])
    assert close(single, expected[0][0])
    everything = pipe(texts[1], top_k=None)
    assert len(everything) == 3 and all(close(g, e) for g, e in zip(everything, expected[1]))
    assert [len(labels) for labels in pipe(texts, top_k=2)] == [2, 2, 2]
    assert [len(labels) for labels in pipe(texts, top_k=1)] == [1, 1, 1]  # top_k given: a list per text
    every = pipeline("text-classification", model=str(tmp_path / "clf"), top_k=None)  # a default of each call
    assert [len(labels) for labels in every(texts)] == [3, 3, 3]
    # Every input shape against transformers' pipeline on the same directory.
    theirs = {top_k: transformers.pipeline("text-classification", model=str(tmp_path / "clf"), **top_k_option)
              for top_k, top_k_option in (("unset", {}), ("none", {"top_k": None}))}
    for item in (texts[0], texts, {"text": "a gem", "text_pair": "dull"}):
        for call in ({}, {"top_k": 1}, {"top_k": None}):
            assert shapes(pipe(item, **call)) == shapes(theirs["unset"](item, **call)), (item, call)
        assert shapes(every(item)) == shapes(theirs["none"](item)), item
    # transformers' sentence pairs: one text, a sentence per line, as training joins a pair.
    assert [pipe({"text": " a gem ", "text_pair": "dull"})] == pipe("a gem\ndull")  # one pair: the bare dict
    assert pipe([{"text": "a gem", "text_pair": "dull"}, {"text": "fine"}]) == pipe(["a gem\ndull", "fine"])
    with pytest.raises(ValueError, match="expected a text or {'text': ..., 'text_pair': ...}"):
        pipe({"sentence": "a gem"})
    assert sum(d["score"] for d in everything) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1 or None"):
        pipe(texts, top_k=0)
    with pytest.raises(ValueError, match="text_classification runs a trained classifier"):
        pipeline("text_classification", model=str(tmp_path / "clf"), quantize="int8")


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification", None])
def test_the_pipelines_score_function_is_transformers(tmp_path, problem_type):
    """A regression's value as predicted (it went through a sigmoid), sigmoids for several labels at once or one
    label without a problem type, softmax otherwise."""
    torch.manual_seed(0)
    labels = 1 if problem_type != "multi_label_classification" else 3
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=labels,
                        extra={"problem_type": problem_type} if problem_type else {})
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "clf")
    ours = pipeline("text-classification", model=str(tmp_path / "clf"), top_k=None)
    theirs = transformers.pipeline("text-classification", model=str(tmp_path / "clf"), top_k=None)
    for got, expected in zip(ours(["a gem of a film"])[0], theirs(["a gem of a film"])[0]):
        assert got["label"] == expected["label"] and got["score"] == pytest.approx(expected["score"], abs=1e-5)


def shapes(result):
    """The nesting of a pipeline's result, labels and scores left out."""
    if isinstance(result, list):
        return [shapes(item) for item in result]
    return sorted(result) if isinstance(result, dict) else type(result).__name__


def test_a_language_model_starts_a_new_head_only_when_given_its_classes(tmp_path):
    from gpt2kit import GPT2LMHeadModel
    from gpt2kit.checkpoint import CheckpointError

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64))
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="no classification head .*pass num_labels= .* to start a new one"):
        GPT2ForSequenceClassification.from_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match="score.weight \\(3 classes\\) starts from random values"):
        model = GPT2ForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3)
    assert model.score.weight.shape == (3, 16) and 0 < model.score.weight.std() < 0.1
    assert torch.equal(model.transformer.wte.weight, lm.transformer.wte.weight)
    with pytest.warns(UserWarning, match="2 classes"):
        named = GPT2ForSequenceClassification.from_pretrained(tmp_path / "lm", id2label={0: "no", 1: "yes"})
    assert named.config.num_labels == 2 and named.config.id2label == {0: "no", 1: "yes"}

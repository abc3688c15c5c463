"""Classification metrics and perplexity against numbers worked out by hand in each test."""

import json
import math

import numpy as np
import pytest
import torch

from loraflow.evaluate.metrics import classification_metrics, confusion_matrix_png, joint_accuracy, perplexity

NAMES = ["flu", "cold", "covid"]
# 6 rows, 3 classes, no tied scores within a column
LABELS = [0, 0, 1, 1, 2, 2]
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # true 0, predicted 0
        [0.30, 0.60, 0.10],  # true 0, predicted 1
        [0.15, 0.80, 0.05],  # true 1, predicted 1
        [0.25, 0.50, 0.25],  # true 1, predicted 1
        [0.10, 0.20, 0.70],  # true 2, predicted 2
        [0.50, 0.20, 0.30],  # true 2, predicted 0
    ]
)


def test_three_classes_by_hand():
    m = classification_metrics(LABELS, PROBS, NAMES)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top_k_accuracy"] == {"1": pytest.approx(4 / 6)}  # k = 3 is not < K = 3
    # per class: TP / FP / FN = flu 1/1/1, cold 2/1/0, covid 1/0/1
    precision = {"flu": 1 / 2, "cold": 2 / 3, "covid": 1 / 1}
    recall = {"flu": 1 / 2, "cold": 2 / 2, "covid": 1 / 2}
    f1 = {c: 2 * precision[c] * recall[c] / (precision[c] + recall[c]) for c in NAMES}
    assert f1 == pytest.approx({"flu": 1 / 2, "cold": 4 / 5, "covid": 2 / 3})
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)  # 59/90
    assert m["micro_f1"] == pytest.approx(4 / 6)  # single-label: micro F1 is the accuracy
    for c in NAMES:
        assert m["per_class"][c]["precision"] == pytest.approx(precision[c])
        assert m["per_class"][c]["recall"] == pytest.approx(recall[c])
        assert m["per_class"][c]["f1-score"] == pytest.approx(f1[c])
        assert m["per_class"][c]["support"] == 2
    assert set(m["per_class"]) == set(NAMES)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # one-vs-rest AUC = fraction of (positive, negative) pairs ranked right, 2 x 4 pairs per class:
    # flu: 0.70 beats all 4, 0.30 beats 3 of (0.15, 0.25, 0.10, 0.50) -> 7/8
    # cold: 0.80 beats all 4, 0.50 beats 3 of (0.20, 0.60, 0.20, 0.20) -> 7/8
    # covid: 0.70 and 0.30 beat all of (0.10, 0.10, 0.05, 0.25) -> 8/8
    assert m["macro_auc"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)
    assert m["macro_auc_note"] is None
    json.dumps(m)  # plain Python values throughout


def test_torch_tensors_and_bfloat16_probabilities_give_the_same_numbers():
    ref = classification_metrics(LABELS, PROBS, NAMES)
    m = classification_metrics(torch.tensor(LABELS), torch.tensor(PROBS, dtype=torch.float32), NAMES)
    for key in ("accuracy", "macro_f1", "micro_f1", "macro_auc"):
        assert m[key] == pytest.approx(ref[key])
    assert m["confusion"] == ref["confusion"]
    half = torch.softmax(torch.log(torch.tensor(PROBS)).to(torch.bfloat16), dim=1)  # rows sum to 1 +- ~1e-3
    assert classification_metrics(LABELS, half, NAMES)["accuracy"] == pytest.approx(4 / 6)


def test_top_k_with_six_classes():
    names = [f"c{i}" for i in range(6)]
    base = [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]  # class 0 ranked first, ..., class 5 last
    probs = np.array([base] * 4)
    labels = [0, 1, 3, 5]  # the true class is ranked 1st, 2nd, 4th and 6th
    m = classification_metrics(labels, probs, names)
    assert m["top_k_accuracy"] == pytest.approx({"1": 1 / 4, "3": 2 / 4, "5": 3 / 4})
    four = classification_metrics([0, 1, 2, 3], np.array([[0.4, 0.3, 0.2, 0.1]] * 4), names[:4])
    assert four["top_k_accuracy"] == pytest.approx({"1": 1 / 4, "3": 3 / 4})


def test_binary_auc_by_hand():
    labels = [0, 0, 1, 1, 0]
    positive = np.array([0.10, 0.40, 0.35, 0.80, 0.20])
    m = classification_metrics(labels, np.stack([1 - positive, positive], axis=1), ["no", "yes"])
    # positives 0.35 and 0.80 against negatives 0.10, 0.40, 0.20: 2 + 3 of 6 pairs
    assert m["macro_auc"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(4 / 5)  # predicted [0, 0, 0, 1, 0]
    assert m["top_k_accuracy"] == {"1": pytest.approx(4 / 5)}


def test_missing_class_gives_no_auc_and_says_why():
    m = classification_metrics([0, 1, 1, 0], PROBS[:4], NAMES)  # no "covid" among the labels
    assert m["macro_auc"] is None
    assert "covid" in m["macro_auc_note"] and "undefined" in m["macro_auc_note"]
    assert m["accuracy"] == pytest.approx(3 / 4)  # predicted [0, 1, 1, 1]
    one = classification_metrics([1, 1], PROBS[2:4], NAMES)
    assert one["macro_auc"] is None and "only one class ('cold')" in one["macro_auc_note"]


@pytest.mark.parametrize(
    "labels, probs, names, message",
    [
        (LABELS, PROBS[:, 0], NAMES, r"probs must be 2-D"),
        (LABELS, PROBS, NAMES[:2], r"3 columns but class_names names 2 classes"),
        (LABELS[:5], PROBS, NAMES, r"6 rows but labels has 5 entries"),
        ([0, 0, 1, 1, 2, 3], PROBS, NAMES, r"class index 3, outside range\(0, 3\)"),
        ([0, -1, 1, 1, 2, 2], PROBS, NAMES, r"class index -1, outside range\(0, 3\)"),
        (["flu"] * 6, PROBS, NAMES, r"integer class indices"),
        ([], np.zeros((0, 3)), NAMES, r"labels is empty"),
        (LABELS, PROBS * 3, NAMES, r"apply softmax to the logits"),
        (LABELS, PROBS, ["a", "a", "b"], r"class_names must be distinct"),
    ],
)
def test_bad_inputs_name_the_problem(labels, probs, names, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probs, names)


def test_joint_accuracy_by_hand():
    labels = [[0, 1, 2, 1], [1, 1, 0, 0]]
    preds = [[0, 1, 1, 1], [1, 0, 0, 0]]  # head 0 right on rows 0, 1, 3; head 1 on rows 0, 2, 3
    assert joint_accuracy(labels, preds) == pytest.approx(2 / 4)
    assert joint_accuracy([[2, 2]], [[2, 2]]) == 1.0
    with pytest.raises(ValueError, match="head 1 has 3 labels"):
        joint_accuracy([[0, 1], [0, 1, 1]], [[0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="2 heads of labels but 1 heads of predictions"):
        joint_accuracy(labels, preds[:1])


def test_confusion_matrix_png_is_a_png_written_atomically(tmp_path):
    names = ["neoplasms", "digestive system diseases", "cardiovascular diseases"]
    target = tmp_path / "plots" / "confusion.png"
    out = confusion_matrix_png([0, 1, 2, 2], [0, 1, 1, 2], names, target, "dev set")
    assert out == target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["confusion.png"]  # no temporary file left
    with pytest.raises(ValueError, match="4 labels but 3 predictions"):
        confusion_matrix_png([0, 1, 2, 2], [0, 1, 1], names, target, "dev set")


def test_perplexity():
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(1e9, 1) == pytest.approx(math.exp(50))  # capped, not OverflowError
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        perplexity(float("nan"), 3)


def test_top_1_accuracy_is_the_accuracy_on_tied_rows():
    """Rows whose top probabilities tie (a half-precision softmax): before, scikit-learn's top-k
    broke the tie towards the higher class and the accuracy (argmax) towards the lower one."""
    probs = np.array([[0.4, 0.4, 0.2], [0.3, 0.35, 0.35], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    labels = [0, 1, 2, 0]  # each tie won by the lower index: all four right
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["accuracy"] == m["top_k_accuracy"]["1"] == 1.0
    labels = [1, 2, 2, 0]  # the higher index of each tie: the first two wrong
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["accuracy"] == m["top_k_accuracy"]["1"] == 0.5


def test_top_k_accuracy_ranks_ties_as_argmax_and_equals_scikit_learn_without_ties():
    from sklearn.metrics import top_k_accuracy_score

    from loraflow.evaluate.metrics import top_k_accuracy

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=200)
    labels = rng.integers(0, 6, size=200)
    for k in (1, 3, 5):
        assert top_k_accuracy(labels, probs, k) == pytest.approx(top_k_accuracy_score(labels, probs, k=k))
    tied = np.array([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0]])
    assert [top_k_accuracy(np.array([c]), tied, 3) for c in range(4)] == [1.0, 1.0, 1.0, 0.0]

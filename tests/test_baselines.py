"""Baseline scores (perplexity, LN-entropy, ROUGE-L lexical similarity) against hand computations,
and the EigenScore `evaluate` metric module."""

import math
import os

import numpy as np
import pytest

from neurodetox.metrics import eigenscore, length_normalized_entropy, lexical_similarity, perplexity, rouge_l
from neurodetox.metrics.baselines import HALLUCINATION_DIRECTION


def test_perplexity_by_hand():
    lp = [math.log(0.5), math.log(0.25), math.log(1.0)]
    # exp(-(ln .5 + ln .25 + 0)/3) = (0.5 * 0.25) ** (-1/3) = 8 ** (1/3) = 2
    assert perplexity(lp) == pytest.approx(2.0)
    assert perplexity([0.0]) == pytest.approx(1.0)
    assert perplexity([math.log(0.1)] * 4) == pytest.approx(10.0)


def test_ln_entropy_by_hand():
    s1 = [math.log(0.5), math.log(0.5)]  # mean NLL ln 2
    s2 = [math.log(0.1)]  # ln 10
    s3 = [math.log(0.2), math.log(0.5), math.log(1.0)]  # (ln 5 + ln 2 + 0)/3 = ln(10)/3
    expected = (math.log(2) + math.log(10) + math.log(10) / 3) / 3
    assert length_normalized_entropy([s1, s2, s3]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "a,b,expected",
    [
        # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/5, R = 5/6 -> F = 10/11
        ("the cat sat on the mat", "the cat on the mat", 10 / 11),
        ("Paris", "paris.", 1.0),  # lowercased, punctuation dropped by rouge-score's tokenizer
        ("Paris", "Berlin", 0.0),
        # LCS("a b c d", "d c b a") = 1 -> P = R = 1/4
        ("a b c d", "d c b a", 0.25),
        ("", "", 1.0),
        ("", "Paris", 0.0),
    ],
)
def test_rouge_l_known_strings(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected)
    assert rouge_l(b, a) == pytest.approx(expected)  # F-measure is symmetric


def test_lexical_similarity_is_mean_pairwise():
    samples = ["the cat sat on the mat", "the cat on the mat", "Paris"]
    expected = (10 / 11 + 0.0 + 0.0) / 3
    assert lexical_similarity(samples) == pytest.approx(expected)
    assert lexical_similarity(["Paris", "Paris", "Paris"]) == pytest.approx(1.0)
    assert lexical_similarity(["a", "b"], similarity=lambda x, y: 0.5) == pytest.approx(0.5)


def test_directions_declared():
    assert HALLUCINATION_DIRECTION["lexical_similarity"] == -1
    assert all(HALLUCINATION_DIRECTION[k] == 1 for k in ("eigenscore", "perplexity", "ln_entropy", "length"))


@pytest.mark.parametrize(
    "fn,arg,match",
    [
        (perplexity, [], "no token"),
        (perplexity, [0.5], "<= 0"),
        (perplexity, [float("nan")], "NaN"),
        (length_normalized_entropy, [], "at least one"),
        (length_normalized_entropy, [[-1.0], []], "sample 1"),
        (lexical_similarity, ["only one"], "at least 2"),
    ],
)
def test_bad_inputs(fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(arg)
    with pytest.raises(TypeError):
        rouge_l("a", None)


def test_evaluate_metric_module_offline():
    import evaluate

    from neurodetox.metrics.eigenscore_metric import METRIC_PATH

    metric = evaluate.load(METRIC_PATH)
    z = np.random.default_rng(0).normal(size=(3, 5, 16))
    out = metric.compute(embeddings=list(z))
    np.testing.assert_allclose(out["eigenscores"], eigenscore(z).numpy(), rtol=1e-10)
    assert out["eigenscore"] == pytest.approx(float(eigenscore(z).mean()))
    kpm = evaluate.load(os.path.join(METRIC_PATH, "eigenscore_metric.py")).compute(embeddings=list(z), method="kpm")
    np.testing.assert_allclose(kpm["eigenscores"], eigenscore(z).numpy(), atol=0.01)
    with pytest.raises(ValueError, match="K=1"):
        metric.compute(embeddings=[np.zeros((1, 4))])

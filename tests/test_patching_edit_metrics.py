"""Tests for ``neurodetox.patching.edit_metrics``: specificity bookkeeping and batched next-token predictions."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from conftest import make_tokenizer
from patching_helpers import REFERENCE, make_model, next_tokens_one_by_one, one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def test_compare_splits_changed_unrelated_answers_by_correctness():
    from neurodetox.patching.edit_metrics import compare

    unrelated = [{"prompt": f"q{i}", "aliases": [a]} for i, a in enumerate(["paris", "rome", "tokyo", "berlin", "yen"])]
    state = lambda answers, nxt: {
        "teacher_forced": [],
        "edit_answers": [],
        "paraphrase_answers": [],
        "unrelated_answers": answers,
        "unrelated_next": nxt,
        "perplexity": float("nan"),
    }
    before = state([" Paris.", " Rome.", " Kyoto.", " Madrid.", " Euro."], [1, 2, 3, 4, 5])
    after = state([" Paris.", " Milan.", " Osaka.", " Berlin.", " Euro."], [1, 9, 9, 9, 5])
    res = compare(before, after, [], unrelated)
    # q1 right->wrong, q2 wrong->wrong, q3 wrong->right; q0 and q4 unchanged
    assert res["specificity"] == pytest.approx(2 / 5)
    assert res["known_facts"] == 2 and res["known_facts_kept"] == pytest.approx(1 / 2)
    assert res["changes"] == {"right_to_wrong": 1, "wrong_to_right": 1, "wrong_to_wrong": 1, "right_to_right": 0}
    plain = compare(before, after, [], [u["prompt"] for u in unrelated])  # prompts only: no breakdown
    assert "known_facts_kept" not in plain and plain["specificity"] == res["specificity"]


def test_next_token_predictions_equal_unbatched_forwards():
    """Left-padded batches of mixed lengths (batch smaller than the prompt list) give each prompt's own argmax."""
    from neurodetox.patching.edit_metrics import next_token_predictions

    tok = make_tokenizer()
    model = make_model()
    got = next_token_predictions(model, tok, REFERENCE, batch_size=5)
    assert got == next_tokens_one_by_one(model, tok, REFERENCE)
    assert len(set(len(tok(p)["input_ids"]) for p in REFERENCE)) > 1  # padding really happens
    assert len(set(got)) > 1  # not one constant prediction

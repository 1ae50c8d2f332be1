"""Paraphrase-aware repair (docs/methods.md §8; issue 18 item 1) and the bad-input checks of edits.

MINT (Gu et al., arXiv 2312.05356) repairs each edit's ``paraphrases`` together with its prompt: an
edit counts as fixed only when every phrasing is (checked here with independent teacher-forced
forwards), and generalisation is measured on ``eval_paraphrases`` only.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import make_tokenizer
from patching_helpers import make_model, one_thread

from neurodetox.core.errors import UserError
from neurodetox.patching import MintSettings, coerce_edits, encode_edit, repair, teacher_forced_argmax
from neurodetox.patching.edit_metrics import compare
from neurodetox.patching.mint.repairer import combine_gaps
from neurodetox.patching.pools import read_edits


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def _write(tmp_path, rows):
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = {"prompt": "the capital of france is", "target": "paris", "paraphrases": ["france capital is"]}


def test_paraphrase_identical_to_prompt_names_the_line(tmp_path):
    path = _write(
        tmp_path,
        [
            GOOD,
            {
                **GOOD,
                "prompt": "the capital of spain is",
                "target": "madrid",
                "paraphrases": ["The  capital of SPAIN is"],
            },
        ],
    )
    with pytest.raises(UserError, match=r"edits\.jsonl:2: paraphrase 1 .* is the prompt itself"):
        coerce_edits(read_edits(path))


def test_paraphrase_that_already_answers_names_the_line(tmp_path):
    path = _write(tmp_path, [{**GOOD, "paraphrases": ["france capital is", "the capital of france is paris"]}])
    with pytest.raises(UserError, match=r"edits\.jsonl:1: paraphrase 2 .* already ends with the target 'paris'"):
        coerce_edits(read_edits(path))


def test_same_prompt_two_targets_names_both_lines(tmp_path):
    path = _write(
        tmp_path,
        [
            GOOD,
            {"prompt": "spain is located in", "target": "europe"},
            {"prompt": "the capital of france is", "target": "rome"},
        ],
    )
    with pytest.raises(UserError, match=r"edits\.jsonl:3: .* also the prompt of .*edits\.jsonl:1 with another target"):
        coerce_edits(read_edits(path))


def test_same_prompt_same_target_is_accepted_and_eval_paraphrase_must_be_unseen(tmp_path):
    assert len(coerce_edits([GOOD, dict(GOOD)])) == 2
    path = _write(tmp_path, [{**GOOD, "eval_paraphrases": ["france capital is"]}])
    with pytest.raises(UserError, match=r"edits\.jsonl:1: eval_paraphrase 1 .* unseen"):
        coerce_edits(read_edits(path))


def test_combine_gaps_takes_the_worst_phrasing():
    g, a = combine_gaps(
        [torch.tensor([-0.5, 0.2, -0.3]), torch.tensor([-0.1, -0.4, 0.6])],
        [torch.tensor([7, 3, 7]), torch.tensor([7, 7, 2])],
    )
    assert g.tolist() == pytest.approx([-0.1, 0.2, 0.6])
    assert a.tolist() == [7, 3, 2]


def _all_phrasings_fixed(model, edit) -> list[bool]:
    return [
        bool(torch.equal(teacher_forced_argmax(model, v.prompt_ids, v.target_ids), torch.tensor(v.target_ids)))
        for v in edit.variants
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_means_every_phrasing_is_fixed(seed):
    tok = make_tokenizer()
    model = make_model(seed=seed)
    rows = [
        {
            "prompt": "the capital of france is",
            "target": "paris",
            "paraphrases": ["france capital is", "capital of france :"],
        },
        {"prompt": "the capital of japan is", "target": "tokyo", "paraphrases": ["japan capital is"]},
    ]
    edits = [encode_edit(tok, e) for e in coerce_edits(rows)]
    settings = MintSettings(layers="second_half", use_paraphrases=True, selectivity=False, guard=False)
    patch, report = repair(model, tok, rows, settings, show_progress=False)
    patch.apply(model)
    checked = 0
    for r, e in zip(report.edits, edits):
        if r.status == "fixed":
            assert all(_all_phrasings_fixed(model, e)), (seed, e.prompt)
            checked += 1
    patch.revert(model)
    assert any(r.status != "nothing_to_fix" for r in report.edits)
    # without paraphrases only the prompt is promised
    p2, r2 = repair(
        model,
        tok,
        rows,
        MintSettings(layers="second_half", use_paraphrases=False, selectivity=False, guard=False),
        show_progress=False,
    )
    p2.apply(model)
    for r, e in zip(r2.edits, edits):
        if r.status == "fixed":
            assert _all_phrasings_fixed(model, e)[0]
    p2.revert(model)
    if seed == 0:
        assert checked >= 1, report.to_json()


def test_generalisation_is_measured_on_eval_paraphrases_only():
    edits = coerce_edits([{**GOOD, "eval_paraphrases": ["capital of france :", "q : capital of france ?"]}])
    state = {
        "teacher_forced": [True],
        "edit_answers": ["paris"],
        "paraphrase_answers": [["paris", "rome"]],
        "seen_paraphrase_answers": [["madrid"]],
        "unrelated_answers": [],
        "unrelated_next": [],
        "perplexity": float("nan"),
    }
    before = {**state, "paraphrase_answers": [["rome", "rome"]]}
    out = compare(before, state, edits, [])
    assert out["generalisation"] == 0.5 and out["paraphrases"] == 2
    assert out["generalisation_before"] == 0.0
    assert out["seen_paraphrases_correct"] == 0.0 and out["seen_paraphrases"] == 1
    assert out["success_all_phrasings"] == 0.0


def test_edit_reference_prompts_come_from_the_model_and_the_edits(monkeypatch):
    """Same relation with subjects the model names, other relations with them, the model's own text; never
    an edit's prompt or paraphrase. The model's continuations are stubbed so the expected prompts are known."""
    from types import SimpleNamespace

    import neurodetox.metrics.sampling as sampling
    from neurodetox.patching import pools

    def fake_generate(model, tok, prompts, max_new_tokens, stop):
        if prompts[0].endswith(","):  # the subject lists
            return SimpleNamespace(answers=[" Lyon, Nice, Paris, and Porto" for _ in prompts])
        return SimpleNamespace(answers=[f" words {i} of the model's own text here" for i, _ in enumerate(prompts)])

    monkeypatch.setattr(sampling, "greedy_generate", fake_generate)
    edits = [
        {"prompt": "Paris is a city in the country of", "target": "France", "subject": "Paris"},
        {
            "prompt": "Osaka is a city in the country of",
            "target": "Japan",
            "subject": "Osaka",
            "paraphrases": ["Lyon is a city in the country of"],
        },
    ]
    got = pools.edit_reference_prompts(None, None, edits, n_same=3, n_other=4, n_general=2)
    # other subjects: the list items that are not edit subjects (Lyon is one, but its prompt is a paraphrase)
    assert got[:2] == ["Nice is a city in the country of", "Porto is a city in the country of"]
    assert got[2:6] == ["Lyon is known for", "Nice is known for", "Porto is known for", "The name Lyon means"]
    assert got[6:] == ["The words 0 of", "The words 0 of the model's own"]
    assert not {e["prompt"] for e in edits} & set(got)
    with pytest.raises(UserError, match="unknown part"):
        pools.reference_prompts("edits+wiki")
    with pytest.raises(UserError, match="needs the model"):
        pools.reference_prompts("edits")

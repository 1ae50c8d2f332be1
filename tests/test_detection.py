"""AUROC / bootstrap intervals against sklearn, score_probes on a tiny model, and `neurodetox eval`."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import neurodetox.metrics.probes as evaluation
from neurodetox.cli.eval import cmd_eval, select_probes
from neurodetox.metrics import (
    auroc,
    bootstrap_auroc,
    detection_summary,
    eigenscore,
    length_normalized_entropy,
    lexical_similarity,
    paired_auroc_difference,
    perplexity,
)
from neurodetox.metrics.probes import EigenScoreSettings, score_probes
from neurodetox.metrics.sampling import greedy_answers, sample_answers


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_auroc_matches_sklearn_and_known_cases():
    rng = np.random.default_rng(0)
    s = rng.normal(size=200)
    y = rng.random(200) < 0.3
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert auroc(s, y, direction=-1) == pytest.approx(roc_auc_score(y, -s))
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auroc([5, 5, 5, 5], [True, False, True, False]) == 0.5  # ties count one half
    # Mann-Whitney by hand: pairs (hallucinated, correct) ranked right + half the ties
    s2, y2 = [0.1, 0.4, 0.35, 0.8, 0.4], [False, False, True, True, True]
    pos = [a for a, t in zip(s2, y2) if t]
    neg = [a for a, t in zip(s2, y2) if not t]
    u = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(s2, y2) == pytest.approx(u)


def test_bootstrap_matches_a_direct_reimplementation():
    rng = np.random.default_rng(1)
    s = rng.normal(size=60)
    y = rng.random(60) < 0.5
    point, lo, hi = bootstrap_auroc(s, y, n_boot=100, seed=7)
    r = np.random.default_rng(7)
    stats = []
    while len(stats) < 100:
        idx = r.integers(0, 60, size=60)
        if y[idx].all() or not y[idx].any():
            continue
        stats.append(roc_auc_score(y[idx], s[idx]))
    assert point == pytest.approx(roc_auc_score(y, s))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])))
    assert lo <= point <= hi
    # perfect separation: every resample is perfect
    assert bootstrap_auroc([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1], n_boot=50) == (1.0, 1.0, 1.0)


def test_paired_difference_and_summary():
    rng = np.random.default_rng(2)
    y = rng.random(150) < 0.4
    good = y + rng.normal(scale=0.5, size=150)
    bad = rng.normal(size=150)
    d, lo, hi = paired_auroc_difference(good, bad, y, n_boot=100)
    assert d == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, bad))
    assert lo > 0  # clearly better
    d0, lo0, hi0 = paired_auroc_difference(good, good, y, n_boot=50)
    assert (d0, lo0, hi0) == (0.0, 0.0, 0.0)
    vals = good.copy()
    vals[:5] = np.nan
    summ = detection_summary(
        {"eigenscore": vals, "lexical_similarity": -good, "const": np.ones(150)}, correct=~y, n_boot=100
    )
    assert summ["eigenscore"]["n"] == 145
    assert summ["eigenscore"]["auroc"] == pytest.approx(roc_auc_score(y[5:], good[5:]))
    assert summ["lexical_similarity"]["direction"] == -1
    assert summ["lexical_similarity"]["auroc"] == pytest.approx(roc_auc_score(y, good))
    assert summ["const"]["auroc"] == 0.5
    one_class = detection_summary({"eigenscore": good}, correct=np.ones(150, bool), n_boot=10)
    assert math.isnan(one_class["eigenscore"]["auroc"]) and "both" in one_class["eigenscore"]["note"]


@pytest.mark.parametrize(
    "args,match",
    [
        (([], []), "no scores"),
        (([1.0, 2.0], [True]), "differ in length"),
        (([1.0, float("nan")], [True, False]), "NaN"),
        (([1.0, 2.0], [True, True]), "both"),
    ],
)
def test_auroc_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        auroc(*args)


def test_select_probes_stratified():
    recs = [{"relation": r, "i": i} for r in ("a", "b", "c") for i in range(10)] + [{"relation": "d", "i": 0}]
    sel = select_probes(recs, 10, seed=0)
    counts = {r: sum(x["relation"] == r for x in sel) for r in "abcd"}
    assert counts == {"a": 3, "b": 3, "c": 2, "d": 1} or sum(counts.values()) == 10
    assert min(counts.values()) >= 1 and max(counts.values()) - min(counts.values()) <= 2
    assert select_probes(recs, 10, seed=0) == sel  # deterministic
    assert select_probes(recs, None) == recs


# ----------------------------------------------------------------------------- score_probes on a tiny model

PROMPTS = [
    "the capital of france is",
    "the capital of italy is",
    "japan is located in",
    "the currency of spain is",
    "germany is located in",
    "the capital of japan is",
]


@pytest.fixture
def tiny(tiny_llama, tiny_tokenizer):
    return tiny_llama, tiny_tokenizer


def test_score_probes_every_score(tiny):
    model, tok = tiny
    greedy = greedy_answers(model, tok, PROMPTS, max_new_tokens=4)
    aliases = [[g.strip()] if i % 2 == 0 and g.strip() else ["zzz-never"] for i, g in enumerate(greedy)]
    s = EigenScoreSettings(k=4, max_new_tokens=4, batch_size=4, seed=3, clip_bank_size=100)
    res = score_probes(model, tok, PROMPTS, aliases, s, relations=["r"] * 6, n_boot=50)
    correct = [r["correct"] for r in res.records]
    assert correct == [bool(a[0] != "zzz-never") for a in aliases]
    assert res.factual_accuracy == pytest.approx(sum(correct) / 6)
    ref = sample_answers(model, tok, PROMPTS, k=4, max_new_tokens=4, batch_size=4, seed=3, return_logprobs=True)
    es = eigenscore(ref.embeddings).numpy()
    for i, r in enumerate(res.records):
        assert r["greedy"] == greedy[i] and r["relation"] == "r" and r["samples"] == ref.samples[i]
        assert r["eigenscore"] == pytest.approx(es[i], rel=1e-9)
        assert abs(r["eigenscore_ees"] - es[i]) <= 0.01
        assert r["perplexity"] == pytest.approx(perplexity(ref.greedy_logprobs[i]))
        assert r["ln_entropy"] == pytest.approx(length_normalized_entropy(ref.sample_logprobs[i]))
        assert r["lexical_similarity"] == pytest.approx(lexical_similarity(ref.samples[i]))
        assert r["length"] == ref.greedy_lengths[i]
        assert r["eigenscore_clipped"] is not None
    assert set(res.summary) == set(evaluation.UNSUPERVISED_SCORES)  # no labelled probes: no hidden-state probe
    for name, e in res.summary.items():
        assert 0 <= e["auroc"] <= 1 and e["ci_low"] <= e["auroc"] <= e["ci_high"], name
    assert res.info["clipping"]["tokens_pushed"] > 0


def test_nan_rows_are_skipped_with_a_warning_naming_them(tiny, monkeypatch):
    model, tok = tiny
    real = evaluation.sample_answers

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        out.embeddings[1, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(evaluation, "sample_answers", poisoned)
    s = EigenScoreSettings(k=2, max_new_tokens=3, batch_size=4)
    with pytest.warns(UserWarning, match=r"skipped 1 prompt\(s\) with NaN/inf embeddings: 1 \('the capital of italy"):
        res = score_probes(model, tok, PROMPTS, [["paris"]] * 6, s, clipped=False, n_boot=10)
    assert res.records[1]["eigenscore"] is None and res.records[1]["eigenscore_ees"] is None
    assert res.records[0]["eigenscore"] is not None
    assert res.summary["eigenscore"]["n"] == 5


@pytest.mark.parametrize(
    "kwargs,prompts,match",
    [
        ({}, [], "empty probe set"),
        (dict(k=1), PROMPTS, "k must be"),
        (dict(alpha=0.0), PROMPTS, "alpha"),
        (dict(alpha=-1.0), PROMPTS, "alpha"),
        (dict(layer=9), PROMPTS, "out of range"),
        (dict(pooling="max"), PROMPTS, "pooling"),
        ({}, [" ".join(["paris"] * 130)], r"prompt 0 is 130 tokens long.*context is 128"),
    ],
)
def test_score_probes_bad_input(tiny, kwargs, prompts, match):
    model, tok = tiny
    with pytest.raises(ValueError, match=match):  # a bad setting fails when the settings are built
        s = EigenScoreSettings(max_new_tokens=3, **kwargs)
        score_probes(model, tok, prompts, [["paris"]] * len(prompts), s, n_boot=10)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--k", "1"], "k must be"),
        (["--alpha", "0"], "alpha"),
        (["--max-probes", "0"], "max_probes must be an integer >= 1"),
        (["--data", "/nonexistent/facts.jsonl"], "not found"),
        (["--pooling", "mean", "--clip-percentile", "60", "--k", "1"], "k must be"),
        (["--stop", "a||b"], "empty stop string"),
        (["--prompt_format", "md"], "prompt_format must be one of raw, qa1shot, chat"),
        (["--split", "dev"], "split must be one of"),
        (["--probe_min_labelled", "1000"], "needs at least 1000 labelled probes disjoint from the scored ones and has"),
        (["--no-such-flag", "1"], "unknown field(s): 'no-such-flag'"),
    ],
)
def test_cli_errors_before_loading_a_model(argv, match, capsys, tmp_path):
    # a model that cannot load: every error here must come first
    assert cmd_eval([*argv, "--model", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_cli_refuses_an_existing_result_before_scoring(tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    assert cmd_eval(["--model", str(tmp_path / "no-model"), "--output_dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == "{}"
    assert cmd_eval(["--model", str(tmp_path / "no-model"), "--out", str(out), "--overwrite"]) == 2
    assert "already exists" not in capsys.readouterr().err  # got past the check, failed at the model


def test_cli_end_to_end_tiny_model(tiny_model_dir, tmp_path, capsys):
    """The whole command on a tiny model folder and a user fact file: every detector, the probe
    trained on the file's other splits, the report with a --compare run."""
    facts = tmp_path / "facts.jsonl"
    words = ["paris", "rome", "berlin", "madrid", "tokyo", "europe", "asia", "euro", "yen"]
    rows = []
    for i in range(60):
        prompt = f"the capital of {['france', 'italy', 'spain', 'japan'][i % 4]} is" + " a" * (i // 4)
        answer = words[i % len(words)]
        rel = ["capital_of", "continent_of"][i % 2]
        rows.append(dict(prompt=prompt, answer=answer, aliases=[answer], relation=rel, statement=f"{prompt} {answer}."))
    facts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--model", tiny_model_dir, "--data", str(facts), "--k", "3", "--max_new_tokens", "4", "--bootstrap", "20"]
    common += ["--no_progress", "--probe_min_labelled", "4", "--batch_size", "8", "--no_clip"]
    assert cmd_eval([*common, "--stop", "none", "--out", str(tmp_path / "none")]) == 0
    rep = tmp_path / "detection.md"
    rc = cmd_eval(
        [*common, "--out", str(tmp_path / "ev"), "--report", str(rep), "--compare", str(tmp_path / "none/eval.json")]
    )
    assert rc == 0
    data = json.loads((tmp_path / "ev/eval.json").read_text())
    assert data["settings"]["stop"] == "inside" and data["n_probes"] == 6
    assert "train and tracking splits" in data["probe_source"]
    assert data["info"]["hidden_probe"]["n_train"] == 54
    assert set(data["summary"]) == set(evaluation.SCORE_NAMES) - {"eigenscore_clipped"}
    text = rep.read_text()
    for needle in ("Hidden-state probe", "Semantic entropy", "## Cost of each detector", "stop `none`", "--stop none"):
        assert needle in text, needle
    # the page again from the two eval.json files alone: no model, no scoring, the same tables
    again = tmp_path / "again.md"
    argv = ["--report_from", str(tmp_path / "ev/eval.json"), "--compare", str(tmp_path / "none/eval.json")]
    assert cmd_eval([*argv, "--report", str(again), "--model", str(tmp_path / "no-model")]) == 0
    assert again.read_text().split("## Setup")[1] == text.split("## Setup")[1].replace(
        f"ROC curves: `{tmp_path / 'ev' / 'roc.png'}` (written by the same command; not committed).\n\n", ""
    )
    assert cmd_eval(argv) == 2 and "--report_from needs --report" in capsys.readouterr().err


@pytest.mark.real_model
def test_cli_end_to_end_real_model(tmp_path, capsys):
    from neurodetox.cli.main import main

    out = tmp_path / "ev"
    rep = tmp_path / "detection.md"
    rc = main(
        [
            "eval",
            "--model",
            "smollm2-135m-instruct",
            "--data",
            "facts",
            "--split",
            "all",
            "--max_probes",
            "6",
            "--k",
            "3",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
            "--bootstrap",
            "50",
            "--no-progress",
            "--report",
            str(rep),
            "--probe_max_train",
            "40",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "AUROC" in text and "EigenScore (exact)" in text
    data = json.loads((out / "eval.json").read_text())
    assert data["n_probes"] == 6 and len(data["records"]) == 6
    assert {r["relation"] for r in data["records"]} == {"capital_of", "continent_of", "currency_of"}
    for r in data["records"]:
        for key in ("prompt", "greedy", "correct", *evaluation.SCORE_NAMES):
            assert key in r
        assert r["eigenscore"] is not None and abs(r["eigenscore_ees"] - r["eigenscore"]) <= 0.01
    assert set(data["summary"]) == set(evaluation.SCORE_NAMES)
    assert (out / "roc.png").stat().st_size > 1000 or data["factual_accuracy"] in (0.0, 1.0)
    assert "neurodetox eval --model smollm2-135m-instruct" in rep.read_text()
    # a layer out of range is a clear error after loading the model
    argv = ["eval", "--max-probes", "2", "--k", "2", "--layer", "40", "--out", str(out), "--overwrite"]
    assert main([*argv, "--no-progress", "--no_hidden_probe"]) == 2
    assert "out of range" in capsys.readouterr().err

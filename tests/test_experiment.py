"""The SeND study (`neurodetox experiment`): intervals, paired differences, planning errors, a whole tiny study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from neurodetox.cli.main import main
from neurodetox.experiment import interval, paired_difference, plan_study, verdict
from neurodetox.experiment.measure import statement_embeddings

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-facts-send.yaml"
T_975_DF2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom (tables)


def test_interval_matches_hand_computed_t_interval():
    v = [0.30, 0.36, 0.33]
    iv = interval(v)
    sd = np.std(v, ddof=1)
    assert iv["n"] == 3
    assert iv["mean"] == pytest.approx(np.mean(v))
    assert iv["low"] == pytest.approx(np.mean(v) - T_975_DF2 * sd / math.sqrt(3))
    assert iv["high"] == pytest.approx(np.mean(v) + T_975_DF2 * sd / math.sqrt(3))
    one = interval([0.5, float("nan")])
    assert one["n"] == 1 and math.isnan(one["low"])


def _res(arm, seed, acc):
    return {"arm": arm, "seed": seed, "metrics": {"test_accuracy": acc}}


def test_paired_difference_pairs_by_seed_and_verdicts():
    results = [
        _res("send", 0, 0.50),
        _res("send", 1, 0.60),
        _res("send", 2, 0.55),
        _res("off", 2, 0.50),
        _res("off", 0, 0.40),
        _res("off", 1, 0.52),
    ]
    d = paired_difference(results, "send", "off", "test_accuracy")
    diffs = [0.10, 0.08, 0.05]  # seeds 0, 1, 2 paired, whatever the order of results
    assert d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(np.mean(diffs))
    assert d["low"] == pytest.approx(np.mean(diffs) - T_975_DF2 * np.std(diffs, ddof=1) / math.sqrt(3))
    assert verdict(d, +1) == "better" and verdict(d, -1) == "worse"
    noisy = paired_difference(
        results + [_res("random", s, a) for s, a in [(0, 0.6), (1, 0.4), (2, 0.55)]], "random", "off", "test_accuracy"
    )
    assert verdict(noisy, +1) == "no clear difference"
    assert verdict(paired_difference(results[:1] + results[4:5], "send", "off", "test_accuracy"), +1).startswith(
        "one seed"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seeds=[]), "at least one seed"),
        (dict(seeds=[0, 0]), "duplicate seeds"),
        (dict(arms=["send", "dropout"]), "unknown arm"),
        (dict(variants=["drop0.4"]), "unknown variant"),
        (dict(variants=["x:send_drop_fraction"]), "field=value"),
        (dict(fields=["send_dropfraction=0.3"]), "did you mean send_drop_fraction"),
        (dict(fields=["send_drop_fraction=1.5"]), "send_drop_fraction"),
        (dict(paraphrase_probes=0), "paraphrase_probes"),
    ],
)
def test_bad_plans_fail_before_any_training(tmp_path, kwargs, message):
    args = dict(seeds=[0, 1]) | kwargs
    seeds = args.pop("seeds")
    with pytest.raises(ValueError, match=message):
        plan_study(str(RECIPE), seeds, tmp_path, **args)
    assert not (tmp_path / "runs").exists()


def test_variant_arms_carry_their_fields(tmp_path):
    plan = plan_study(str(RECIPE), [0, 1], tmp_path, variants=["drop0.3", "w10:send_window_steps=10"])
    names = [a.name for a in plan.arms]
    assert names == ["send", "random", "off", "send@drop0.3", "send@w10"]
    f = plan.train_fields(plan.arms[3], 1)
    assert f["send_drop_fraction"] == "0.3" and f["send_mode"] == "send" and f["seed"] == "1"
    assert plan.train_fields(plan.arms[4], 0)["send_window_steps"] == "10"
    assert "send_drop_fraction" not in plan.train_fields(plan.arms[0], 0)


def test_statement_embeddings_equal_hidden_state_reference(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), layers=4).eval()
    texts = ["The capital of Peru is Lima.", "Kenya is in Africa.", "The currency of Japan is the yen."]
    got = statement_embeddings(model, tiny_tokenizer, texts, "residual", "penultimate", batch_size=2)
    rows = []
    for t in texts:  # one text at a time: no padding at all
        ids = tiny_tokenizer(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[3][0].numpy()  # output of block 2
        rows.append(0.5 * (h.mean(0) + h[-1]))
    np.testing.assert_allclose(got.numpy(), np.stack(rows), rtol=1e-4, atol=1e-5)


def test_whole_tiny_study_writes_page_and_reuses_complete_runs(tiny_model_dir, tmp_path, capsys):
    out, page = tmp_path / "study", tmp_path / "docs" / "send.md"
    argv = [
        "experiment",
        "--config",
        str(RECIPE),
        "--model",
        tiny_model_dir,
        "--seeds",
        "0,1",
        "--arms",
        "send,off",
        "--out",
        str(out),
        "--report",
        str(page),
        "--paraphrase-probes",
        "4",
        "--bootstrap",
        "50",
        "--no-progress",
    ]
    for s in [
        "max_facts_per_relation=12",
        "max_steps=6",
        "send_window_steps=2",
        "eval_steps=3",
        "logging_steps=2",
        "max_test_probes=3",
        "eigenscore_k=3",
        "eigenscore_num_prompts=2",
        "eigenscore_max_new_tokens=3",
        "per_device_train_batch_size=4",
        "disable_tqdm=true",
    ]:
        argv += ["--set", s]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    results = study["results"]
    assert math.isfinite(study["base"]["metrics"]["test_eigenscore"])  # the untrained model, measured once
    assert study["base"]["details"]["test"]["n"] == results[0]["details"]["test"]["n"]
    assert sorted((r["arm"], r["seed"]) for r in results) == [("off", 0), ("off", 1), ("send", 0), ("send", 1)]
    for r in results:
        m = r["metrics"]
        assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["paraphrase_accuracy"] <= 1.0
        assert math.isfinite(m["test_eigenscore"]) and math.isfinite(m["reference_perplexity"])
        assert math.isfinite(m["test_ees"]) and m["train_seconds"] > 0
        assert r["details"]["paraphrase"]["n"] == 4
        assert r["curves"]["loss"], "training-loss curve missing"
        assert not (out / "runs" / r["arm"] / f"seed-{r['seed']}" / "train" / "final").exists()
    send0 = next(r for r in results if r["arm"] == "send" and r["seed"] == 0)
    assert send0["sensitive_neurons"], "the send arm never selected neurons"
    assert next(r for r in results if r["arm"] == "off")["sensitive_neurons"] == []
    text = page.read_text()
    for needle in (
        "## Per arm",
        "base (untrained)",
        "send − off",
        "## Training curves",
        "Regenerate: `neurodetox experiment",
    ):
        assert needle in text
    for stem in ("loss", "eigenscore", "accuracy"):
        assert (page.parent / "send" / f"{stem}.png").stat().st_size > 1000
    # a rerun reuses the four complete runs: result files untouched
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    assert len(stamps) == 4
    assert main(argv) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}


def test_quick_mode_plan_and_user_overrides_win(tmp_path):
    from neurodetox.cli.experiment import QUICK_FIELDS, parse_args, plan_from_args

    a = parse_args(["--quick", "--seeds", "3,4", "--variants", "drop0.3"])
    plan = plan_from_args(a)
    assert plan.seeds == [3] and [x.name for x in plan.arms] == ["send", "random", "off"]
    assert str(plan.out) == "runs/study-quick"  # never replaces runs of the full study in runs/study
    assert plan.paraphrase_probes == 40
    assert all(plan.fields[k] == v for k, v in QUICK_FIELDS.items())
    a = parse_args(["--quick", "--set", "max_steps=80", "--out", str(tmp_path)])
    assert plan_from_args(a).train_fields(plan.arms[0], 0)["max_steps"] == "80"
    full = plan_from_args(parse_args([]))
    assert full.seeds == [0, 1, 2] and str(full.out) == "runs/study" and "max_steps" not in full.fields


def test_bad_seeds_message(capsys):
    assert main(["experiment", "--seeds", "0,one"]) == 2
    assert "--seeds must be a comma list of integers, got '0,one'" in capsys.readouterr().err


# --- issue 17: variant arms, the known-facts arm, the selection split, the mechanism figures -----------------


def test_issue17_variant_arms_and_the_known_arm(tmp_path):
    from neurodetox.experiment.runs import VARIANTS

    plan = plan_study(
        str(RECIPE),
        [0],
        tmp_path,
        arms=["send", "off"],
        variants=["normalized", "nomassive", "released", "mlp-second-half", "known"],
    )
    names = [a.name for a in plan.arms]
    assert names == [
        "send",
        "off",
        "send@normalized",
        "send@nomassive",
        "send@released",
        "send@mlp-second-half",
        "off@known",  # a data choice: runs with SeND off whatever variant_modes says
    ]
    f = plan.train_fields(plan.arms[-1], 0)
    assert f["send_mode"] == "off" and f["known_facts_file"] == str(tmp_path / "triage.json")
    assert plan.needs_triage() and plan.triage_path == tmp_path / "triage.json"
    assert plan.train_fields(plan.arms[3], 0)["send_massive_factor"] == VARIANTS["nomassive"]["send_massive_factor"]
    assert plan.train_fields(plan.arms[4], 0)["send_procedure"] == "released"
    assert plan.train_fields(plan.arms[5], 0)["send_layers"] == "second_half"
    assert not plan_study(str(RECIPE), [0], tmp_path, variants=["normalized"]).needs_triage()
    with pytest.raises(ValueError, match="probe_split 'dev' is invalid"):
        plan_study(str(RECIPE), [0], tmp_path, probe_split="dev")


def test_tracking_probe_split_scores_the_tracking_facts():
    from neurodetox.data import load_facts
    from neurodetox.experiment.measure import _probe_sets

    ds = load_facts("facts", seed=0, max_facts_per_relation=12)
    sets = _probe_sets(ds, 4, split="tracking")
    assert sets["test"]["prompts"] == [r["prompt"] for r in ds["tracking"] if r["prompt"] and r["aliases"]]
    assert not set(sets["test"]["prompts"]) & {r["prompt"] for r in ds["test"]}
    assert _probe_sets(ds, 4)["paraphrase"] == sets["paraphrase"]  # the paraphrase sample does not depend on it


def test_ensure_triage_runs_once_with_the_recipes_boundary(tmp_path, monkeypatch, tiny_model_dir):
    import neurodetox.data.triage as triage
    from neurodetox.experiment.runs import ensure_triage

    calls = []

    def fake(model, tok, rows, settings, **kw):
        calls.append(settings)
        recs = [{"key": triage.fact_key(r), "statement": r["statement"], "category": "HighlyKnown"} for r in rows]
        return triage.TriageResult(
            recs, {"HighlyKnown": len(recs), "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 0}, {}
        )

    monkeypatch.setattr(triage, "triage_facts", fake)
    plan = plan_study(
        str(RECIPE),
        [0],
        tmp_path,
        arms=["off"],
        variants=["known"],
        model=tiny_model_dir,
        fields=["max_facts_per_relation=12", "eigenscore_stop=none"],
    )
    content = ensure_triage(plan)
    assert len(calls) == 1 and calls[0].stop == "none" and calls[0].max_new_tokens == 8  # the recipe's settings
    assert (calls[0].phrasings, calls[0].k) == (2, 4)
    assert content["split"]["max_facts_per_relation"] == 12 and plan.triage_path.is_file()
    content["settings"] = {k: getattr(calls[0], k) for k in calls[0].__dataclass_fields__}
    plan.triage_path.write_text(json.dumps(content))
    ensure_triage(plan)  # same model, split and settings: reused
    assert len(calls) == 1
    assert ensure_triage(plan_study(str(RECIPE), [0], tmp_path, arms=["off"])) is None


def _mech_result(arm, seed, mean_abs, picked, massive, drop, loss):
    return {
        "arm": arm,
        "seed": seed,
        "selections": [{"step": drop, "neurons": {"residual.2": picked}, "massive": massive, "mean_abs": mean_abs}],
        "sensitive_neurons": [{"step": drop, "dropped": {"residual.2": len(picked)}}],
        "curves": {"loss": loss},
    }


def test_mechanism_table_and_figures_by_hand(tmp_path):
    from neurodetox.experiment.mechanism import (
        loss_around_drops,
        mechanism_markdown,
        mechanism_table,
        plot_mechanism,
        selection_points,
    )

    m = {"residual.2": [1.0, 2.0, 3.0, 100.0, 4.0]}  # lower median 3.0
    loss = [[5, 1.6], [10, 1.5], [15, 6.5], [20, 3.0], [45, 1.0]]
    a = _mech_result("send", 0, m, [3, 4], {}, 10, loss)  # picks the massive index 3
    b = _mech_result("send@nomassive", 0, m, [1, 4], {"residual.2": [3]}, 10, [[10, 1.5], [15, 1.7]])
    off = {"arm": "off", "seed": 0, "selections": [], "sensitive_neurons": [], "curves": {"loss": loss}}
    p = selection_points(a)
    assert p == {"site": "residual.2", "step": 10, "mean_abs": m["residual.2"], "picked": [3, 4], "massive": []}
    assert selection_points(off) is None
    assert loss_around_drops(a, before=5, after=10) == [(-5, 1.6), (0, 1.5), (5, 6.5), (10, 3.0)]
    rows = {r["arm"]: r for r in mechanism_table([a, b, off])}
    assert rows["send"]["massive_share"] == 0.5  # index 3: 100 > 10 × 3, picked though the run excluded nothing
    assert rows["send"]["picked_scale"] == pytest.approx(4.0 / 3.0)  # lower median of (100, 4) is 4
    assert rows["send"]["loss_jump"] == pytest.approx(6.5 - 1.5)
    assert rows["send@nomassive"]["massive_share"] == 0.0 and rows["send@nomassive"]["loss_jump"] == pytest.approx(0.2)
    assert rows["off"]["runs"] == 0 and math.isnan(rows["off"]["loss_jump"])
    figs = plot_mechanism([a, b, off], tmp_path / "fig")
    assert set(figs) == {"selection", "drop_loss"} and all(f.stat().st_size > 1000 for f in figs.values())
    md = mechanism_markdown([a, b, off], figs, tmp_path / "send.md")
    assert "| send | 1 | 50% | 1.33 | 5.00 |" in md and "](fig/selection.png)" in md and "| off |" not in md

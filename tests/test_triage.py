"""SliCK triage (Gekhman et al., arXiv 2405.05904): categories by hand, the phrasing→fact bookkeeping against a
scripted sampler, the known-facts filter, the CLI and the training hook, and the bad-input errors."""

import json
from types import SimpleNamespace

import pytest

from neurodetox.cli.main import main
from neurodetox.core.errors import UserError
from neurodetox.data.triage import (
    CATEGORIES,
    TriageSettings,
    categorize,
    filter_known,
    parse_categories,
    triage_facts,
)
from tests.test_cli import RECIPE, _tiny_args


@pytest.mark.parametrize(
    "greedy, sampled, expected",
    [
        ([True, True, True], [False] * 6, "HighlyKnown"),
        ([True, False, True], [False] * 6, "MaybeKnown"),
        ([False, False, True], [True] * 6, "MaybeKnown"),
        ([False, False, False], [False, False, True], "WeaklyKnown"),
        ([False, False, False], [False] * 6, "Unknown"),
        ([True], [], "HighlyKnown"),
    ],
)
def test_categories_by_hand(greedy, sampled, expected):
    assert categorize(greedy, sampled) == expected


FACTS = [
    {"fact_id": "a", "statement": "A is x.", "prompt": "A is", "aliases": ["x"], "paraphrases": ["A1 is", "A2 is"]},
    {"fact_id": "b", "statement": "B is y.", "prompt": "B is", "aliases": ["y"], "paraphrases": ["B1 is"]},
    {"fact_id": "c", "statement": "C is z.", "prompt": "C is", "aliases": ["z", "zed"], "paraphrases": []},
    {"fact_id": "d", "statement": "D is w.", "prompt": "D is", "aliases": ["w"], "paraphrases": ["D1 is"]},
]
# scripted answers per phrasing: (greedy, samples)
SCRIPT = {
    "A is": ("x", ["x", "q"]),
    "A1 is": ("x", ["q", "q"]),
    "A2 is": ("the x", ["q", "q"]),  # HighlyKnown: every greedy answer holds the alias
    "B is": ("q", ["q", "q"]),
    "B1 is": ("y", ["q", "q"]),  # MaybeKnown: one greedy of two
    "C is": ("q", ["q", "Zed"]),  # WeaklyKnown: a sample only (alias match is case-insensitive)
    "D is": ("q", ["q", "q"]),
    "D1 is": ("q", ["q", "q"]),  # Unknown
}


def _scripted(monkeypatch, seen):
    import neurodetox.metrics.sampling as sampling

    def fake(model, tok, prompts, **kw):
        seen.append((list(prompts), kw))
        return SimpleNamespace(greedy=[SCRIPT[p][0] for p in prompts], samples=[SCRIPT[p][1] for p in prompts])

    monkeypatch.setattr(sampling, "sample_answers", fake)


def test_triage_maps_phrasings_back_to_facts(monkeypatch):
    seen = []
    _scripted(monkeypatch, seen)
    res = triage_facts(None, None, FACTS, TriageSettings(phrasings=3, k=2))
    assert [r["category"] for r in res.records] == ["HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"]
    assert res.counts == dict(zip(CATEGORIES, (1, 1, 1, 1))) and res.known == 3
    assert res.records[1]["p_greedy"] == 0.5 and res.records[2]["p_sampled"] == 0.5
    assert res.records[0]["greedy"] == ["x", "x", "the x"]
    prompts, kw = seen[0]
    assert prompts == ["A is", "A1 is", "A2 is", "B is", "B1 is", "C is", "D is", "D1 is"]
    assert kw["stop"] == "inside" and kw["greedy"] is True and kw["k"] == 2  # the detection work's answer boundary
    seen.clear()
    res = triage_facts(None, None, FACTS, TriageSettings(phrasings=1, k=2, stop="none"))
    assert seen[0][0] == ["A is", "B is", "C is", "D is"] and seen[0][1]["stop"] == "none"
    assert [r["category"] for r in res.records] == ["HighlyKnown", "Unknown", "WeaklyKnown", "Unknown"]


def test_all_unknown_is_a_clear_error(monkeypatch):
    _scripted(monkeypatch, [])
    with pytest.raises(UserError, match="knows none of the 1 facts"):
        triage_facts(None, None, FACTS[3:], TriageSettings(k=2))
    res = triage_facts(None, None, FACTS[3:], TriageSettings(k=2), allow_all_unknown=True)
    assert res.counts["Unknown"] == 1
    with pytest.raises(UserError, match="no prompt or no aliases"):
        triage_facts(None, None, [{"statement": "s", "prompt": "", "aliases": ["a"]}])
    with pytest.raises(UserError, match="k must be"):
        TriageSettings(k=1)


def _write(path, categories, split=None, facts=FACTS):
    recs = [{"key": f["fact_id"], "statement": f["statement"], "category": c} for f, c in zip(facts, categories)]
    counts = {c: categories.count(c) for c in CATEGORIES}
    path.write_text(json.dumps({"format": "neurodetox-triage/1", "split": split, "counts": counts, "records": recs}))
    return path


def test_filter_known_keeps_the_chosen_categories_in_order(tmp_path):
    f = _write(tmp_path / "t.json", ["Unknown", "HighlyKnown", "WeaklyKnown", "MaybeKnown"])
    assert [r["fact_id"] for r in filter_known(FACTS, f)] == ["b", "c", "d"]
    assert [r["fact_id"] for r in filter_known(FACTS, f, "HighlyKnown,MaybeKnown")] == ["b", "d"]
    import datasets

    ds = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "paraphrases"} for r in FACTS])
    assert filter_known(ds, f, ["Unknown"])["fact_id"] == ["a"]


def test_filter_known_bad_input(tmp_path):
    none_known = _write(tmp_path / "u.json", ["Unknown"] * 4)
    with pytest.raises(UserError, match="no training fact is in"):
        filter_known(FACTS, none_known)
    with pytest.raises(UserError, match="not found"):
        filter_known(FACTS, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not a JSON triage file"):
        filter_known(FACTS, tmp_path / "bad.json")
    partial = _write(tmp_path / "p.json", ["HighlyKnown"] * 3, facts=FACTS[:3])
    with pytest.raises(UserError, match="no label for 1 of the 4 training facts"):
        filter_known(FACTS, partial)
    f = _write(tmp_path / "s.json", ["HighlyKnown"] * 4, split={"split_seed": 0, "data": "facts"})
    with pytest.raises(UserError, match="another data split .differs in split_seed"):
        filter_known(FACTS, f, split={"split_seed": 1, "data": "facts"})
    with pytest.raises(UserError, match="known_categories 'Known' is invalid"):
        parse_categories("Known")


def test_cli_triage_on_a_tiny_model_and_training_on_known_facts(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "triage.json"
    base = ["data", "triage", "--model", tiny_model_dir, "--max_facts_per_relation", "12", "--out", str(out)]
    quick = ["--k", "2", "--phrasings", "2", "--max_new_tokens", "3"]
    # a random tiny model: whatever it knows, the counts cover every training fact, and the file is complete
    assert main([*base, *quick, "--allow_all_unknown", "true"]) == 0
    content = json.loads(out.read_text())
    n_train = sum(content["counts"].values())
    assert n_train == len(content["records"]) and content["split"]["max_facts_per_relation"] == 12
    assert "HighlyKnown:" in capsys.readouterr().out
    assert main([*base, *quick]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    # train on known facts only: mark every other fact known by hand and check the run trained on those
    recs = content["records"]
    for i, r in enumerate(recs):
        r["category"] = "HighlyKnown" if i % 2 == 0 else "Unknown"
    out.write_text(json.dumps(content))
    run = tmp_path / "run"
    argv = _tiny_args(tiny_model_dir, run, "--known_facts_file", str(out), "--save_strategy", "no")
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["splits"]["train"] == (len(recs) + 1) // 2
    # all Unknown: a clear error before training
    for r in recs:
        r["category"] = "Unknown"
    out.write_text(json.dumps(content))
    assert main(_tiny_args(tiny_model_dir, tmp_path / "run2", "--known_facts_file", str(out))) == 2
    assert "no training fact is in HighlyKnown, MaybeKnown, WeaklyKnown" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "summary.json").exists()
    assert RECIPE.is_file()


def test_cli_triage_all_unknown_exits_2(tiny_model_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    rows = [
        {
            "statement": f"The capital of {c} is Ulaanbaatar.",
            "prompt": f"The capital of {c} is",
            "answer": "Ulaanbaatar",
        }
        for c in ("france", "germany", "italy", "spain", "japan", "asia", "europe", "africa", "euro", "yen")
    ]
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["data", "triage", "--model", tiny_model_dir, "--data", str(facts), "--out", str(tmp_path / "t.json")]
    assert main([*argv, "--k", "2", "--max_new_tokens", "3", "--tracking_fraction", "0.2"]) == 2
    assert "the model knows none of the" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_known_and_released_recipes_parse():
    from neurodetox.send.recipes import parse_recipe

    root = RECIPE.parent
    _, data, _, args, _ = parse_recipe(str(root / "smollm2-facts-known.yaml"))
    assert data.known_facts_file == "runs/triage/train.json" and args.send_mode == "off"
    _, _, _, args, _ = parse_recipe(str(root / "smollm2-facts-send-released.yaml"))
    assert args.send_procedure == "released" and args.send_site == "residual"

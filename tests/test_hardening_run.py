"""Issue 19 items 1, 6, 7: ``train``'s run folder, resume checks, split rebuild, data-file and model errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from neurodetox.core.errors import UserError
from neurodetox.core.paths import PathNotFoundError
from neurodetox.send.recipes import parse_recipe
from neurodetox.send.run import (
    RUN_CONFIG,
    RUN_MARKER,
    check_output_dir,
    check_resume_config,
    load_run_data,
    rebuild_split,
    run_config,
    run_training,
)
from tests.conftest import make_tiny_llama, make_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-facts-send.yaml"


def _args(model_dir, out, *extra):
    cap = [] if "--data" in extra else ["--max_facts_per_relation", "12"]
    return parse_recipe(
        str(RECIPE),
        [
            "--model_name_or_path",
            str(model_dir),
            "--output_dir",
            str(out),
            *cap,
            "--max_steps",
            "6",
            "--send_window_steps",
            "2",
            "--eval_steps",
            "3",
            "--save_steps",
            "3",
            "--logging_steps",
            "2",
            "--max_test_probes",
            "3",
            "--eigenscore_k",
            "3",
            "--eigenscore_num_prompts",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            *extra,
        ],
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- item 1: --overwrite_output_dir


def test_overwrite_refuses_a_folder_of_other_files(tiny_model_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not a run")
    before = _files(out)
    with pytest.raises(UserError, match="not a neurodetox run folder"):
        run_training(*_args(tiny_model_dir, out, "--overwrite_output_dir", "true"))
    assert _files(out) == before


def test_overwrite_refuses_the_working_folder_and_its_parents(tiny_model_dir, tmp_path, monkeypatch):
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "summary.json").write_text("{}")  # even if it looks like a run
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path / "project")):
        with pytest.raises(UserError, match="working folder or one of its parents"):
            run_training(*_args(tiny_model_dir, out, "--overwrite_output_dir", "true", "--force_overwrite", "true"))
    assert (work / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_holding_the_model(tmp_path):
    out = tmp_path / "out"
    model_dir = out / "final"
    tok = make_tokenizer()
    make_tiny_llama(len(tok), layers=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (out / "summary.json").write_text("{}")  # a previous run
    before = _files(out)
    with pytest.raises(UserError, match="holds the model"):
        run_training(*_args(model_dir, out, "--overwrite_output_dir", "true", "--force_overwrite", "true"))
    assert _files(out) == before


def test_overwrite_refuses_a_folder_holding_the_data_file(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    data = out / "facts.jsonl"
    data.write_text("".join(json.dumps({"statement": f"The capital of x{i} is y{i}."}) + "\n" for i in range(30)))
    (out / "metrics.jsonl").write_text("")
    before = _files(out)
    with pytest.raises(UserError, match="holds the data file"):
        run_training(*_args(tiny_model_dir, out, "--data", str(data), "--overwrite_output_dir", "true"))
    assert _files(out) == before


def test_missing_model_fails_before_anything_is_deleted(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_MARKER).write_text("")
    (out / "metrics.jsonl").write_text("kept")
    with pytest.raises(PathNotFoundError, match="model path not found"):
        run_training(*_args(tmp_path / "nope" / "final", out, "--overwrite_output_dir", "true"))
    assert (out / "metrics.jsonl").read_text() == "kept"


def test_check_output_dir_deletes_only_recognised_runs(tmp_path):
    from neurodetox.send.recipes import RunArguments

    run = RunArguments(overwrite_output_dir=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(UserError, match="--force_overwrite"):
        check_output_dir(other, run)
    check_output_dir(other, RunArguments(overwrite_output_dir=True, force_overwrite=True))  # forced: allowed
    for marker in (RUN_MARKER, "summary.json", "metrics.jsonl", "checkpoint-3"):
        d = tmp_path / marker.replace(".", "_")
        (d / marker).mkdir(parents=True) if marker.startswith("checkpoint") else (d.mkdir(), (d / marker).touch())
        assert check_output_dir(d, run) == d
    assert (other / "x").read_text() == "x"  # check_output_dir itself never deletes


# ----------------------------------------------------------------------------- item 6: resume and split record


def test_whole_run_records_its_split_and_refuses_a_changed_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    quick = ("--score_test_probes", "false", "--eigenscore_num_prompts", "0")  # the run folder is what is tested
    summary = run_training(*_args(tiny_model_dir, out, *quick))
    assert (out / RUN_MARKER).is_file()
    recorded = json.loads((out / RUN_CONFIG).read_text())
    assert recorded["data"]["split_seed"] == 0 and recorded["training"]["learning_rate"] == 1e-4
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["split"] == summary["split"]
    assert on_disk["split"]["max_facts_per_relation"] == 12 and on_disk["split"]["data"] == "facts"
    # the rebuilt split is the one the run trained on
    data_args = _args(tiny_model_dir, out)[1]
    want = load_run_data(data_args)
    got = rebuild_split(on_disk)
    for split in ("train", "tracking", "test"):
        assert got[split]["fact_id"] == want[split]["fact_id"]
    assert {k: len(v) for k, v in got.items()} == on_disk["splits"]
    before = _files(out)
    for extra, field in [
        (("--learning_rate", "0.001"), "training.learning_rate: 0.0001 -> 0.001"),
        (("--split_seed", "3"), "data.split_seed: 0 -> 3"),
        (("--per_device_train_batch_size", "2"), "training.per_device_train_batch_size: 4 -> 2"),
        (("--send_drop_fraction", "0.3"), "training.send_drop_fraction"),
        (("--lr_scheduler_type", "cosine"), "training.lr_scheduler_type: 'constant' -> 'cosine'"),
        (("--tracking_fraction", "0.2"), "data.tracking_fraction"),
    ]:
        with pytest.raises(UserError, match="resume changes the run's recorded settings") as e:
            run_training(*_args(tiny_model_dir, out, *quick, "--resume_from_checkpoint", "true", *extra))
        assert field in str(e.value) and "--allow_resume_changes" in str(e.value)
    with pytest.raises(UserError) as e:
        run_training(
            *_args(
                tiny_model_dir, out, "--resume_from_checkpoint", "true", "--learning_rate", "0.001", "--split_seed", "3"
            )
        )
    assert "learning_rate" in str(e.value) and "split_seed" in str(e.value)  # every field named
    assert _files(out) == before  # refused before anything was written


def test_check_resume_config_names_fields_and_can_be_allowed(tiny_model_dir, tmp_path):
    m, d, _, a, peft = _args(tiny_model_dir, tmp_path / "r")
    old = run_config(m, d, a, peft)
    assert check_resume_config(old, json.loads(json.dumps(old))) == []
    m3, d3, _, a3, _ = _args(tiny_model_dir, tmp_path / "r", "--max_steps", "60")
    assert check_resume_config(old, run_config(m3, d3, a3, peft)) == []  # training longer is what resume is for
    m2, d2, _, a2, _ = _args(tiny_model_dir, tmp_path / "r", "--learning_rate", "0.5", "--test_fraction", "0.2")
    new = run_config(m2, d2, a2, peft)
    with pytest.raises(UserError, match=r"data.test_fraction: 0.1 -> 0.2.*training.learning_rate: 0.0001 -> 0.5"):
        check_resume_config(old, new)
    assert check_resume_config(old, new, allow_changes=True) == [
        "data.test_fraction: 0.1 -> 0.2",
        "training.learning_rate: 0.0001 -> 0.5",
    ]


def test_rebuild_split_needs_the_recorded_fields():
    with pytest.raises(UserError, match="does not record its data split .*split_seed"):
        rebuild_split({"data": "facts", "facts_seed": 0})
    with pytest.raises(UserError, match="tracking_fraction"):
        rebuild_split(
            {
                "split": {
                    "data": "facts",
                    "relations": "capital_of",
                    "max_facts_per_relation": 5,
                    "split_seed": 0,
                    "tracking_fraction": 1.5,
                    "test_fraction": 0.1,
                }
            }
        )


# ----------------------------------------------------------------------------- item 7: one-line errors


def test_one_row_tracking_set_is_named(tiny_model_dir, tmp_path):
    rows = [{"statement": f"The capital of x{i} is y{i}.", "split": "train"} for i in range(8)]
    rows += [{"statement": "The capital of t is u.", "split": "tracking"}]
    rows += [{"statement": "The capital of p is q.", "prompt": "The capital of p is", "split": "test"}]
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"the tracking set \(split 'tracking' of .*facts.jsonl\) has 1 row"):
        run_training(*_args(tiny_model_dir, tmp_path / "run", "--data", str(data)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.jsonl", b"", "is empty"),
        ("blank.csv", b"\n\n", "is empty"),
        ("bad.jsonl", b'{"statement": "a b."}\n{"statement": "c d."\n', "line 2 is not valid JSON"),
        ("list.jsonl", b'{"statement": "a b."}\n["a", "b"]\n', "line 2 is a JSON list"),
        ("latin.csv", b"statement\nThe capital of Cura\xe7ao is Willemstad.\n", "not UTF-8 text: byte 0xe7 at line 2"),
        ("empty.json", b"[]", "empty JSON list"),
        ("header.csv", b"statement\n", "no rows"),
    ],
)
def test_bad_data_files_are_one_line_user_errors(tmp_path, name, content, match):
    from neurodetox.data import load_facts

    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        load_facts(str(p))
    assert "\n" not in str(e.value) and name in str(e.value)


def test_empty_data_file_stops_train_before_the_run_folder(tiny_model_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(UserError, match="is empty"):
        run_training(*_args(tiny_model_dir, tmp_path / "run", "--data", str(data)))
    assert not (tmp_path / "run").exists()


def test_read_only_output_parent_is_a_user_error(tiny_model_dir, tmp_path, monkeypatch):
    """Simulated with os.access (tests may run as root, which ignores permissions)."""
    import neurodetox.core.paths as paths

    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="not writable"):
        run_training(*_args(tiny_model_dir, tmp_path / "ro" / "run"))


def test_malformed_yaml_recipe_names_the_line(tmp_path):
    from neurodetox.send.recipes import load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("send_mode: send\nlearning_rate: [0.1\nseed: 3\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        load_recipe(str(bad))


# ----------------------------------------------------------------------------- models (items 7, 8)


def test_model_folder_without_tokenizer_names_the_files_and_tokenizer_option_works(tiny_model_dir, tmp_path):
    from neurodetox.core.models import load_model

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (Path(tiny_model_dir) / f).exists():
            shutil.copy(Path(tiny_model_dir) / f, bare / f)
    with pytest.raises(UserError, match=r"no tokenizer files \(none of tokenizer.json.*--tokenizer"):
        load_model(str(bare))
    model, tok = load_model(str(bare), tokenizer=tiny_model_dir)
    ref_model, ref_tok = load_model(tiny_model_dir)
    assert tok("the capital of france")["input_ids"] == ref_tok("the capital of france")["input_ids"]


def test_truncated_weights_and_offline_hub_id_are_user_errors(tiny_model_dir, tmp_path, monkeypatch):
    from neurodetox.core.models import load_model

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    w = cut / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    with pytest.raises(UserError, match=r"model.safetensors \(\d+ bytes\) is not a readable safetensors file"):
        load_model(str(cut))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="'someone/no-such-model' is neither a local folder .*HF_HUB_OFFLINE=1"):
        load_model("someone/no-such-model")


def test_prompt_checks_refuse_lists_and_over_long_prompts(tiny_model_dir):
    from neurodetox.core.models import check_prompt_lengths, check_prompts, load_model

    model, tok = load_model(tiny_model_dir)
    ctx = model.config.max_position_embeddings  # 128 in the tiny config
    with pytest.raises(UserError, match="prompt 1 is a list"):
        check_prompts(["the capital of france is", ["the", "capital"]])
    with pytest.raises(UserError, match="not one string"):
        check_prompts("the capital of france is")
    long = " ".join(["paris"] * (ctx + 5))
    with pytest.raises(UserError, match=f"prompt 1 is {ctx + 5} tokens long, but the model's context is {ctx}"):
        check_prompt_lengths(model, tok, ["the capital", long])
    with pytest.raises(UserError, match=f"at most {ctx - 10} tokens fit"):
        check_prompt_lengths(model, tok, [" ".join(["paris"] * (ctx - 5))], max_new_tokens=10)
    assert check_prompt_lengths(model, tok, ["the capital of france is"]) == [5]


def test_environment_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.parametrize("steps, window, warns", [(60, 25, False), (50, 25, True), (6, 2, False), (4, 2, True)])
def test_schedule_warning_counts_recordings_not_whole_windows(caplog, tmp_path, steps, window, warns):
    """Recordings at step 0 and every window end before the last step: 60 steps / window 25 record at
    0, 25, 50, enough for C = 3 (a selection happens at step 50), while 50 / 25 record only twice."""
    import logging

    from neurodetox.send.config import SeNDConfig
    from neurodetox.send.run import check_schedule

    args = SeNDConfig(
        output_dir=str(tmp_path), max_steps=steps, send_window_steps=window, send_num_checkpoints=3, use_cpu=True
    )
    with caplog.at_level(logging.WARNING, logger="neurodetox.send.run"):
        check_schedule(args, n_train=100)
    assert ("no neuron will ever be dropped" in caplog.text) == warns

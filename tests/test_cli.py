"""The `neurodetox` command line: recipes, overrides, bad input, and a whole run on a tiny model."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from neurodetox.cli.main import main
from neurodetox.send import SeNDConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-facts-send.yaml"


def _tiny_args(model_dir, out, *extra):
    return [
        "train",
        "--config",
        str(RECIPE),
        "--model_name_or_path",
        model_dir,
        "--output_dir",
        str(out),
        "--max_facts_per_relation",
        "12",
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
        "--eigenscore_max_new_tokens",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def test_help_lists_every_send_and_eigenscore_field(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    fields = [f for f in dataclasses.fields(SeNDConfig) if f.name.startswith(("send_", "eigenscore_"))]
    assert len(fields) >= 15
    for f in fields:
        assert f"--{f.name}" in out, f.name
        words = f.metadata["help"].split()[:3]
        assert " ".join(words) in " ".join(out.split()), f"help text of {f.name} missing"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--send_dropfraction", "0.3"],
            "unknown field(s): 'send_dropfraction' (did you mean send_drop_fraction",
        ),
        (["--send_drop_fraction", "1.5"], "send_drop_fraction=1.5 is invalid: must be in (0, 1)"),
        (["--send_num_checkpoints", "1"], "send_num_checkpoints=1 is invalid"),
    ],
)
def test_bad_fields_stop_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), "--output_dir", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_recipe_and_unknown_recipe_key(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("send_mode: send\nlearning_rat: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "'learning_rat' (did you mean learning_rate" in capsys.readouterr().err


def test_layer_out_of_range_and_window_too_long_stop_before_training(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(_tiny_args(tiny_model_dir, out, "--send_layers", "9")) == 2
    assert "layer 9 is out of range for site 'residual'" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()
    out = tmp_path / "b"
    assert main(_tiny_args(tiny_model_dir, out, "--send_window_steps", "50")) == 2
    assert "send_window_steps=50 is longer than the run (6 steps)" in capsys.readouterr().err
    assert not out.exists()


def test_missing_data_file(tiny_model_dir, tmp_path, capsys):
    assert main(_tiny_args(tiny_model_dir, tmp_path / "c", "--data", str(tmp_path / "facts.jsonl"))) == 2
    assert "facts.jsonl" in capsys.readouterr().err


def test_whole_run_on_tiny_model_then_refuses_to_clobber_and_resumes(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(_tiny_args(tiny_model_dir, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "factual_accuracy_before",
        "factual_accuracy_after",
        "eigenscore_before",
        "eigenscore_after",
        "sensitive_neurons",
    ):
        assert key in summary, key
    assert summary["sensitive_neurons"][0]["step"] == 4  # recordings at 0, 2, 4
    assert len(summary["sensitive_neurons"][0]["neurons"]["residual.2"]) == round(0.2 * 32)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_eigenscore" in r for r in lines) and any("loss" in r for r in lines)
    assert lines[0]["step"] == 0 and "test_factual_accuracy" in lines[0]
    assert (out / "training_curves.png").stat().st_size > 10_000
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert {"checkpoint-3", "checkpoint-6"} <= set(os.listdir(out))
    # the same folder again: refuses, then resumes from the last checkpoint
    assert main(_tiny_args(tiny_model_dir, out)) == 2
    assert "--resume_from_checkpoint" in capsys.readouterr().err
    assert main(_tiny_args(tiny_model_dir, out, "--max_steps", "8", "--resume_from_checkpoint", "true")) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["global_steps"] == 8
    assert again["factual_accuracy_before"] == summary["factual_accuracy_before"]


def test_data_facts_command(tmp_path, capsys):
    out = tmp_path / "facts"
    assert main(["data", "facts", "--out", str(out), "--max-facts-per-relation", "10"]) == 0
    assert "train" in capsys.readouterr().out
    assert (out / "train.jsonl").is_file() and (out / "manifest.json").is_file()
    assert main(["data", "facts", "--out", str(out)]) == 2
    assert main(["data", "facts", "--out", str(tmp_path / "x"), "--relations", "capital_of,population_of"]) == 2
    assert "population_of" in capsys.readouterr().err


def test_peft_section_trains_lora_and_final_is_merged(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        RECIPE.read_text() + "\npeft:\n  r: 4\n  lora_alpha: 8\n  target_modules: [q_proj, v_proj, down_proj]\n"
    )
    out = tmp_path / "run"
    argv = _tiny_args(tiny_model_dir, out, "--send_site", "mlp", "--send_layers", "all", "--learning_rate", "0.05")
    argv[2] = str(recipe)
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peft"]["r"] == 4
    assert summary["sensitive_neurons"] and set(summary["sensitive_neurons"][0]["neurons"]) == {
        f"mlp.{i}" for i in range(4)
    }
    assert (out / "final-adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    w_m = merged.model.layers[0].mlp.down_proj.weight
    w_b = base.model.layers[0].mlp.down_proj.weight
    assert w_m.shape == w_b.shape and not torch.equal(w_m, w_b), "the LoRA update must be merged into final/"


def test_bad_peft_field_and_contradicting_deepspeed_config(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(RECIPE.read_text() + "\npeft:\n  rank: 4\n")
    argv = _tiny_args(tiny_model_dir, tmp_path / "a")
    argv[2] = str(recipe)
    assert main(argv) == 2
    assert "unknown peft field(s) ['rank']" in capsys.readouterr().err
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    assert main(_tiny_args(tiny_model_dir, tmp_path / "b", "--deepspeed", str(ds))) == 2
    assert "train_micro_batch_size_per_gpu=2 contradicts per_device_train_batch_size=4" in capsys.readouterr().err
    ds.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 2}}))
    assert main(_tiny_args(tiny_model_dir, tmp_path / "c", "--deepspeed", str(ds))) == 2
    assert "train_batch_size=16 is not per_device_train_batch_size" in capsys.readouterr().err
    assert not (tmp_path / "c" / "metrics.jsonl").exists()


def test_patch_demo_patches_the_runs_own_test_facts_and_refuses_an_unrecorded_split(tiny_model_dir, tmp_path, capsys):
    """Issue 15's split-seed bug: a run trained with a non-default split seed was patched on
    seed-0 test facts (possibly its training facts). patch demo now rebuilds the run's split."""
    from neurodetox.data import load_facts

    out = tmp_path / "run"
    assert main(_tiny_args(tiny_model_dir, out, "--split_seed", "3")) == 0
    assert main(["patch", "demo", "--run", str(out), "--n", "2", "--unrelated", "5", "--quiet"]) == 0
    res = json.loads((out / "patch_summary.json").read_text())
    assert res["split"]["split_seed"] == 3
    edits = json.loads((out / "patch" / "manifest.json").read_text())["edits"]
    patched = {e["fact_id"] for e in edits}
    assert len(patched) == 2
    seed3 = load_facts(
        "facts", seed=3, relations=("capital_of", "continent_of", "currency_of"), max_facts_per_relation=12
    )
    seed0 = load_facts(
        "facts", seed=0, relations=("capital_of", "continent_of", "currency_of"), max_facts_per_relation=12
    )
    assert patched <= set(seed3["test"]["fact_id"])
    assert not patched & set(seed3["train"]["fact_id"])
    assert set(seed3["test"]["fact_id"]) != set(seed0["test"]["fact_id"])  # the seeds really differ
    # a summary that does not record its split (an older run) is refused with a message, nothing written
    summary = json.loads((out / "summary.json").read_text())
    del summary["split"]
    (out / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["patch", "demo", "--run", str(out), "--n", "2", "--quiet"]) == 2
    assert "does not record its data split" in capsys.readouterr().err

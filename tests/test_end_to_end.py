"""End to end on the real SmolLM2-135M and real GeoNames facts: a few SeND steps through the CLI."""

import json
from pathlib import Path

import pytest

from neurodetox.cli.main import main


@pytest.mark.real_model
def test_send_training_on_real_model(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-facts-send.yaml"),
        "--output_dir",
        str(out),
        "--max_facts_per_relation",
        "20",
        "--max_steps",
        "6",
        "--send_window_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--eval_steps",
        "6",
        "--save_steps",
        "6",
        "--max_test_probes",
        "6",
        "--eigenscore_k",
        "4",
        "--eigenscore_num_prompts",
        "3",
        "--eigenscore_max_new_tokens",
        "4",
        "--logging_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert 0.0 <= s["factual_accuracy_before"] <= 1.0 and 0.0 <= s["factual_accuracy_after"] <= 1.0
    assert s["eigenscore_before"] == s["eigenscore_before"]  # not NaN
    assert s["sensitive_neurons"][0]["step"] == 4
    assert len(s["sensitive_neurons"][0]["neurons"]["residual.28"]) == round(0.2 * 576)
    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert m.config.num_hidden_layers == 30
    assert (out / "checkpoint-6" / "neurodetox_send_state.json").is_file()

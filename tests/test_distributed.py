"""SeND on several processes (gloo, CPU) equals SeND on one: DeepSpeed ZeRO-2/3, LoRA, checkpointing, resume.

Each test launches ``tests/distributed/send_run.py`` with ``torchrun --nproc_per_node 2`` and compares
what each rank computed with a one-process run over the same global batches (learning rate 0, so that
both runs see identical weights and inputs: then the selections must be identical and the statistics
equal up to float reduction order).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (installed by `make test` through the deepspeed extra; never skipped)
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "distributed" / "send_run.py"
ROOT = HERE.parent
ZERO2 = str(ROOT / "recipes" / "deepspeed" / "zero2.json")
ZERO3 = str(ROOT / "recipes" / "deepspeed" / "zero3.json")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the venv's ninja first
    return env


def launch(out, nproc, *args, timeout=600):
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [
            torchrun,
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(SCRIPT),
            "--out",
            str(out),
            *args,
        ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def assert_same_stats(ref, got):
    assert ref["stats"].keys() == got["stats"].keys()
    for key, r in ref["stats"].items():
        g = got["stats"][key]
        assert r["count"] == g["count"], key
        rm, gm, rv, gv = (np.array(x) for x in (r["mean"], g["mean"], r["var"], g["var"]))
        # relative to each neuron's scale (|mean| + std): a mean near zero has no meaningful relative error
        scale = np.abs(rm) + np.sqrt(rv)
        assert np.all(np.abs(rm - gm) <= 1e-6 * scale), (key, np.max(np.abs(rm - gm) / scale))
        assert np.all(np.abs(rv - gv) <= 1e-6 * np.abs(rv)), (key, np.max(np.abs(rv - gv) / np.abs(rv)))


def assert_identical_across_ranks(ranks):
    first = ranks[0]
    for r in ranks[1:]:
        assert r["selections"] == first["selections"]
        assert r["current"] == first["current"]
        assert r["stats"] == first["stats"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("one"), 1)[0]


@pytest.fixture(scope="module")
def zero3_two_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return out, launch(out, 2, "--deepspeed", ZERO3)


def test_zero3_two_processes_equal_one_process(one_process, zero3_two_process):
    _, ranks = zero3_two_process
    assert [r["world"] for r in ranks] == [2, 2]
    assert_identical_across_ranks(ranks)
    assert one_process["selections"], "the run must select sensitive neurons"
    assert ranks[0]["selections"] == one_process["selections"]
    assert ranks[0]["history_steps"] == one_process["history_steps"]
    np.testing.assert_allclose(
        np.array(ranks[0]["last_history"]["mlp.1"]),
        np.array(one_process["last_history"]["mlp.1"]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_same_stats(one_process, ranks[0])


def test_zero3_resume_reproduces_uninterrupted_run(tmp_path, zero3_two_process):
    _, full = zero3_two_process
    out = tmp_path / "killed"
    launch(out, 2, "--deepspeed", ZERO3, "--stop-at", "6")
    assert sorted(os.listdir(out / "run")) == ["checkpoint-4"]
    resumed = launch(out, 2, "--deepspeed", ZERO3, "--resume")
    assert_identical_across_ranks(resumed)
    assert resumed[0]["selections"] == full[0]["selections"]
    assert_same_stats(full[0], resumed[0])


@pytest.mark.slow
def test_zero2_two_processes_equal_one_process(tmp_path, one_process):
    ranks = launch(tmp_path, 2, "--deepspeed", ZERO2)
    assert_identical_across_ranks(ranks)
    assert ranks[0]["selections"] == one_process["selections"]
    assert_same_stats(one_process, ranks[0])


@pytest.mark.slow
def test_lora_zero3_gradient_checkpointing_two_processes(tmp_path):
    ref = launch(tmp_path / "one", 1, "--peft", "--gc")[0]
    ranks = launch(tmp_path / "two", 2, "--peft", "--gc", "--deepspeed", ZERO3)
    assert_identical_across_ranks(ranks)
    assert ranks[0]["selections"] == ref["selections"] and ref["selections"]
    assert_same_stats(ref, ranks[0])

"""Every neurodetox metric reaches the Trainer's reporters (issue 20): TensorBoard event files read back."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from conftest import make_tiny_llama, make_tokenizer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainingArguments

from neurodetox.data.lm import CausalLMCollator, tokenize_texts
from neurodetox.reports.reporters import SeNDReporterCallback, reporter_writers
from neurodetox.send.callbacks import ActivationStatsCallback, SensitiveNeuronDropoutCallback
from neurodetox.send.integration import SeNDArguments, add_send

STATEMENTS = [
    "the capital of france is paris",
    "the capital of germany is berlin",
    "the capital of italy is rome",
    "the capital of spain is madrid",
    "the capital of japan is tokyo",
    "the currency of japan is yen",
    "paris is located in europe",
    "tokyo is located in asia",
]
PROBES = [("the capital of france is", "paris"), ("the capital of italy is", "rome"), ("tokyo is located in", "asia")]


def _accumulator(logdir: str) -> EventAccumulator:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _train_tiny(out, report_to: str):
    """Six steps of a tiny model with SeND, statistics and detectors attached by ``add_send``."""
    tok = make_tokenizer()
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to=[report_to],
        run_name=f"tiny-{report_to}",
        use_cpu=True,
        disable_tqdm=True,
        seed=1,
    )
    trainer = Trainer(
        model=make_tiny_llama(len(tok), seed=2),
        args=args,
        train_dataset=tokenize_texts(tok, STATEMENTS, 32),
        eval_dataset=tokenize_texts(tok, STATEMENTS[:4], 32),
        data_collator=CausalLMCollator(tok),
        processing_class=tok,
    )
    add_send(
        trainer,
        SeNDArguments(
            send_window_steps=1,
            send_num_checkpoints=2,
            send_drop_windows=2,
            send_layers="all",
            eigenscore_k=2,
            eigenscore_max_new_tokens=3,
            eigenscore_num_prompts=3,
            eigenscore_stop="none",
        ),
        tracking_dataset=["rome is located in europe", "the currency of italy is euro", "japan is located in asia"],
        probe_prompts=[p for p, _ in PROBES],
        probe_aliases=[[a] for _, a in PROBES],
        test_prompts=[p for p, _ in PROBES],
        test_aliases=[[a] for _, a in PROBES],
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    trainer = _train_tiny(out, "tensorboard")
    logdirs = {os.path.dirname(p) for p in glob.glob(str(out / "runs" / "*" / "events.out.tfevents.*"))}
    assert len(logdirs) == 1
    return trainer, _accumulator(logdirs.pop())


def test_tensorboard_tags(tb_run):
    trainer, acc = tb_run
    tags = acc.Tags()
    scalars, hists = set(tags["scalars"]), set(tags["histograms"])
    send = trainer.callback(SensitiveNeuronDropoutCallback)
    sites = sorted(send.selections[0]["neurons"])
    assert len(sites) == 4  # send_layers=all on a 4-block model
    for t in (
        "train/loss",
        "train/send/dropped",
        "train/send/windows_left",
        "train/send/tracking_ees",
        "train/send/selections",
        "train/stats/tokens",
        "train/stats/mean_variance",
        "eval/loss",
        "eval/eigenscore",
        "eval/factual_accuracy",
        "test/eigenscore",
        "test/factual_accuracy",
    ):
        assert t in scalars, (t, sorted(scalars))
    stat_sites = sorted(trainer.callback(ActivationStatsCallback).moments)
    for site in sites:
        assert f"send/neurons/{site}" in hists
    for site in stat_sites:
        assert f"stats/mean/{site}" in hists and f"stats/variance/{site}" in hists
    assert "eval/eigenscore_per_prompt" in hists and "test/eigenscore_per_prompt" in hists
    texts = [t for t in tags["tensors"] if t.startswith("send/neurons/")]
    assert texts, tags["tensors"]
    # the before/after test scores: before the first step and after the last
    assert [e.step for e in acc.Scalars("test/factual_accuracy")] == [0, 6]


def test_histograms_hold_the_values(tb_run):
    """Histogram counts, sums and ranges equal the selections, moments and per-prompt scores themselves."""
    trainer, acc = tb_run
    send = trainer.callback(SensitiveNeuronDropoutCallback)
    for sel in send.selections:
        for site, ix in sel["neurons"].items():
            ev = next(e for e in acc.Histograms(f"send/neurons/{site}") if e.step == sel["step"])
            h = ev.histogram_value
            assert h.num == len(ix) and h.sum == pytest.approx(sum(ix)) and h.min == min(ix) and h.max == max(ix)
    assert len(acc.Histograms(f"send/neurons/{sites_of(send)[0]}")) == len(send.selections)
    stats = trainer.callback(ActivationStatsCallback)
    site = sorted(stats.moments)[0]
    last = acc.Histograms(f"stats/variance/{site}")[-1].histogram_value
    var = stats.moments[site].variance.double().numpy()
    assert last.num == var.size and last.sum == pytest.approx(var.sum(), rel=1e-9)
    scalars = {e.step: e.value for e in acc.Scalars("train/stats/mean_variance")}
    assert scalars[6] == pytest.approx(float(np.mean([m.variance.mean() for m in stats.moments.values()])), rel=1e-5)
    es = acc.Histograms("test/eigenscore_per_prompt")[-1].histogram_value
    final = [e.value for e in acc.Scalars("test/eigenscore")][-1]
    assert es.num == len(PROBES) and es.sum / es.num == pytest.approx(final, rel=1e-5)


def sites_of(send):
    return sorted(send.selections[0]["neurons"])


def test_no_reporter_no_writes():
    """Without reporters the callback writes nothing and fails nothing."""

    class Handler:
        callbacks = []

    cb = SeNDReporterCallback(Handler())
    import torch

    assert cb.write_histograms({"x": torch.arange(3.0)}, 0) == []
    assert reporter_writers([]) == {}


# ----------------------------------------------------------------------------- Trackio and W&B (offline)
@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """Both trackers write under tmp_path only and never reach the network."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "neurodetox-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_PROJECT", "neurodetox-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _trackio_rows(folder) -> list[dict]:
    import json
    import sqlite3

    dbs = glob.glob(str(folder / "trackio" / "*.db"))
    assert len(dbs) == 1, dbs
    with sqlite3.connect(dbs[0]) as con:
        return [json.loads(m) for (m,) in con.execute("SELECT metrics FROM metrics ORDER BY id")]


def test_trackio_gets_every_metric_read_back_from_its_database(tracker_env):
    trainer = _train_tiny(tracker_env / "out", "trackio")
    rows = _trackio_rows(tracker_env)
    keys = set().union(*rows)
    send = trainer.callback(SensitiveNeuronDropoutCallback)
    sites = sites_of(send)
    for t in (
        "train/loss",
        "train/send/dropped",
        "train/send/selections",
        "train/stats/mean_variance",
        "eval/eigenscore",
        "eval/factual_accuracy",
        "test/eigenscore",
        "test/factual_accuracy",
        "eval/eigenscore_per_prompt",
        "test/eigenscore_per_prompt",
        "send/neurons",
    ):
        assert t in keys, (t, sorted(keys))
    for site in sites:
        assert f"send/neurons/{site}" in keys
    for site in trainer.callback(ActivationStatsCallback).moments:
        assert f"stats/mean/{site}" in keys and f"stats/variance/{site}" in keys
    # each selection's histogram holds exactly its indices, at the selection's optimizer step
    for sel in send.selections:
        for site, ix in sel["neurons"].items():
            (h,) = [
                r[f"send/neurons/{site}"]
                for r in rows
                if f"send/neurons/{site}" in r and r["train/global_step"] == sel["step"]
            ]
            assert h["_type"] == "trackio.histogram" and sum(h["values"]) == len(ix)
            assert min(h["bins"]) == pytest.approx(min(ix)) and max(h["bins"]) == pytest.approx(max(ix))
    tables = [r["send/neurons"] for r in rows if "send/neurons" in r]
    assert len(tables) == len(send.selections)


def test_wandb_offline_gets_histograms_and_the_index_tables(tracker_env, monkeypatch):
    import json

    import wandb

    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):  # record what reaches the real offline run, then log it
        logged.append(dict(data))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    trainer = _train_tiny(tracker_env / "out", "wandb")
    wandb.finish()
    send = trainer.callback(SensitiveNeuronDropoutCallback)
    hists = {k: v for d in logged for k, v in d.items() if isinstance(v, wandb.Histogram)}
    for site in sites_of(send):
        assert f"send/neurons/{site}" in hists
    assert "test/eigenscore_per_prompt" in hists and "eval/eigenscore_per_prompt" in hists
    last = send.selections[-1]
    site, ix = next(iter(last["neurons"].items()))
    assert sum(hists[f"send/neurons/{site}"].histogram) == len(ix)
    scalars = {k for d in logged for k, v in d.items() if isinstance(v, (int, float))}
    assert {"test/factual_accuracy", "train/send/dropped", "eval/eigenscore"} <= scalars
    # the offline run wrote each selection's index table to disk: read it back
    files = sorted(
        glob.glob(str(tracker_env / "wandb" / "offline-run-*" / "files" / "media" / "table" / "send" / "*.json"))
    )
    assert len(files) == len(send.selections)
    tables = [json.loads(open(f).read()) for f in files]
    got = sorted(tuple(r) for t in tables for r in t["data"])
    want = sorted(
        (s["step"], s.get("window"), site, i) for s in send.selections for site, ix in s["neurons"].items() for i in ix
    )
    assert got == want

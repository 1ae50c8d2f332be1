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


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
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
        report_to=["tensorboard"],
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

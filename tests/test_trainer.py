"""SeNDTrainer on a tiny model: selections, exact resume, atomic checkpoints, bad input."""

import json
import os

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from transformers import TrainerCallback

from neurodetox.data.lm import tokenize_texts
from neurodetox.send import SeNDConfig, SeNDTrainer, last_checkpoint
from neurodetox.send.callbacks import ActivationStatsCallback, SensitiveNeuronDropoutCallback


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = False


TEXTS = [
    "the capital of france is paris .",
    "the capital of germany is berlin .",
    "the capital of italy is rome .",
    "the capital of spain is madrid .",
    "japan is located in asia .",
    "the currency of japan is the yen .",
    "france is located in europe .",
    "the capital of japan is tokyo .",
] * 4


def _trainer(out, max_steps=24, tracking=True, **overrides):
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), seed=0)
    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        send_window_steps=4,
        send_site="mlp",
        send_layers="1,2",
        send_drop_windows=2,
        save_strategy="steps",
        save_steps=8,
        logging_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=3e-3,
        seed=0,
        data_seed=0,
        eigenscore_num_prompts=0,
    )
    kw.update(overrides)
    args = SeNDConfig(**kw)
    track = tokenize_texts(tok, TEXTS[:6]) if tracking else []
    return SeNDTrainer(
        model=model, args=args, train_dataset=tokenize_texts(tok, TEXTS), tracking_dataset=track, processing_class=tok
    )


def test_selections_follow_the_schedule(tmp_path):
    tr = _trainer(tmp_path / "run")
    tr.train()
    cb = tr.callback(SensitiveNeuronDropoutCallback)
    # recordings at steps 0, 4, 8 -> first selection at 8; T = 2 windows -> reselect at 16; step 24 is the end
    assert [s["step"] for s in cb.selections] == [8, 16]
    for sel in cb.selections:
        assert set(sel["neurons"]) == {"mlp.1", "mlp.2"}
        assert all(len(v) == round(0.2 * 64) for v in sel["neurons"].values())
    # the selection is the top-K of V over the recorded history (checked independently)
    hist = cb.history  # last C recordings, ends at step 20 -> not the ones used; recompute from saved checkpoint
    ck = tmp_path / "run" / "checkpoint-16"
    state = json.loads((ck / "neurodetox_send_state.json").read_text())
    assert state["history_steps"] == [8, 12, 16]
    from safetensors.torch import load_file

    t = load_file(str(ck / "neurodetox_send_state.safetensors"))
    h = torch.stack([t[f"history.{i}.mlp.2"] for i in range(3)]).double()
    v = ((h[1:] - h[:-1]).abs().sum(0) * h.var(0, unbiased=False)).mean(0)
    expect = sorted(torch.argsort(v, descending=True, stable=True)[:13].tolist())
    assert state["selections"][-1]["neurons"]["mlp.2"] == expect
    assert len(hist) == 3


def test_resume_reproduces_uninterrupted_selections(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()
    ref = full.callback(SensitiveNeuronDropoutCallback).selections
    ref_stats = full.callback(ActivationStatsCallback).moments["mlp.0"]

    # the same run, killed at step 12 (its last checkpoint is step 8, inside a drop window)
    killed = _trainer(tmp_path / "part")
    killed.add_callback(_StopAt(12))
    killed.train()
    assert last_checkpoint(str(tmp_path / "part")).endswith("checkpoint-8")
    resumed = _trainer(tmp_path / "part", max_steps=24)
    resumed.train(resume_from_checkpoint=True)
    got = resumed.callback(SensitiveNeuronDropoutCallback).selections
    assert got == ref
    got_stats = resumed.callback(ActivationStatsCallback).moments["mlp.0"]
    assert got_stats.count == ref_stats.count
    torch.testing.assert_close(got_stats.mean, ref_stats.mean, rtol=1e-6, atol=1e-9)


def test_random_mode_same_schedule_and_off_mode(tmp_path):
    tr = _trainer(tmp_path / "rand", send_mode="random")
    tr.train()
    sel = tr.callback(SensitiveNeuronDropoutCallback).selections
    assert [s["step"] for s in sel] == [8, 16] and sel[0]["neurons"] != sel[1]["neurons"]
    off = _trainer(tmp_path / "off", send_mode="off", tracking=False)
    assert off.callback(SensitiveNeuronDropoutCallback) is None
    off.train()


def test_killed_checkpoint_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    tr = _trainer(tmp_path / "run", max_steps=8)
    cb = tr.callback(SensitiveNeuronDropoutCallback)

    def boom(directory):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(cb, "save_state", boom)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    run = tmp_path / "run"
    assert not any(n.startswith("checkpoint-") for n in os.listdir(run))
    assert last_checkpoint(str(run)) is None


def test_checkpoint_holds_callback_state_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    tr = _trainer(tmp_path / "run", max_steps=8)
    tr.train()
    ck = last_checkpoint(str(tmp_path / "run"))
    names = set(os.listdir(ck))
    assert {"neurodetox_send_state.json", "neurodetox_activation_stats.safetensors", "model.safetensors"} <= names
    AutoModelForCausalLM.from_pretrained(ck)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(send_drop_fraction=1.0), r"send_drop_fraction=1.0 is invalid: must be in \(0, 1\)"),
        (dict(send_drop_fraction=0.0), r"send_drop_fraction"),
        (dict(send_layers="7"), r"layer 7 is out of range"),
        (dict(send_site="attn"), r"send_site='attn' is invalid"),
        (dict(send_mode="sometimes"), r"send_mode='sometimes'"),
        (dict(eigenscore_k=1), r"eigenscore_k=1"),
        (dict(eigenscore_alpha=0.0), r"eigenscore_alpha"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path / "bad", **overrides)
    assert not (tmp_path / "bad").exists() or not os.listdir(tmp_path / "bad")


def test_empty_tracking_set_and_too_long_window(tmp_path):
    with pytest.raises(ValueError, match="non-empty tracking set"):
        _trainer(tmp_path / "a", tracking=False)
    tr = _trainer(tmp_path / "b", max_steps=4, send_window_steps=10)
    with pytest.raises(ValueError, match="longer than the run"):
        tr.train()
    assert last_checkpoint(str(tmp_path / "b")) is None


def test_site_hidden_by_a_wrapper_is_refused(tmp_path):
    import torch.nn.functional as F

    tok = make_tokenizer()
    model = make_tiny_llama(len(tok))
    mlp = model.model.layers[1].mlp
    # a wrapper that computes the FFN without calling its down_proj module: hooks there never fire
    mlp.forward = lambda x: F.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)
    args = SeNDConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        send_site="mlp",
        send_layers="all",
        report_to=[],
        use_cpu=True,
        eigenscore_num_prompts=0,
        activation_stats_site="none",
    )
    with pytest.raises(ValueError, match=r"never reached site\(s\) mlp.1 \(model.layers.1.mlp.down_proj\)"):
        SeNDTrainer(
            model=model,
            args=args,
            train_dataset=tokenize_texts(tok, TEXTS),
            tracking_dataset=tokenize_texts(tok, TEXTS[:4]),
            processing_class=tok,
        )


def test_stopping_rule_loss_and_ees(tmp_path):
    from neurodetox.metrics.ees import exact_log_det_mean

    # thresholds no run can meet: trains to the end, but the EES monitor is logged at every recording
    tr = _trainer(tmp_path / "a", send_stop_loss=-1.0, send_stop_ees=-1e9)
    tr.train()
    cb = tr.callback(SensitiveNeuronDropoutCallback)
    assert tr.state.global_step == 24
    assert [r["step"] for r in cb.ees_history] == [0, 4, 8, 12, 16, 20]
    # the monitored value is the exact dataset-level EigenScore of the last recording (N=6 ≤ d: exact route)
    last = torch.cat([cb.history[-1][k] for k in sorted(cb.history[-1])], dim=1)
    assert abs(cb.ees_history[-1]["ees"] - exact_log_det_mean(last, alpha=1e-3)) < 1e-6
    # thresholds every run meets: stops at the first window end with a logged loss (logged at step 4,
    # after that step's window end), i.e. step 8
    tr = _trainer(tmp_path / "b", send_stop_loss=1e9, send_stop_ees=1e9)
    tr.train()
    assert tr.state.global_step == 8
    # only the EES condition: stops at the very first window end
    tr = _trainer(tmp_path / "c", send_stop_ees=1e9)
    tr.train()
    assert tr.state.global_step == 4


@pytest.mark.parametrize("zero3", [False, True])
def test_tracking_embeddings_equal_one_item_reference_in_dataset_order(monkeypatch, zero3):
    """Length-sorted batches and the early stop change nothing: each item's embedding equals its own
    unbatched forward (independent ``output_hidden_states`` route), in tracking-set order; the LM head
    does not run unless ZeRO-3 needs every forward to complete."""
    import neurodetox.send.callbacks.sensitive_dropout as sd
    from neurodetox.data.lm import CausalLMCollator

    monkeypatch.setattr(sd, "zero3_enabled", lambda: zero3)
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), seed=0)
    texts = [
        "the capital of france is paris .",
        "japan .",
        "the currency of japan is the yen , they say .",
        "france is located in europe .",
        "rome",
        "the capital of spain is madrid .",
    ]
    track = tokenize_texts(tok, texts)
    assert sorted(len(t["input_ids"]) for t in track) != [len(t["input_ids"]) for t in track]  # sorting permutes
    n_layers = model.config.num_hidden_layers
    cb = SensitiveNeuronDropoutCallback(
        track, CausalLMCollator(tok), site="residual", layers="penultimate", batch_size=4
    )
    head_calls = []
    h = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    got = cb.record_embeddings(model)
    h.remove()
    assert (len(head_calls) > 0) == zero3
    key = f"residual.{n_layers - 2}"
    assert set(got) == {key}
    model.eval()
    with torch.no_grad():
        for i, item in enumerate(track):
            hs = model(input_ids=torch.tensor([item["input_ids"]]), output_hidden_states=True).hidden_states
            act = hs[n_layers - 1][0].double()  # output of block n_layers - 2
            ref = 0.5 * (act.mean(0) + act[-1])
            torch.testing.assert_close(got[key][i].double(), ref, rtol=1e-5, atol=1e-6)

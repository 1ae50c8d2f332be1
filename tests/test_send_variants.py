"""SeND variants on a tiny model: the released code's procedure, scale-free scores, massive-dimension
exclusion, the mlp site over several layers, and their bad-input errors (before training)."""

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

from neurodetox.core.errors import UserError
from neurodetox.data.lm import tokenize_texts
from neurodetox.send import SeNDConfig, SeNDTrainer
from neurodetox.send.callbacks import SensitiveNeuronDropoutCallback
from neurodetox.send.masks import MLPWeightDrop, freeze_blocks
from neurodetox.send.sensitivity import massive_indices, mean_abs_activation, released_sensitivity, top_fraction

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


def _trainer(out, model=None, **overrides):
    tok = make_tokenizer()
    model = model if model is not None else make_tiny_llama(len(tok), seed=0)
    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=16,
        send_window_steps=4,
        send_drop_windows=2,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=3e-3,
        seed=0,
        data_seed=0,
        eigenscore_num_prompts=0,
        activation_stats_site="none",
    )
    kw.update(overrides)
    return SeNDTrainer(
        model=model,
        args=SeNDConfig(**kw),
        train_dataset=tokenize_texts(tok, TEXTS),
        tracking_dataset=tokenize_texts(tok, TEXTS[:6]),
        processing_class=tok,
    )


class _Snapshot(TrainerCallback):
    """Copies of block 2's FFN weights right after each window end (after SeND acted)."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        mlp = model.model.layers[2].mlp
        self.after[state.global_step] = {
            n: getattr(mlp, n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")
        }


def test_released_procedure_zeroes_ffn_weights_per_window_regrows_and_freezes(tmp_path):
    tr = _trainer(tmp_path / "rel", send_procedure="released")
    snap = _Snapshot()
    tr.add_callback(snap)  # runs after the SeND callback (added at construction)
    cb = tr.callback(SensitiveNeuronDropoutCallback)
    # min(24, L) = all 4 blocks frozen by default: no block parameter trains
    assert cb.frozen_blocks == 4 and not any(p.requires_grad for p in tr.model.model.layers.parameters())
    tr2 = _trainer(tmp_path / "rel2", send_procedure="released", send_freeze_blocks=2)
    snap2 = _Snapshot()
    tr2.add_callback(snap2)
    before0 = {k: v.detach().clone() for k, v in tr2.model.model.layers[0].state_dict().items()}
    tr2.train()
    cb2 = tr2.callback(SensitiveNeuronDropoutCallback)
    assert [s["step"] for s in cb2.selections] == [8]
    sel = cb2.selections[0]["neurons"]["residual.2"]
    assert len(sel) == round(0.2 * 32)
    # zeroed at step 8 (selection) and again at step 12 (next window of the selection), not at 16
    for step in (8, 12):
        w = snap2.after[step]
        assert torch.all(w["gate_proj"][sel] == 0) and torch.all(w["up_proj"][sel] == 0)
        assert torch.all(w["down_proj"][:, sel] == 0)
        assert w["gate_proj"][[i for i in range(64) if i not in sel]].abs().sum() > 0
    # regrowable: block 2 trains (not frozen), so one step later the zeroed weights moved
    assert snap2.after[9]["down_proj"][:, sel].abs().sum() > 0
    # frozen blocks 0-1 did not change; blocks 2-3 did
    after0 = tr2.model.model.layers[0].state_dict()
    assert all(torch.equal(before0[k], after0[k]) for k in before0)
    assert all(p.requires_grad for p in tr2.model.model.layers[3].parameters())
    # no mask: the released procedure changes weights only
    assert cb2._dropout is None


def test_released_selection_uses_the_items_axis(tmp_path):
    tr = _trainer(tmp_path / "rel", send_procedure="released", send_freeze_blocks=0, max_steps=12)
    tr.train()
    cb = tr.callback(SensitiveNeuronDropoutCallback)
    state_hist = torch.stack([h["residual.2"] for h in cb.history])  # recordings 4, 8 (12 is the end)
    assert [s["step"] for s in cb.selections] == [8]
    assert list(cb.history_steps) == [0, 4, 8]
    expect = top_fraction(released_sensitivity(state_hist), 0.2).tolist()
    assert cb.selections[0]["neurons"]["residual.2"] == expect


def test_released_procedure_refuses_a_narrow_ffn_before_training(tmp_path):
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    narrow = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UserError, match=r"d_ff=16 < 32 neurons: use send_procedure=paper"):
        _trainer(tmp_path / "narrow", model=narrow, send_procedure="released")
    _trainer(tmp_path / "paper", model=narrow)  # the paper's procedure has no such requirement


def test_mlp_weight_drop_zeroes_exactly_the_neuron_rows_and_columns(tiny_llama):
    from neurodetox.core.sites import resolve_sites

    sites = resolve_sites(tiny_llama, "residual", [1])
    drop = MLPWeightDrop(tiny_llama, sites)
    mlp = tiny_llama.model.layers[1].mlp
    ref = {n: getattr(mlp, n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}
    other = tiny_llama.model.layers[2].mlp.down_proj.weight.detach().clone()
    done = drop.apply({"residual.1": [3, 0, 3]})
    assert done == {"mlp.1": [0, 3]}
    ref["gate_proj"][[0, 3]] = 0
    ref["up_proj"][[0, 3]] = 0
    ref["down_proj"][:, [0, 3]] = 0
    for n, w in ref.items():
        assert torch.equal(getattr(mlp, n).weight, w)
    assert torch.equal(tiny_llama.model.layers[2].mlp.down_proj.weight, other)
    assert freeze_blocks(tiny_llama, 99) == 4


def test_scale_free_score_selects_from_the_recorded_history(tmp_path):
    tr = _trainer(tmp_path / "nrm", send_score="normalized", send_site="mlp", send_layers="1,3", max_steps=12)
    tr.train()
    cb = tr.callback(SensitiveNeuronDropoutCallback)
    sel = cb.selections[0]
    assert set(sel["neurons"]) == {"mlp.1", "mlp.3"}  # the mlp site over several layers
    for key in ("mlp.1", "mlp.3"):
        h = torch.stack([x[key] for x in cb.history]).double()
        rms = h.pow(2).mean((0, 1)).sqrt()
        z = h / rms
        v = ((z[1:] - z[:-1]).abs().sum(0) * z.var(0, unbiased=False)).mean(0)
        assert sel["neurons"][key] == sorted(torch.argsort(v, descending=True, stable=True)[:13].tolist())
        assert len(sel["mean_abs"][key]) == 64


def test_massive_exclusion_never_selects_massive_dimensions(tmp_path):
    tr = _trainer(tmp_path / "mass", send_massive_factor=1.5, max_steps=12)
    tr.train()
    cb = tr.callback(SensitiveNeuronDropoutCallback)
    sel = cb.selections[0]
    newest = cb.history[-1]["residual.2"]
    expect = massive_indices(mean_abs_activation(newest), 1.5).tolist()
    assert sel["massive"]["residual.2"] == expect and expect
    assert not set(expect) & set(sel["neurons"]["residual.2"])
    # random mode draws from the same non-massive pool
    tr = _trainer(tmp_path / "mass-r", send_mode="random", send_massive_factor=1.5, max_steps=12)
    tr.train()
    sel = tr.callback(SensitiveNeuronDropoutCallback).selections[0]
    assert sel["massive"]["residual.2"] and not set(sel["massive"]["residual.2"]) & set(sel["neurons"]["residual.2"])


def test_too_greedy_exclusion_fails_before_the_first_step(tmp_path):
    tr = _trainer(tmp_path / "greedy", send_massive_factor=1.01, send_drop_fraction=0.9)
    with pytest.raises(UserError, match=r"massive-dimension exclusion leaves \d+ of 32 indices at site residual.2"):
        tr.train()
    assert tr.state.global_step == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(send_procedure="authors"), "send_procedure='authors' is invalid: must be one of paper, released"),
        (dict(send_score="zscore"), "send_score='zscore' is invalid"),
        (dict(send_massive_factor=0.5), "send_massive_factor=0.5 is invalid: must be 0 (off) or > 1"),
        (dict(send_freeze_blocks=-1), "send_freeze_blocks=-1 is invalid"),
        (dict(send_procedure="released", send_site="mlp"), "send_site='mlp' is invalid: must be 'residual'"),
        (dict(send_procedure="released", send_score="normalized"), "send_score='normalized' is invalid"),
    ],
)
def test_config_refuses_bad_variant_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError) as e:
        SeNDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)
    assert message in str(e.value)


def test_state_records_the_variant_and_resume_refuses_another(tmp_path):
    tr = _trainer(tmp_path / "a", send_score="standardized", max_steps=12, save_strategy="steps", save_steps=8)
    tr.train()
    meta = json.loads((tmp_path / "a" / "checkpoint-8" / "neurodetox_send_state.json").read_text())
    assert meta["score"] == "standardized" and meta["procedure"] == "paper"
    other = _trainer(tmp_path / "a", send_score="raw", max_steps=12)
    with pytest.raises(ValueError, match="score='standardized'"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))


def test_add_send_passes_the_variant_settings_to_any_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from neurodetox.data.lm import CausalLMCollator
    from neurodetox.send.integration import SeNDArguments, add_send

    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenize_texts(tok, TEXTS),
        data_collator=CausalLMCollator(tok),
        processing_class=tok,
    )
    send_args = SeNDArguments(
        send_procedure="released", send_freeze_blocks=1, send_massive_factor=5.0, activation_stats_site="none"
    )
    add_send(trainer, send_args, tracking_dataset=TEXTS[:6])
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SensitiveNeuronDropoutCallback))
    assert (cb.procedure, cb.massive_factor, cb.frozen_blocks) == ("released", 5.0, 1)
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())


def test_freeze_blocks_applies_to_the_paper_procedure_too(tmp_path):
    tr = _trainer(tmp_path / "frz", send_freeze_blocks=3)
    assert tr.callback(SensitiveNeuronDropoutCallback).frozen_blocks == 3
    assert not any(p.requires_grad for b in tr.model.model.layers[:3] for p in b.parameters())
    assert all(p.requires_grad for p in tr.model.model.layers[3].parameters())
    assert _trainer(tmp_path / "none").callback(SensitiveNeuronDropoutCallback).frozen_blocks == 0

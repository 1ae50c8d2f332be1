"""SeND and the hallucination metrics in TRL's SFTTrainer (issue 20), on a tiny random Llama, CPU.

References are independent of the code under test: the selections of ``SeNDTrainer`` (what
``neurodetox train`` runs) on the same data and seed, and labels recomputed from the
tokenizer's chat template.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from neurodetox.core.errors import UserError
from neurodetox.data.lm import CausalLMCollator, tokenize_texts
from neurodetox.metrics.callback import EigenScoreCallback
from neurodetox.metrics.settings import EigenScoreSettings
from neurodetox.send import SeNDConfig, SeNDTrainer
from neurodetox.send.callbacks import ActivationStatsCallback, SensitiveNeuronDropoutCallback
from neurodetox.send.integration import SeNDArguments, SeNDMixin, add_send, tokenize_tracking

#: Chat template of the word-level test tokenizer (every word is in its vocabulary).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}q : {{ m['content'] }}"
    "{% else %} answer : {{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)
FACTS = [
    ("the capital of france is", "paris"),
    ("the capital of germany is", "berlin"),
    ("the capital of italy is", "rome"),
    ("the capital of spain is", "madrid"),
    ("the capital of japan is", "tokyo"),
    ("the currency of japan is", "yen"),
    ("the currency of france is", "euro"),
    ("paris is located in", "europe"),
    ("tokyo is located in", "asia"),
    ("berlin is located in", "europe"),
    ("the currency of spain is", "euro"),
    ("madrid is located in", "europe"),
]
TRACKING = [
    "rome is located in europe",
    "the currency of italy is euro",
    "the capital of japan is tokyo",
    "japan is located in asia",
]
#: transformers 5 renamed gradient_checkpointing (the old name warns); older versions only know the old one.
CKPT = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)
SEND = dict(
    send_window_steps=2,
    send_num_checkpoints=2,
    send_drop_windows=1,
    send_layers="all",
    send_drop_fraction=0.25,
    send_tracking_batch_size=3,
)
TRAIN = dict(
    max_steps=8,
    per_device_train_batch_size=4,
    learning_rate=5e-3,
    seed=3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    bf16=False,
    **{CKPT: False},
)


def _chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _no_probes():
    return dict(eigenscore_num_prompts=0)


def test_selections_equal_send_trainer(tmp_path):
    """SFTTrainer + add_send selects bit-identical neurons to SeNDTrainer on the same data and seed."""
    tok = make_tokenizer()
    statements = [f"{p} {a}" for p, a in FACTS]
    train = tokenize_texts(tok, statements, 32)
    tracking = tokenize_texts(tok, TRACKING, 32)

    ref = SeNDTrainer(
        model=make_tiny_llama(len(tok), seed=11),
        args=SeNDConfig(output_dir=str(tmp_path / "ref"), **TRAIN, **SEND, **_no_probes()),
        train_dataset=train,
        tracking_dataset=tracking,
        processing_class=tok,
    )
    ref.train()
    ref_sel = ref.callback(SensitiveNeuronDropoutCallback).selections

    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), **TRAIN)
    sft = SFTTrainer(
        model=make_tiny_llama(len(tok), seed=11),
        args=cfg,
        train_dataset=Dataset.from_list(train),
        processing_class=tok,
    )
    add_send(sft, SeNDArguments(**SEND, **_no_probes()), tracking_dataset=TRACKING)
    assert isinstance(sft, SFTTrainer) and isinstance(sft, SeNDMixin) and sft.args is cfg
    sft.train()
    sel = sft.callback(SensitiveNeuronDropoutCallback).selections

    assert len(ref_sel) == 3  # windows end at steps 2, 4, 6; C = 2 recordings from step 2 on
    assert [(s["step"], s["window"]) for s in sel] == [(s["step"], s["window"]) for s in ref_sel]
    for a, b in zip(sel, ref_sel):
        assert a["neurons"] == b["neurons"]  # bit-exact indices at every site
    # the tracking recordings themselves are identical, not only their top fraction
    h_ref = ref.callback(SensitiveNeuronDropoutCallback).history
    h = sft.callback(SensitiveNeuronDropoutCallback).history
    for a, b in zip(h, h_ref):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _chat_rows(facts):
    return [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}]}
        for p, a in facts
    ]


def test_sft_chat_completion_only(tmp_path):
    """Chat data, completion-only loss: host collator kept, prompt labels -100, metrics in log_history."""
    tok = _chat_tokenizer()
    model = make_tiny_llama(len(tok), seed=5)
    cfg = SFTConfig(
        output_dir=str(tmp_path / "chat"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=Dataset.from_list(_chat_rows(FACTS)),
        eval_dataset=Dataset.from_list(_chat_rows(FACTS[:4])),
        processing_class=tok,
    )
    assert trainer.completion_only_loss
    collator = trainer.data_collator
    assert isinstance(collator, DataCollatorForLanguageModeling)
    add_send(
        trainer,
        SeNDArguments(
            send_window_steps=1,
            send_num_checkpoints=2,
            send_drop_windows=1,
            eigenscore_k=2,
            eigenscore_max_new_tokens=3,
            eigenscore_num_prompts=3,
            eigenscore_prompt_format="chat",
            eigenscore_stop="none",
        ),
        tracking_dataset=_chat_rows([("rome is located in", "europe"), ("the currency of italy is", "euro")]),
        probe_prompts=[p for p, _ in FACTS[:3]],
        probe_aliases=[[a] for _, a in FACTS[:3]],
        test_prompts=[p for p, _ in FACTS[3:6]],
        test_aliases=[[a] for _, a in FACTS[3:6]],
    )
    assert trainer.data_collator is collator  # the host's collator is kept
    # SFTConfig's own defaults survive (no dataclass inheritance restoring Trainer's)
    assert getattr(cfg, CKPT) is True and cfg.logging_steps == 2 and trainer.args is cfg

    seen = []

    def grab(module, args, kwargs):
        if module.training and "labels" in kwargs:
            seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), kwargs["labels"].clone()))

    handle = trainer.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()

    # independent reference: labels from the chat template, prompt tokens masked
    expected = {}
    for p, a in FACTS:
        prompt_ids = tok(
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        full = tok(
            tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": a}], tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids
        expected[tuple(full)] = [-100] * len(prompt_ids) + full[len(prompt_ids) :]
    assert len(seen) >= 4
    rows = 0
    for ids, mask, labels in seen:
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            key = tuple(ids[i, :n].tolist())
            assert key in expected
            assert labels[i, :n].tolist() == expected[key]
            assert (labels[i, n:] == -100).all()
            rows += 1
    assert rows >= 16

    send = trainer.callback(SensitiveNeuronDropoutCallback)
    assert send.selections, "SeND never selected neurons"
    hist = trainer.state.log_history
    keys = set().union(*hist)
    for k in ("send/dropped", "send/tracking_ees", "stats/tokens", "stats/mean_variance", "send/selections"):
        assert k in keys, k
    for k in ("eval_eigenscore", "eval_factual_accuracy", "test_eigenscore", "test_factual_accuracy"):
        assert k in keys, k
    evals = [r for r in hist if "eval_eigenscore" in r]
    assert [r["step"] for r in evals] == [2, 4]
    tests = [r for r in hist if "test_factual_accuracy" in r]
    assert [r["step"] for r in tests] == [0, 4]  # before the first step, after the last
    # the activation statistics counted exactly the real tokens of every training forward
    stats = trainer.callback(ActivationStatsCallback)
    n_tokens = sum(int(m.sum()) for _, m, _ in seen)
    assert all(m.count == n_tokens for m in stats.moments.values())


def test_mixin_class_keeps_host_and_probes_use_chat_template(tmp_path):
    """class X(SeNDMixin, SFTTrainer) takes the SeND keywords; EigenScoreSettings follow SeNDArguments."""

    class SeNDSFT(SeNDMixin, SFTTrainer):
        pass

    tok = _chat_tokenizer()
    args = SeNDArguments(send_mode="off", eigenscore_prompt_format="chat", eigenscore_k=3, eigenscore_num_prompts=2)
    trainer = SeNDSFT(
        model=make_tiny_llama(len(tok)),
        args=SFTConfig(output_dir=str(tmp_path / "m"), max_steps=1, report_to=[], use_cpu=True, bf16=False),
        train_dataset=Dataset.from_list(_chat_rows(FACTS[:4])),
        processing_class=tok,
        send_args=args,
        probe_prompts=["the capital of france is", "a", "b"],
        probe_aliases=[["paris"], ["x"], ["y"]],
    )
    es = trainer.callback(EigenScoreCallback)
    assert es.prompts == ["the capital of france is", "a"]  # first eigenscore_num_prompts
    assert es.settings == EigenScoreSettings(k=3, prompt_format="chat", seed=trainer.args.seed)
    assert trainer.callback(SensitiveNeuronDropoutCallback) is None  # send_mode off


def test_send_arguments_checks():
    with pytest.raises(UserError, match="send_drop_fraction"):
        SeNDArguments(send_drop_fraction=1.0)
    with pytest.raises(UserError, match="send_num_checkpoints"):
        SeNDArguments(send_num_checkpoints=1)
    with pytest.raises(UserError, match="eigenscore_k"):
        SeNDArguments(eigenscore_k=1)
    with pytest.raises(UserError, match="send_site"):
        SeNDArguments(send_site="attention")
    # same fields and defaults as SeNDConfig's
    ours = {f.name: f.default for f in dataclasses.fields(SeNDArguments)}
    theirs = {f.name: f.default for f in dataclasses.fields(SeNDConfig) if f.name in ours}
    assert ours == theirs and "send_mode" in ours and "learning_rate" not in ours


def test_add_send_errors(tmp_path):
    tok = make_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path / "e"), report_to=[], use_cpu=True, max_steps=1)
    trainer = Trainer(model=make_tiny_llama(len(tok)), args=args, processing_class=tok)
    with pytest.raises(UserError, match="tracking set of at least 2"):
        add_send(trainer, SeNDArguments(), tracking_dataset=["one item only"])
    trainer = Trainer(model=make_tiny_llama(len(tok)), args=args, processing_class=tok)
    add_send(trainer, SeNDArguments(send_mode="off"))
    with pytest.raises(UserError, match="already attached"):
        add_send(trainer, SeNDArguments(send_mode="off"))


def test_tokenize_tracking_formats():
    tok = _chat_tokenizer()
    plain = tokenize_tracking(tok, ["the capital of france is paris"])
    assert plain[0]["input_ids"] == tok("the capital of france is paris")["input_ids"]
    assert tokenize_tracking(tok, [{"text": "the capital of france is paris"}]) == plain
    chat = tokenize_tracking(tok, _chat_rows([("the capital of france is", "paris")]))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "the capital of france is"}, {"role": "assistant", "content": "paris"}],
        tokenize=False,
    )
    assert chat[0]["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    given = [{"input_ids": [3, 4, 5]}]
    assert tokenize_tracking(tok, given) == [{"input_ids": [3, 4, 5], "attention_mask": [1, 1, 1]}]
    with pytest.raises(UserError, match="tracking item 0"):
        tokenize_tracking(tok, [{"question": "x"}])
    with pytest.raises(UserError, match="empty"):
        tokenize_tracking(tok, [])


@pytest.mark.parametrize("host", ["Trainer", "SFTTrainer"])
def test_eigenscore_callback_fails_loudly_without_evaluation_hook(tmp_path, host):
    """Passed to a trainer that never calls it, the callback stops training at on_train_begin, naming add_send."""
    tok = _chat_tokenizer()
    cb = EigenScoreCallback(tok, ["the capital of france is"], [["paris"]], EigenScoreSettings(k=2))
    common = dict(output_dir=str(tmp_path / host), max_steps=1, report_to=[], use_cpu=True)
    if host == "Trainer":
        trainer = Trainer(
            model=make_tiny_llama(len(tok)),
            args=TrainingArguments(**common),
            train_dataset=tokenize_texts(tok, ["the capital of france is paris"] * 4, 16),
            data_collator=CausalLMCollator(tok),
            callbacks=[cb],
        )
    else:
        trainer = SFTTrainer(
            model=make_tiny_llama(len(tok)),
            args=SFTConfig(**common, bf16=False),
            train_dataset=Dataset.from_list(_chat_rows(FACTS[:4])),
            processing_class=tok,
            callbacks=[cb],
        )
    with pytest.raises(UserError, match="add_send"):
        trainer.train()
    assert trainer.state.global_step == 0
    # the same callback runs once the trainer gets the evaluation hook
    assert isinstance(add_send(trainer, SeNDArguments(send_mode="off", activation_stats_site="none")), SeNDMixin)


def test_resume_restores_send_state(tmp_path):
    """SFTTrainer + add_send killed after a checkpoint and resumed selects what the uninterrupted run selects."""
    tok = make_tokenizer()
    train = Dataset.from_list(tokenize_texts(tok, [f"{p} {a}" for p, a in FACTS], 32))
    common = {**TRAIN, "save_strategy": "steps", "save_steps": 4}

    def run(out, max_steps, resume=None):
        trainer = SFTTrainer(
            model=make_tiny_llama(len(tok), seed=11),
            args=SFTConfig(output_dir=str(out), **{**common, "max_steps": max_steps}),
            train_dataset=train,
            processing_class=tok,
        )
        add_send(trainer, SeNDArguments(**SEND, **_no_probes()), tracking_dataset=TRACKING)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.callback(SensitiveNeuronDropoutCallback)

    full = run(tmp_path / "full", 8)
    # a first run stopped at step 4 (its checkpoint holds the SeND state), then resumed to step 8
    first = SFTTrainer(
        model=make_tiny_llama(len(tok), seed=11),
        args=SFTConfig(output_dir=str(tmp_path / "part"), **common),
        train_dataset=train,
        processing_class=tok,
    )
    add_send(first, SeNDArguments(**SEND, **_no_probes()), tracking_dataset=TRACKING)
    first.callback_handler.add_callback(_StopAt(4))
    first.train()
    assert (tmp_path / "part" / "checkpoint-4" / "neurodetox_send_state.json").is_file()
    resumed = run(tmp_path / "part", 8, resume=True)
    assert [s["neurons"] for s in resumed.selections] == [s["neurons"] for s in full.selections]
    assert [s["step"] for s in resumed.selections] == [2, 4, 6]


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_send_arguments_parse_next_to_sft_config(tmp_path):
    """A TRL script adds SeNDArguments to its parser: SFTConfig keeps its own defaults, SeND fields parse."""
    from transformers import HfArgumentParser

    cfg, send = HfArgumentParser((SFTConfig, SeNDArguments)).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "true",
            "--send_window_steps",
            "5",
            "--eigenscore_prompt_format",
            "chat",
        ]
    )
    assert send.send_window_steps == 5 and send.eigenscore_prompt_format == "chat" and send.send_mode == "send"
    assert cfg.learning_rate == SFTConfig.learning_rate == 2e-5 and cfg.logging_steps == 10
    with pytest.raises(UserError, match="send_drop_fraction"):
        HfArgumentParser(SeNDArguments).parse_args_into_dataclasses(["--send_drop_fraction", "0"])

"""Detectors checked against independent references: LM-Polygraph's EigenScore estimator
(reimplemented from its definition), hand-computed semantic entropy, sequence probability and
LN-entropy, the answer boundary's stop set, prompt formats and the hidden-state probe."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.linalg import eigh
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from neurodetox.core.errors import UserError
from neurodetox.metrics import (
    EigenScoreSettings,
    HiddenStateProbe,
    distinct_answers,
    eigenscore,
    format_prompts,
    length_normalized_entropy,
    semantic_entropy,
    sequence_nll,
    stop_token_ids,
)
from neurodetox.metrics.boundary import QA1SHOT_TEMPLATE
from neurodetox.metrics.callback import EigenScoreCallback
from neurodetox.metrics.probes import UNSUPERVISED_SCORES, score_probes
from neurodetox.metrics.sampling import greedy_answers
from neurodetox.metrics.settings import DEFAULTS, parse_stop


def polygraph_eigenscore(embeddings: np.ndarray, alpha: float) -> float:
    """LM-Polygraph's estimator (IINemo/lm-polygraph, src/lm_polygraph/estimators/eigenscore.py),
    reimplemented from its definition: J_d = I − 11ᵀ/d, C = Z J_d Zᵀ (no 1/(d−1)), mean ln of the
    eigenvalues of C + αI (values ≤ 0 replaced by 1e-10)."""
    z = np.asarray(embeddings, dtype=np.float64)
    d = z.shape[-1]
    j = np.eye(d) - np.ones((d, d)) / d
    cov = z @ j @ z.T
    vals = eigh(cov + alpha * np.eye(cov.shape[0]), eigvals_only=True)
    return float(np.mean(np.log([v if v > 0 else 1e-10 for v in vals])))


def test_eigenscore_matches_lm_polygraph_up_to_the_1_over_d_minus_1_convention():
    """INSIDE divides the K×K matrix by d − 1, LM-Polygraph does not: ours(Z, α) =
    polygraph(Z, α(d − 1)) − ln(d − 1), exactly; with the same α the rankings agree closely."""
    rng = np.random.default_rng(0)
    k, d, alpha = 10, 64, 1e-3
    embs = [rng.normal(size=(k, d)) * rng.uniform(0.05, 3.0) + rng.normal(size=d) for _ in range(40)]
    ours = eigenscore(torch.tensor(np.stack(embs)), alpha=alpha).double().numpy()
    for z, o in zip(embs, ours):
        assert o == pytest.approx(polygraph_eigenscore(z, alpha * (d - 1)) - math.log(d - 1), abs=1e-9)
    same_alpha = np.array([polygraph_eigenscore(z, alpha) for z in embs])
    from scipy.stats import spearmanr

    assert spearmanr(ours, same_alpha).statistic > 0.95


def test_semantic_entropy_and_distinct_answers_by_hand():
    # normalised: paris, paris, lyon, paris (article and punctuation removed) -> clusters 3 + 1
    answers = ["Paris", " paris.", "Lyon", "The Paris"]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert semantic_entropy(answers) == pytest.approx(h)
    assert distinct_answers(answers) == 2
    # aliases of the fact cluster together: USA = United States
    answers = ["USA", "United States", "usa", "Canada"]
    assert semantic_entropy(answers) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert distinct_answers(answers) == 3
    assert semantic_entropy(answers, aliases=["United States", "USA"]) == pytest.approx(h)
    assert distinct_answers(answers, aliases=["United States", "USA"]) == 2
    assert semantic_entropy(["a b"] * 5) == 0.0
    assert semantic_entropy([str(i) for i in range(10)]) == pytest.approx(math.log(10))
    with pytest.raises(ValueError):
        semantic_entropy([])


def test_sequence_probability_and_ln_entropy_by_hand():
    assert sequence_nll([-0.1, -0.2, -0.3]) == pytest.approx(0.6)
    assert sequence_nll([math.log(0.5)]) == pytest.approx(math.log(2))
    for bad in ([], [0.5], [float("nan")]):
        with pytest.raises(ValueError):
            sequence_nll(bad)
    # LN-entropy = −(1/K) Σ_k (1/T_k) Σ_t ln p: samples (−1, −1) and (−2,) -> (1 + 2) / 2
    assert length_normalized_entropy([[-1.0, -1.0], [-2.0]]) == pytest.approx(1.5)
    assert length_normalized_entropy([[math.log(0.25)] * 3]) == pytest.approx(math.log(4))


def _vocab_tokenizer(tokens):
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_inside_stop_set_comes_from_the_vocabulary():
    tok = _vocab_tokenizer(["paris", "\n", "\n\n", "\nQ", ".", ",", ".\n", " .", "a.b", "x,", "\r\n", "Q:"])
    ids = stop_token_ids(tok, "inside")
    names = sorted(tok.convert_ids_to_tokens(ids))
    # every token starting with a line break, "." and "," (also with trailing whitespace); not " .", "a.b", "x,"
    assert names == sorted(["\n", "\n\n", "\nQ", ".", ",", ".\n", "\r\n"])
    assert 1 not in ids  # EOS is handled separately
    assert stop_token_ids(tok, "none") == [] and stop_token_ids(tok, None) == []
    assert tok.convert_ids_to_tokens(stop_token_ids(tok, "Q")) == ["Q:"]
    assert sorted(tok.convert_ids_to_tokens(stop_token_ids(tok, ["\\n", "a."]))) == sorted(["\n", "\n\n", "\nQ", "a.b"])
    with pytest.raises(UserError, match="tokenises to nothing"):
        stop_token_ids(tok, "\t")
    assert parse_stop("a|\\n") == ("a", "\n") and parse_stop("INSIDE") == "inside"


def test_prompt_formats(tiny_tokenizer):
    assert format_prompts(tiny_tokenizer, ["The capital of France is"], "raw") == ["The capital of France is"]
    (qa,) = format_prompts(tiny_tokenizer, ["The capital of France is"], "qa1shot")
    assert qa == (
        "Answer these questions:\nQ: In Scotland a bothy/bothie is a?\nA: House\nQ: The capital of France is?\nA:"
    )
    assert qa == QA1SHOT_TEMPLATE.format(question="The capital of France is?")
    with pytest.raises(UserError, match="needs a tokenizer with a chat template"):
        format_prompts(tiny_tokenizer, ["x"], "chat")
    tiny_tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert format_prompts(tiny_tokenizer, ["hi"], "chat") == ["<user>hi<assistant>"]
    with pytest.raises(UserError, match="prompt_format"):
        format_prompts(tiny_tokenizer, ["x"], "markdown")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=1), "k must be an integer >= 2"),
        (dict(alpha=0.0), "alpha"),
        (dict(top_p=0.0), "top_p"),
        (dict(pooling="max"), "pooling"),
        (dict(stop=""), "stop"),
        (dict(stop="a||b"), "empty stop string"),
        (dict(prompt_format="md"), "prompt_format"),
        (dict(probe_position="middle"), "probe_position"),
        (dict(probe_min_labelled=3), "probe_min_labelled"),
        (dict(clip_percentile=50), "clip_percentile"),
    ],
)
def test_settings_range_checks(kwargs, match):
    with pytest.raises(UserError, match=match):
        EigenScoreSettings(**kwargs)


def test_settings_are_declared_once():
    from dataclasses import fields

    from neurodetox.metrics.clipping import FeatureClipper
    from neurodetox.metrics.sampling import sample_answers
    from neurodetox.send.config import SeNDConfig

    assert all(f.metadata.get("help") for f in fields(EigenScoreSettings))
    cfg = SeNDConfig(output_dir="/tmp/unused-nd", report_to=[])
    s = cfg.eigenscore_settings()
    for name in ("k", "temperature", "top_p", "top_k", "max_new_tokens", "layer", "alpha", "stop", "prompt_format"):
        assert getattr(s, name) == getattr(DEFAULTS, name)
    import inspect

    sig = inspect.signature(sample_answers).parameters
    assert sig["k"].default == DEFAULTS.k and sig["stop"].default == DEFAULTS.stop
    assert inspect.signature(FeatureClipper).parameters["bank_size"].default == DEFAULTS.clip_bank_size
    with pytest.raises(UserError, match="eigenscore_stop"):
        SeNDConfig(output_dir="/tmp/unused-nd", report_to=[], eigenscore_stop="a||b")


def test_hidden_probe_separates_and_needs_enough_labels():
    rng = np.random.default_rng(0)
    n, d = 120, 16
    y = rng.random(n) < 0.4
    x = rng.normal(size=(n, 2, d))
    x[:, 1, 0] += 2.5 * y  # the answer token's first feature carries the label
    probe = HiddenStateProbe(position="answer", min_labelled=20).fit(x[:80], y[:80])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[80:], probe.score(x[80:])) > 0.85
    assert probe.n_train == 80 and probe.n_train_hallucinated == int(y[:80].sum())
    prompt_only = HiddenStateProbe(position="prompt", min_labelled=20).fit(x[:80], y[:80])
    assert roc_auc_score(y[80:], prompt_only.score(x[80:])) < 0.75  # the prompt token carries nothing here
    with pytest.raises(
        UserError, match=r"needs at least 20 labelled probes .* it has 10 \(4 hallucinated, 6 correct\)"
    ):
        HiddenStateProbe(min_labelled=20).fit(x[:10], [True] * 4 + [False] * 6)
    with pytest.raises(UserError, match=r"has 30 \(0 hallucinated, 30 correct\)"):
        HiddenStateProbe(min_labelled=20).fit(x[:30], [False] * 30)


PROMPTS = [
    "the capital of france is",
    "the capital of italy is",
    "japan is located in",
    "the currency of spain is",
    "germany is located in",
    "the capital of japan is",
]


def test_score_probes_runs_every_detector_with_the_hidden_probe(tiny_llama, tiny_tokenizer):
    from neurodetox.metrics.sampling import greedy_generate

    s = EigenScoreSettings(k=3, max_new_tokens=4, batch_size=4, seed=1, probe_min_labelled=4, probe_layer=-1)
    greedy = greedy_generate(tiny_llama, tiny_tokenizer, PROMPTS, max_new_tokens=4, batch_size=8).answers
    aliases = [[g] if i % 2 == 0 and g.strip() else ["zzz-never"] for i, g in enumerate(greedy)]
    res = score_probes(
        tiny_llama,
        tiny_tokenizer,
        PROMPTS,
        aliases,
        s,
        clipped=False,
        probe_train=(PROMPTS * 2, aliases * 2),
        n_boot=20,
    )
    assert set(res.summary) == (set(UNSUPERVISED_SCORES) - {"eigenscore_clipped"}) | {"hidden_probe"}
    for r, a in zip(res.records, aliases):
        assert 0.0 <= r["hidden_probe"] <= 1.0
        assert r["semantic_entropy"] == pytest.approx(semantic_entropy(r["samples"], a))
        assert r["distinct_answers"] == distinct_answers(r["samples"], a)
    assert res.info["hidden_probe"]["n_train"] == 12
    for key in ("greedy_generate", "sampled_generate", "hidden_probe_fit", "semantic_entropy"):
        assert key in res.timings
    with pytest.raises(UserError, match="needs at least 4 labelled probes .* it has 3"):
        score_probes(tiny_llama, tiny_tokenizer, PROMPTS, aliases, s, probe_train=(PROMPTS[:3], aliases[:3]))


def test_callback_single_class_warns_and_logs_nan(tiny_llama, tiny_tokenizer):
    s = EigenScoreSettings(k=2, max_new_tokens=3, batch_size=4)
    cb = EigenScoreCallback(tiny_tokenizer, PROMPTS, [["zzz-never"]] * 6, s, n_boot=10)
    with pytest.warns(UserWarning, match="all 6 evaluation probes are wrong"):
        m = cb.compute_metrics(tiny_llama, step=3)
    assert m["factual_accuracy"] == 0.0 and math.isnan(m["eigenscore_auroc"])
    assert math.isfinite(m["eigenscore"]) and m["detectors_seconds"] > 0
    assert cb.history[0][0] == 3
    with pytest.raises(UserError, match="needs at least 20 labelled tracking probes .* it has 6"):
        EigenScoreCallback(tiny_tokenizer, PROMPTS, [["x"]] * 6, train_prompts=PROMPTS, train_aliases=[["x"]] * 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="empty probe set"):
            EigenScoreCallback(tiny_tokenizer, [], [])


def test_trainer_evaluation_logs_every_detector_through_log(tmp_path):
    """Each evaluation of SeNDTrainer reaches every reporter (Trainer.log → on_log) with every
    detector's mean, AUROC and interval, the hidden-state probe refit on the tracking probes."""
    from conftest import make_tiny_llama, make_tokenizer
    from transformers import TrainerCallback

    from neurodetox.data.lm import tokenize_texts
    from neurodetox.send import SeNDConfig, SeNDTrainer

    class Logs(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), seed=0)
    texts = [f"{p} paris ." for p in PROMPTS] * 2
    args = SeNDConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        send_mode="off",
        activation_stats_site="none",
        save_strategy="no",
        eigenscore_k=2,
        eigenscore_max_new_tokens=3,
        eigenscore_probe_min_labelled=4,
        eigenscore_bootstrap=10,
    )
    greedy = greedy_answers(model, tok, PROMPTS, max_new_tokens=3)
    aliases = [[g] if i % 2 == 0 and g.strip() else ["zzz-never"] for i, g in enumerate(greedy)]
    logs = Logs()
    tr = SeNDTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_texts(tok, texts),
        eval_dataset=tokenize_texts(tok, texts[:4]),
        probe_prompts=PROMPTS,
        probe_aliases=aliases,
        tracking_probe_prompts=PROMPTS,
        tracking_probe_aliases=aliases,
        processing_class=tok,
        callbacks=[logs],
    )
    cb = tr.callback(EigenScoreCallback)
    assert cb.train_prompts == PROMPTS
    tr.train()
    evals = [entry for entry in logs.logs if "eval_eigenscore" in entry]
    assert evals, logs.logs
    entry = evals[-1]
    for name in set(UNSUPERVISED_SCORES) - {"eigenscore_ees", "eigenscore_clipped"} | {"hidden_probe"}:
        for suffix in ("", "_auroc", "_auroc_low", "_auroc_high"):
            assert f"eval_{name}{suffix}" in entry, (name, suffix)
    assert entry["eval_detectors_seconds"] > 0 and "eval_factual_accuracy" in entry

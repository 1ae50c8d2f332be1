"""sample_answers / greedy_answers on a tiny random Llama with an offline tokenizer."""

import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import neurodetox.metrics.sampling as sampling
from neurodetox.core.errors import UserError
from neurodetox.metrics.sampling import SampledAnswers, greedy_answers, greedy_generate, sample_answers

WORDS = (
    "the capital of france is paris berlin rome city river what who where when how many one two three "
    "four five six seven eight nine ten red blue green yes no"
).split()
PAD, BOS, EOS, UNK = 0, 1, 2, 3
PROMPTS = ["the capital of france is", "what", "who is the city of rome a river", "two three"]


def make_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    for w in WORDS:
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    kw = dict(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_pad:
        kw["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(**kw)


def make_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 4.0  # EOS is sampled often enough to exercise every case
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes
    # them 10-100x slower when other processes load the CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(len(tok))


class GenerateSpy:
    """Wraps model.generate, recording each call's kwargs and returned sequences."""

    def __init__(self, model, drop_cache: bool = False):
        self.model, self.orig, self.drop_cache = model, model.generate, drop_cache
        self.calls = []

    def __call__(self, *args, **kwargs):
        out = self.orig(*args, **kwargs)
        seqs = out.sequences if hasattr(out, "sequences") else out
        self.calls.append((kwargs, kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), seqs.clone()))
        if self.drop_cache and hasattr(out, "past_key_values"):
            out.past_key_values = None
        return out

    def sampled(self):
        return [c for c in self.calls if c[0].get("do_sample")]


def reference_embeddings(model, spy, k, layer, ends=(EOS,)):
    """Independent reference: for every sampled sequence, a plain unpadded forward over
    prompt + real generated tokens (those before the first id in ``ends``), read at the last
    position via output_hidden_states."""
    refs, answers_ids = [], []
    for _kwargs, ids, mask, seqs in spy.sampled():
        t = ids.shape[1]
        for row in range(seqs.shape[0]):
            p = row // k
            prompt = ids[p][mask[p].bool()].tolist()
            gen = seqs[row, t:].tolist()
            real = []
            for tid in gen:
                if tid in ends:
                    break
                real.append(tid)
            answers_ids.append(real)
            with torch.no_grad():
                hs = model(torch.tensor([prompt + real]), output_hidden_states=True).hidden_states
            refs.append(hs[layer + 1][0, -1])
    return torch.stack(refs), answers_ids


@pytest.mark.parametrize("drop_cache", [False, True], ids=["extra_step", "full_forward_fallback"])
def test_embeddings_match_full_forward(model, tok, monkeypatch, drop_cache):
    k = 5
    lengths, paths = [], set()
    for seed in range(4):  # until every case has occurred: no real token, EOS mid-way, full length
        spy = GenerateSpy(model, drop_cache=drop_cache)
        monkeypatch.setattr(model, "generate", spy)
        res = sample_answers(model, tok, PROMPTS, k=k, batch_size=3, seed=seed, max_new_tokens=6)
        assert isinstance(res, SampledAnswers)
        paths.update(res._extra["embedding_paths"])
        assert res.layer == 1  # "middle" of 4 blocks -> block 1 -> hidden_states[2] = hidden_states[5 // 2]
        assert res.embeddings.shape == (len(PROMPTS), k, 32) and res.embeddings.dtype == torch.float32
        assert len(res.samples) == len(PROMPTS) and all(len(s) == k for s in res.samples)
        assert len(res.greedy) == len(PROMPTS)
        assert tok.padding_side == "right"  # restored
        # One sampled generate per batch, with all K samples in it, no output_hidden_states.
        sampled = spy.sampled()
        assert len(sampled) == 2
        assert all(c[0]["num_return_sequences"] == k and c[0]["return_dict_in_generate"] for c in sampled)
        assert not any(c[0].get("output_hidden_states") for c in spy.calls)

        ref, answers_ids = reference_embeddings(model, spy, k, res.layer)
        torch.testing.assert_close(res.embeddings.reshape(-1, 32), ref, atol=1e-4, rtol=1e-4)
        flat = [s for per in res.samples for s in per]
        assert flat == [tok.decode(a, skip_special_tokens=True) for a in answers_ids]
        lengths += [len(a) for a in answers_ids]
        if 0 in lengths and 6 in lengths and any(0 < n < 6 for n in lengths):
            break
    assert 0 in lengths and 6 in lengths and any(0 < n < 6 for n in lengths), lengths
    # The last token of full-length samples came from the extra cached step (or the fallback).
    assert ("full_forward" if drop_cache else "hook+extra_step") in paths
    assert paths <= {"hook", "full_forward" if drop_cache else "hook+extra_step"}


def test_other_layer_and_padding_side_restored(model, tok, monkeypatch):
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    tok.padding_side = "right"
    # Block 2 (not the last: HF's last hidden_states entry has the final norm applied).
    res = sample_answers(model, tok, PROMPTS[:2], k=3, layer=-2, seed=3, greedy=False, max_new_tokens=4)
    assert tok.padding_side == "right"
    assert res.layer == 2 and res.greedy == []
    ref, _ = reference_embeddings(model, spy, 3, 2)
    torch.testing.assert_close(res.embeddings.reshape(-1, 32), ref, atol=1e-4, rtol=1e-4)


def test_seed_reproducible(model, tok):
    a = sample_answers(model, tok, PROMPTS, k=4, seed=123, max_new_tokens=5)
    b = sample_answers(model, tok, PROMPTS, k=4, seed=123, max_new_tokens=5)
    c = sample_answers(model, tok, PROMPTS, k=4, seed=7, max_new_tokens=5)
    assert a.samples == b.samples and a.greedy == b.greedy
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.samples != c.samples
    assert a.greedy == c.greedy


def test_greedy_answers_consistent(model, tok, monkeypatch):
    g = greedy_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    assert g == sample_answers(model, tok, PROMPTS, k=2, max_new_tokens=6, batch_size=2).greedy
    assert g == greedy_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=1)  # padding-independent
    # Against a hand-rolled argmax loop, prompt by prompt.
    for prompt, ans in zip(PROMPTS, g):
        ids = tok(prompt)["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == EOS:
                    break
                out.append(nxt)
        assert ans == tok.decode(out, skip_special_tokens=True)


def test_training_mode_restored(model, tok):
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    sample_answers(model, tok, PROMPTS[:1], k=2, max_new_tokens=2)
    assert [m.training for m in model.modules()] == before
    model.eval()
    sample_answers(model, tok, PROMPTS[:1], k=2, max_new_tokens=2)
    assert not any(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_tokenizer_without_pad_token(model):
    tok = make_tokenizer(with_pad=False)
    assert tok.pad_token is None
    res = sample_answers(model, tok, PROMPTS, k=3, seed=0, max_new_tokens=4)
    assert tok.pad_token is None and tok.padding_side == "right"
    assert res.embeddings.shape == (len(PROMPTS), 3, 32)
    assert torch.isfinite(res.embeddings).all()


def test_errors(model, tok):
    with pytest.raises(ValueError, match="empty"):
        sample_answers(model, tok, [])
    with pytest.raises(ValueError, match="empty"):
        greedy_answers(model, tok, [])
    with pytest.raises(TypeError, match="single string"):
        sample_answers(model, tok, "what")
    for k in (1, 0, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            sample_answers(model, tok, PROMPTS, k=k)
    long_prompt = " ".join(["red"] * 60)  # 61 tokens with <s>; 64 - 10 = 54 allowed
    with pytest.raises(ValueError, match=r"prompt 1 is 61 tokens long.*context is 64.*max_new_tokens=10.*at most 54"):
        sample_answers(model, tok, ["what", long_prompt], k=2)
    with pytest.raises(ValueError, match="prompt 1 is 61 tokens"):
        greedy_answers(model, tok, ["what", long_prompt])
    with pytest.raises(ValueError, match="exactly one"):
        sample_answers(model, tok, PROMPTS, k=2, layer="all")
    with pytest.raises(ValueError, match="out of range"):
        sample_answers(model, tok, PROMPTS, k=2, layer=9)
    with pytest.raises(ValueError, match="temperature"):
        sample_answers(model, tok, PROMPTS, k=2, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_answers(model, tok, PROMPTS, k=2, max_new_tokens=0)


def test_non_finite_embeddings_warn(model, tok, monkeypatch):
    real = sampling._sample_batch

    def poisoned(*args, **kwargs):
        answers, emb, path, lps, n_real = real(*args, **kwargs)
        emb = emb.clone()
        emb[0, 0] = float("nan")
        return answers, emb, path, lps, n_real

    monkeypatch.setattr(sampling, "_sample_batch", poisoned)
    with pytest.warns(UserWarning, match=r"prompt index\(es\) \[0, 2\]"):
        sample_answers(model, tok, PROMPTS[:3], k=2, batch_size=2, max_new_tokens=2)


def test_progress_bar_runs(model, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = sample_answers(model, tok, PROMPTS[:2], k=2, max_new_tokens=2, show_progress=True)
    assert res.embeddings.shape == (2, 2, 32)


# ----------------------------------------------------------------------------- pooling, log-probs, clipping


def reference_rows(model, spy, k, layer, clamp=None):
    """Per sampled row: (prompt ids, real generated ids, ended_with_eos, hidden states at ``layer``, logits)
    from a plain unpadded forward; ``clamp=(block, lo, hi)`` clamps that block's output like FeatureClipper."""
    handle = None
    if clamp is not None:
        block, lo, hi = clamp

        def fwd(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = torch.clamp(h, min=lo, max=hi)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        handle = model.model.layers[block].register_forward_hook(fwd)
    rows = []
    try:
        for _kwargs, ids, mask, seqs in spy.sampled():
            t = ids.shape[1]
            for row in range(seqs.shape[0]):
                p = row // k
                prompt = ids[p][mask[p].bool()].tolist()
                real, eos = [], False
                for tid in seqs[row, t:].tolist():
                    if tid == EOS:
                        eos = True
                        break
                    real.append(tid)
                full = prompt + real + ([EOS] if eos else [])
                with torch.no_grad():
                    out = model(torch.tensor([full]), output_hidden_states=True)
                rows.append((prompt, real, eos, out.hidden_states[layer + 1][0], out.logits[0]))
    finally:
        if handle is not None:
            handle.remove()
    return rows


@pytest.mark.parametrize("drop_cache", [False, True], ids=["extra_step", "full_forward_fallback"])
def test_mean_pooling_matches_full_forward(model, tok, monkeypatch, drop_cache):
    k = 4
    spy = GenerateSpy(model, drop_cache=drop_cache)
    monkeypatch.setattr(model, "generate", spy)
    lengths = []
    for seed in range(3):
        spy.calls.clear()
        res = sample_answers(
            model, tok, PROMPTS, k=k, batch_size=2, seed=seed, max_new_tokens=5, pooling="mean", greedy=False
        )
        assert res.pooling == "mean"
        refs = []
        for prompt, real, _eos, hs, _ in reference_rows(model, spy, k, res.layer):
            lengths.append(len(real))
            if real:
                refs.append(hs[len(prompt) : len(prompt) + len(real)].mean(0))
            else:
                refs.append(hs[len(prompt) - 1])
        torch.testing.assert_close(res.embeddings.reshape(-1, 32), torch.stack(refs), atol=1e-4, rtol=1e-4)
        assert res.sample_lengths == [lengths[-len(PROMPTS) * k :][i * k : (i + 1) * k] for i in range(len(PROMPTS))]
    assert 0 in lengths and 5 in lengths and any(0 < n < 5 for n in lengths)


def test_logprobs_match_forward(model, tok, monkeypatch):
    k = 3
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    res = sample_answers(
        model, tok, PROMPTS, k=k, batch_size=3, seed=5, max_new_tokens=5, return_logprobs=True, temperature=0.7, top_k=3
    )
    got = [lp for per in res.sample_logprobs for lp in per]
    refs = reference_rows(model, spy, k, res.layer)
    assert len(got) == len(refs)
    for lp, (prompt, real, eos, _, logits) in zip(got, refs):
        toks = real + ([EOS] if eos else [])
        assert len(lp) == len(toks)  # real tokens + the EOS that ended the answer
        ref = [float(torch.log_softmax(logits[len(prompt) + j - 1].double(), -1)[t]) for j, t in enumerate(toks)]
        assert lp == pytest.approx(ref, abs=1e-4)  # raw distribution: temperature 1, no top-k
    # greedy answers: log-probs of the argmax tokens, checked against a hand-rolled loop
    for prompt, lps, n_tok in zip(PROMPTS, res.greedy_logprobs, res.greedy_lengths):
        ids = tok(prompt)["input_ids"]
        out, ref = [], []
        with torch.no_grad():
            for _ in range(5):
                lsm = torch.log_softmax(model(torch.tensor([ids + out])).logits[0, -1].double(), -1)
                nxt = int(lsm.argmax())
                ref.append(float(lsm[nxt]))
                if nxt == EOS:
                    break
                out.append(nxt)
        assert n_tok == len(out)
        assert lps == pytest.approx(ref, abs=1e-4)


def test_feature_clipper_bank_and_thresholds():
    clip = sampling.FeatureClipper(bank_size=10, percentile=10.0, min_tokens=4)
    assert clip.thresholds() is None
    rng = np.random.default_rng(0)
    data = rng.normal(size=(23, 3)).astype(np.float32)
    clip.push(torch.tensor(data[:3]))
    assert clip.thresholds() is None  # fewer than min_tokens
    clip.push(torch.tensor(data[3:17]))
    clip.push(torch.tensor(data[17:]))
    assert clip.count == 10 and clip.pushed == 23
    np.testing.assert_array_equal(clip.contents().numpy(), data[-10:])  # FIFO: the newest 10, oldest first
    lo, hi = clip.thresholds()
    np.testing.assert_allclose(lo.numpy(), np.percentile(data[-10:], 10.0, axis=0), rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), np.percentile(data[-10:], 90.0, axis=0), rtol=1e-6)
    x = torch.tensor(rng.normal(size=(2, 5, 3)) * 3, dtype=torch.float32)
    ref = np.clip(x.numpy(), np.percentile(data[-10:], 10.0, axis=0), np.percentile(data[-10:], 90.0, axis=0))
    np.testing.assert_allclose(clip.clamp(x).numpy(), ref, rtol=1e-6)
    clip.frozen = True
    clip.push(torch.zeros(4, 3))
    assert clip.pushed == 23
    for bad in (dict(percentile=50), dict(percentile=-1), dict(bank_size=0), dict(min_tokens=0)):
        with pytest.raises(ValueError):
            sampling.FeatureClipper(**bad)


def test_feature_clipping_matches_static_clamp_reference(model, tok, monkeypatch):
    """With a frozen bank the clipped generation equals a forward with a fixed per-feature clamp.

    Clipping is at block 1 and the embedding read at block 2, so the embedding itself sees the clamp
    (with INSIDE's layout — clip the penultimate block, embed the middle one — clipping acts on the
    embedding only through the tokens it makes the model sample)."""
    k = 3
    clip = sampling.FeatureClipper(bank_size=40, percentile=20.0, min_tokens=10, layer=1)
    with sampling.generation_mode(model, tok):
        clip.seed(model, tok, PROMPTS * 4, special_ids=[PAD, EOS])
    assert clip.count == 40
    # seeding read the real prompt tokens of block 1 (no padding), in order
    ref_bank = []
    for p in PROMPTS * 4:
        with torch.no_grad():
            hs = model(torch.tensor([tok(p)["input_ids"]]), output_hidden_states=True).hidden_states[2][0]
        ref_bank.append(hs)
    ref_bank = torch.cat(ref_bank)[:40]
    torch.testing.assert_close(clip.contents(), ref_bank, atol=1e-5, rtol=1e-5)
    clip.frozen = True
    lo, hi = clip.thresholds()
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    res = sample_answers(
        model, tok, PROMPTS, k=k, batch_size=2, seed=2, max_new_tokens=5, feature_clip=clip, greedy=False, layer=2
    )
    assert res.feature_clip and clip.clamped_calls > 0
    refs = [
        hs[len(prompt) + len(real) - 1]
        for prompt, real, _, hs, _ in reference_rows(model, spy, k, res.layer, clamp=(1, lo, hi))
    ]
    torch.testing.assert_close(res.embeddings.reshape(-1, 32), torch.stack(refs), atol=1e-4, rtol=1e-4)
    # and clipping really changed the model: the unclipped reference differs
    plain = [hs[len(prompt) + len(real) - 1] for prompt, real, _, hs, _ in reference_rows(model, spy, k, res.layer)]
    assert not torch.allclose(torch.stack(plain), torch.stack(refs), atol=1e-3)


def test_feature_clip_default_runs_and_updates(model, tok):
    clip = sampling.FeatureClipper(bank_size=200, min_tokens=20)
    res = sample_answers(model, tok, PROMPTS, k=2, seed=0, max_new_tokens=3, feature_clip=clip)
    assert res.feature_clip and clip.pushed > 0 and torch.isfinite(res.embeddings).all()
    res2 = sample_answers(model, tok, PROMPTS[:1], k=2, seed=0, max_new_tokens=3, feature_clip=True)
    assert res2.feature_clip


def test_new_option_errors(model, tok):
    with pytest.raises(ValueError, match="pooling"):
        sample_answers(model, tok, PROMPTS, k=2, pooling="max")
    with pytest.raises(ValueError, match="out of range"):
        sample_answers(model, tok, PROMPTS, k=2, feature_clip=sampling.FeatureClipper(layer=7))
    with pytest.raises(ValueError, match="feature_clip"):
        sample_answers(model, tok, PROMPTS, k=2, feature_clip="yes")


def test_zero3_lockstep_takes_one_fixed_forward_per_batch(model, tok, monkeypatch):
    """Under ZeRO-3 on several ranks the extra cached step (run only when some sample is full length) would
    be a forward on some ranks only: a hang. There every batch takes exactly one full forward instead."""
    import neurodetox.metrics.sampling as sampling

    monkeypatch.setattr(sampling, "lockstep_forwards", lambda: True)
    forwards = []
    real_forward = model.forward

    def counting_forward(*a, **kw):
        forwards.append(kw.get("past_key_values") is None and not kw.get("use_cache", True))
        return real_forward(*a, **kw)

    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    monkeypatch.setattr(model, "forward", counting_forward)
    res = sample_answers(model, tok, PROMPTS, k=4, batch_size=3, seed=1, max_new_tokens=6, greedy=False)
    assert set(res._extra["embedding_paths"]) == {"full_forward"}
    assert sum(forwards) == 2  # one full (uncached) forward per batch of 3 prompts, on every rank alike
    ref, _ = reference_embeddings(model, spy, 4, res.layer)
    torch.testing.assert_close(res.embeddings.reshape(-1, 32), ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the answer boundary

STOP_WORDS = ["red", "blue", "green", "yes", "no", "one", "two", "river"]


def test_stop_boundary_cuts_answers_and_embeds_the_last_token_before_the_stop(model, tok, monkeypatch):
    """User stop strings end every sampled answer: the answer is the text before the stop and the
    embedding is that of a plain forward over prompt + the tokens before it (INSIDE's boundary)."""
    k = 5
    stop_ids = set(tok.convert_tokens_to_ids(STOP_WORDS))
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    res = sample_answers(model, tok, PROMPTS, k=k, batch_size=2, seed=0, max_new_tokens=6, stop="|".join(STOP_WORDS))
    assert set(res.stop_ids) == stop_ids
    for kwargs, *_ in spy.calls:  # greedy and sampled generate both stop there, besides EOS
        assert set(kwargs["eos_token_id"]) == stop_ids | {EOS}
    ref, answers_ids = reference_embeddings(model, spy, k, res.layer, ends=stop_ids | {EOS})
    torch.testing.assert_close(res.embeddings.reshape(-1, 32), ref, atol=1e-4, rtol=1e-4)
    flat = [s for per in res.samples for s in per]
    assert flat == [tok.decode(a, skip_special_tokens=True) for a in answers_ids]
    # the test means something only if some sample really stopped at a stop word
    stopped = [
        bool(set(seqs[r, ids.shape[1] :].tolist()) & stop_ids)
        for _, ids, _, seqs in spy.sampled()
        for r in range(seqs.shape[0])
    ]
    assert any(stopped)
    assert not any(w in a.split() for a in flat + res.greedy for w in STOP_WORDS)


def test_greedy_stop_is_the_prefix_before_the_stop_and_none_restores_eos_only(model, tok):
    plain = greedy_answers(model, tok, PROMPTS, max_new_tokens=8, stop="none")
    # "none" = answers end at EOS or the cap only: the same as generate with the EOS id alone
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with sampling.generation_mode(model, tok):
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        out = model.generate(**enc, do_sample=False, max_new_tokens=8, eos_token_id=[EOS], pad_token_id=PAD)
    ref = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        ref.append(tok.decode(row[: row.index(EOS)] if EOS in row else row, skip_special_tokens=True))
    assert plain == ref
    cut = greedy_answers(model, tok, PROMPTS, max_new_tokens=8, stop="|".join(STOP_WORDS))
    expected = []
    for a in plain:
        words = a.split()
        first = next((i for i, w in enumerate(words) if w in STOP_WORDS), len(words))
        expected.append(" ".join(words[:first]))
    assert cut == expected
    assert cut != plain  # some answer was cut


def test_greedy_features_are_the_last_prompt_and_last_answer_token(model, tok, monkeypatch):
    stop = "|".join(STOP_WORDS)
    ends = set(tok.convert_tokens_to_ids(STOP_WORDS)) | {EOS}
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    g = greedy_generate(model, tok, PROMPTS, max_new_tokens=6, stop=stop, feature_layer=2, batch_size=3)
    assert g.features.shape == (len(PROMPTS), 2, 32) and g.feature_layer == 2
    i = 0
    for _kwargs, ids, mask, seqs in spy.calls:
        t = ids.shape[1]
        for row in range(seqs.shape[0]):
            prompt = ids[row][mask[row].bool()].tolist()
            answer = []
            for tid in seqs[row, t:].tolist():
                if tid in ends:
                    break
                answer.append(tid)
            assert len(answer) == g.lengths[i]
            with torch.no_grad():
                hs = model(torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states[3][0]
            torch.testing.assert_close(g.features[i, 0], hs[len(prompt) - 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(g.features[i, 1], hs[-1], atol=1e-4, rtol=1e-4)
            i += 1
    assert i == len(PROMPTS)
    # the same features come with sample_answers' greedy answers
    monkeypatch.undo()
    res = sample_answers(model, tok, PROMPTS, k=2, max_new_tokens=6, stop=stop, feature_layer=2, batch_size=3)
    assert res.greedy == g.answers
    torch.testing.assert_close(res.greedy_features, g.features, atol=1e-5, rtol=1e-5)


def test_stop_strings_that_tokenise_to_nothing_or_span_tokens_are_errors(model, tok):
    with pytest.raises(UserError, match="tokenises to nothing"):
        greedy_answers(model, tok, PROMPTS, stop="  ")
    with pytest.raises(UserError, match="no single token"):
        sample_answers(model, tok, PROMPTS, k=2, stop="red blue")
    with pytest.raises(UserError, match="empty stop string"):
        greedy_answers(model, tok, PROMPTS, stop="red||blue")

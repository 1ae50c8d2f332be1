"""Tests for ``neurodetox.patching.locate``: the locators against finite differences and explicit sums,
the reference statistics' predicted logits and flips against real forwards and a full-vocabulary argmax."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import make_tokenizer
from patching_helpers import REFERENCE, last_layer_reference, make_model, one_thread

from neurodetox.core.sites import resolve_sites, value_vector_parameter
from neurodetox.patching import neuron_scores, semantic_space


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def _finite_difference_scores(model, sites, ids, t, eps=1e-2, step=1):
    """|a_j(pos) · ∂P(t)/∂a_j(pos)| L2 over positions, by central differences (eps not tiny: Llama's RMSNorm
    computes in float32 even in a float64 model), for every ``step``-th neuron (the others stay 0). The FFN
    input may be ``[batch, seq, d_ff]`` or flattened ``[batch * seq, d_ff]`` (OPT)."""
    width = sites[0].width
    out = torch.zeros(len(sites), width, dtype=torch.float64)
    x = torch.tensor([ids])

    def p_t(si, j, pos, scale):
        def hook(mod, args):
            a = args[0].clone()
            if a.dim() == 2:
                a[pos, j] = a[pos, j] * scale
            else:
                a[0, pos, j] = a[0, pos, j] * scale
            return (a,)

        h = sites[si].module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return float(torch.softmax(model(input_ids=x).logits[0, -1].double(), -1)[t])
        finally:
            h.remove()

    for si in range(len(sites)):
        for j in range(0, width, step):
            per_pos = []
            for pos in range(len(ids)):
                # a · ∂P/∂a = d P(a·(1+s)) / ds at s = 0
                per_pos.append((p_t(si, j, pos, 1 + eps) - p_t(si, j, pos, 1 - eps)) / (2 * eps))
            out[si, j] = torch.tensor(per_pos).norm()
    return out


def test_grad_x_act_matches_finite_differences():
    model = make_model(layers=2).double()
    tok = make_tokenizer()
    sites = resolve_sites(model, "mlp", "second_half")
    ids = tok("the capital of")["input_ids"]
    t = 5
    scores, acts, logits = neuron_scores(model, sites, ids, t, 0, "grad_x_act")
    ref = _finite_difference_scores(model, sites, ids, t)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-2, atol=1e-3 * float(ref.max()))
    assert (
        scores.flatten().argsort(descending=True)[:10].tolist() == ref.flatten().argsort(descending=True)[:10].tolist()
    )


@pytest.mark.parametrize("family", __import__("test_sites").FAMILY_NAMES)
def test_grad_x_act_matches_finite_differences_in_every_family(family):
    """Every supported family, including OPT whose FFN sees flattened tokens
    ``[batch * seq, d_ff]`` (its scores were all zero when the gradient was
    taken at a reshaped view that the forward never used)."""
    from test_sites import tiny

    model = copy.deepcopy(tiny(family)).double().eval()
    sites = resolve_sites(model, "mlp", "all")
    ids, t = [5, 9, 3, 17, 11], 7
    scores, _, _ = neuron_scores(model, sites, ids, t, 3, "grad_x_act")
    ref = _finite_difference_scores(model, sites, ids, t, step=9)
    for si in range(len(sites)):
        for j in range(0, sites[si].width, 9):
            assert float(scores[si, j]) == pytest.approx(float(ref[si, j]), rel=5e-2, abs=1e-2 * float(scores.max())), (
                family,
                si,
                j,
            )
    assert float(scores.max()) > 0


def test_contrastive_and_activation_locators_match_explicit_sums():
    model = make_model(layers=2).double()
    tok = make_tokenizer()
    sites = resolve_sites(model, "mlp", "all")
    ids = tok("the capital of germany is")["input_ids"]
    t, a = 9, 4
    acts = {}
    hooks = [
        s.module.register_forward_pre_hook(lambda m, args, k=s.layer: acts.__setitem__(k, args[0][0].clone()))
        for s in sites
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    space = semantic_space(model)
    W = model.get_output_embeddings().weight.detach().double()
    scores, _, _ = neuron_scores(model, sites, ids, t, a, "contrastive", space)
    act_scores, last, _ = neuron_scores(model, sites, ids, t, a, "activation")
    for i, s in enumerate(sites):
        Wd = s.module.weight.detach().double()  # [d, d_ff]
        for j in range(s.width):
            direct = acts[s.layer][-1, j] * float((W[t] - W[a]) @ Wd[:, j])
            assert float(scores[i, j]) == pytest.approx(abs(float(direct)), rel=1e-4, abs=1e-9)
            assert float(act_scores[i, j]) == pytest.approx(float(acts[s.layer][:, j].norm()), rel=1e-5)
            assert float(last[i, j]) == pytest.approx(float(acts[s.layer][-1, j]), rel=1e-5, abs=1e-9)


def test_unknown_locator_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="valid locators are grad_x_act, contrastive, activation"):
        neuron_scores(model, resolve_sites(model, "mlp", "last"), [3, 4], 5, 6, "magic")


def test_guard_predicted_logits_match_a_real_last_layer_patch():
    """For a last-layer neuron the guard's prediction (direct path through the
    final norm and LM head) matches the logits of a forward with the patch
    really written, up to the change of the norm's scale that it leaves out;
    the predicted flips are the argmax changes of those logits."""
    from neurodetox.patching.locate import Candidate

    tok, model, site, stats, head, gain = last_layer_reference()
    weight, axis = value_vector_parameter(site)
    j = int(stats.last_acts[:, 0].abs().mean(dim=0).argmax())  # a neuron that fires on these prompts
    g = torch.Generator().manual_seed(0)
    delta = 0.005 * torch.randn(weight.shape[1 - axis], generator=g)
    cand = Candidate(layer=site.layer, index=j, score=0.0, activation=1.0)
    pred = stats.predicted_logits(head, gain, [cand], [delta])[0]
    col = weight.detach().select(axis, j)
    orig = col.clone()
    with torch.no_grad():
        col.add_(delta)
        try:
            real = torch.stack([model(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1] for p in REFERENCE])
        finally:
            col.copy_(orig)
    moved = real - stats.last_logits
    assert moved.norm() > 1e-3  # the patch does move the logits
    predicted = pred - stats.last_logits
    # first order, without the norm scale's own change (its term along the residual stream)
    assert (predicted - moved).norm() < 0.15 * moved.norm()
    assert torch.nn.functional.cosine_similarity(predicted.flatten(), moved.flatten(), dim=0) > 0.99
    # flips are counted from the predicted logits; a large step flips some
    big = [delta * 800]
    flips = stats.predicted_flips(head, gain, [cand], big)
    by_hand = (stats.predicted_logits(head, gain, [cand], big)[0].argmax(-1) != stats.last_logits.argmax(-1)).sum()
    assert int(flips[0]) == int(by_hand) > 0


def test_guard_flip_count_equals_full_vocabulary_argmax():
    """The guard counts flips over each prompt's top tokens and scores a prompt
    in full only when a token outside them could take over: the count equals
    the argmax over the whole vocabulary, for small and large patches."""
    from neurodetox.patching.locate import Candidate, ReferenceStats

    g = torch.Generator().manual_seed(3)
    N, V, d, S, F = 40, 300, 16, 2, 8
    stats = ReferenceStats(
        rms=torch.ones(S, F),
        last_acts=torch.randn(N, S, F, generator=g),
        last_logits=3 * torch.randn(N, V, generator=g),
        norm_scale=torch.rand(N, generator=g) + 0.5,
        layers=[5, 7],
    )
    head = torch.randn(V, d, generator=g)
    gain = torch.rand(d, generator=g) + 0.5
    cands, deltas = [], []
    for scale in (0.01, 0.1, 0.5, 2.0, 10.0):
        for layer in (5, 7):
            cands.append(
                Candidate(layer=layer, index=int(torch.randint(F, (1,), generator=g)), score=0.0, activation=1.0)
            )
            deltas.append(scale * torch.randn(d, generator=g))
    got = stats.predicted_flips(head, gain, cands, deltas)
    top = stats.last_logits.argmax(-1)
    want = [
        int((stats.predicted_logits(head, gain, [c], [x])[0].argmax(-1) != top).sum()) for c, x in zip(cands, deltas)
    ]
    assert got.tolist() == want
    assert want[0] < want[-1] and 0 < want[-1]  # small patches flip few, large ones many: both paths are used

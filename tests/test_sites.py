"""Tests for ``neurodetox.core.sites`` against independent references.

Every model is a tiny, randomly initialised transformers model built from a
config (nothing is downloaded). The expected module names, FFN widths and
final-norm modules below are written out by hand from the transformers model
code, not read back from ``neurodetox.core.sites.FAMILIES``, so the tests check the
table instead of echoing it.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from neurodetox.core.sites import (
    NeuronSite,
    UnsupportedArchitectureError,
    decoder_layers,
    num_layers,
    parse_layers,
    register_site_hook,
    resolve_sites,
    value_vector_parameter,
)

D, D_FF, N_LAYERS, VOCAB = 32, 64, 3, 100
_TOK = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DEC = dict(hidden_size=D, intermediate_size=D_FF, num_hidden_layers=N_LAYERS, num_attention_heads=4, **_TOK)

# family -> (config kwargs, FFN output projection of block {l}, final norm applied
# to the last hidden state, FFN projection is GPT-2's Conv1D)
SPECS = {
    "llama": (dict(_DEC, num_key_value_heads=2), "model.layers.{l}.mlp.down_proj", "model.norm"),
    "mistral": (dict(_DEC, num_key_value_heads=2), "model.layers.{l}.mlp.down_proj", "model.norm"),
    "qwen2": (dict(_DEC, num_key_value_heads=2), "model.layers.{l}.mlp.down_proj", "model.norm"),
    "gemma": (dict(_DEC, num_key_value_heads=2, head_dim=8), "model.layers.{l}.mlp.down_proj", "model.norm"),
    "phi3": (dict(_DEC, num_key_value_heads=2), "model.layers.{l}.mlp.down_proj", "model.norm"),
    "gpt2": (
        dict(n_embd=D, n_inner=D_FF, n_layer=N_LAYERS, n_head=4, n_positions=64, **_TOK),
        "transformer.h.{l}.mlp.c_proj",
        "transformer.ln_f",
    ),
    "gpt_neox": (dict(_DEC), "gpt_neox.layers.{l}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "gptj": (
        dict(n_embd=D, n_inner=D_FF, n_layer=N_LAYERS, n_head=4, rotary_dim=4, n_positions=64, **_TOK),
        "transformer.h.{l}.mlp.fc_out",
        "transformer.ln_f",
    ),
    "opt": (
        dict(
            hidden_size=D,
            ffn_dim=D_FF,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            word_embed_proj_dim=D,
            max_position_embeddings=64,
            vocab_size=VOCAB,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=1,
        ),
        "model.decoder.layers.{l}.fc2",
        "model.decoder.final_layer_norm",
    ),
    "phi": (dict(_DEC), "model.layers.{l}.mlp.fc2", "model.final_layernorm"),
    "falcon": (
        dict(
            hidden_size=D,
            ffn_hidden_size=D_FF,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            new_decoder_architecture=False,
            parallel_attn=True,
            **_TOK,
        ),
        "transformer.h.{l}.mlp.dense_4h_to_h",
        "transformer.ln_f",
    ),
}
FAMILY_NAMES = list(SPECS)

_CACHE: dict[str, nn.Module] = {}


def tiny(family: str) -> nn.Module:
    """A cached tiny random model of ``family`` in eval mode (never mutate it)."""
    if family not in _CACHE:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(family, **SPECS[family][0])
        _CACHE[family] = AutoModelForCausalLM.from_config(cfg).eval()
    return _CACHE[family]


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 7), generator=g)


def project(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute the projection output from its input with its own weight."""
    if type(proj).__name__ == "Conv1D":  # transformers Conv1D: weight [d_in, d_out]
        return x @ proj.weight + proj.bias
    assert isinstance(proj, nn.Linear)
    return F.linear(x, proj.weight, proj.bias)


def capture(site: NeuronSite, store: dict, key, **kw):
    def fn(a):
        store[key] = a.detach().clone()

    return register_site_hook(site, fn, **kw)


# --------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_resolve_mlp_and_residual(family):
    m = tiny(family)
    proj_path = SPECS[family][1]
    assert num_layers(m) == N_LAYERS
    assert len(decoder_layers(m)) == N_LAYERS

    sites = resolve_sites(m, "mlp", "all")
    assert [s.layer for s in sites] == list(range(N_LAYERS))
    for s in sites:
        name = proj_path.format(l=s.layer)
        assert s.kind == "mlp"
        assert s.module_name == name
        assert s.module is module(m, name)
        assert s.width == D_FF
        assert s.key == f"mlp.{s.layer}"
        # the width is the projection's input size, per its own weight layout
        w = s.module.weight
        assert (w.shape[0] if type(s.module).__name__ == "Conv1D" else w.shape[1]) == D_FF

    res = resolve_sites(m, "residual", "all")
    blocks = decoder_layers(m)
    assert [s.layer for s in res] == list(range(N_LAYERS))
    for s in res:
        assert s.module is blocks[s.layer]
        assert s.module_name == proj_path.format(l=s.layer).rsplit(".", 2 if ".mlp." in proj_path else 1)[0]
        assert s.width == D
        assert s.key == f"residual.{s.layer}"

    (pen,) = resolve_sites(m, "residual", "penultimate")
    assert pen.layer == N_LAYERS - 2
    assert [s.layer for s in resolve_sites(m, "mlp", "0,-1")] == [0, N_LAYERS - 1]


def test_resolve_rejects_unknown_kind():
    with pytest.raises(ValueError, match="attn"):
        resolve_sites(tiny("llama"), "attn")


# --------------------------------------------------------------------------- observe


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mlp_observer_sees_projection_input(family):
    m = tiny(family)
    seen, outs = {}, {}
    handles = []
    for s in resolve_sites(m, "mlp", "all"):
        handles.append(capture(s, seen, s.layer, observer=True))
        handles.append(
            s.module.register_forward_hook(lambda mod, a, o, l=s.layer: outs.__setitem__(l, o.detach().clone()))
        )
    try:
        with torch.no_grad():
            m(ids())
    finally:
        for h in handles:
            h.remove()
    for s in resolve_sites(m, "mlp", "all"):
        act = seen[s.layer]
        assert act.shape == (2, 7, D_FF)
        # OPT runs its FFN on flattened tokens: compare token by token
        torch.testing.assert_close(
            project(s.module, act).reshape(-1, D), outs[s.layer].reshape(-1, D), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_residual_observer_matches_hidden_states(family):
    m = tiny(family)
    seen = {}
    handles = [capture(s, seen, s.layer, observer=True) for s in resolve_sites(m, "residual", "all")]
    try:
        with torch.no_grad():
            out = m(ids(), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == N_LAYERS + 1
    for l in range(N_LAYERS - 1):
        assert seen[l].shape == (2, 7, D)
        assert torch.equal(seen[l], hs[l + 1]), f"layer {l}"
    # Every family here puts the *final-normed* state in the last entry, so the
    # raw block output differs from it and the final norm maps one to the other.
    last = seen[N_LAYERS - 1]
    assert not torch.allclose(last, hs[-1])
    with torch.no_grad():
        normed = module(m, SPECS[family][2])(last)
    torch.testing.assert_close(normed, hs[-1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- mask


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mlp_mask_changes_exactly_the_masked_neurons(family):
    m = tiny(family)
    x = ids(1)
    with torch.no_grad():
        base = m(x).logits
    site = resolve_sites(m, "mlp", "middle")[0]
    J = torch.tensor([0, 5, 17, D_FF - 1])
    mask = torch.ones(D_FF)
    mask[J] = 0
    keep = mask.bool()
    before, after = {}, {}
    h_mask = register_site_hook(site, lambda a: a * mask)
    h_obs = capture(site, before, 0, observer=True)  # prepended: runs before the mask
    h_raw = site.module.register_forward_pre_hook(lambda mod, args: after.__setitem__(0, args[0].detach().clone()))
    try:
        with torch.no_grad():
            masked = m(x).logits
    finally:
        h_raw.remove()
        h_obs.remove()
    assert (before[0][..., J] != 0).any(), "masked neurons were already zero; test is vacuous"
    raw = after[0].reshape(before[0].shape)  # OPT's fc2 sees [batch * seq, d_ff]
    assert torch.all(raw[..., J] == 0)
    assert torch.equal(raw[..., keep], before[0][..., keep])
    assert not torch.allclose(masked, base)
    h_mask.remove()
    with torch.no_grad():
        assert torch.equal(m(x).logits, base)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt", "falcon"])
def test_residual_mask(family):
    m = tiny(family)
    x = ids(2)
    with torch.no_grad():
        base = m(x).logits
    site = resolve_sites(m, "residual", "penultimate")[0]
    J = torch.tensor([1, 4, D - 1])
    mask = torch.ones(D)
    mask[J] = 0
    keep = mask.bool()
    before, after, nxt = {}, {}, {}
    h_obs = capture(site, before, 0, observer=True)
    h_mask = register_site_hook(site, lambda a: a * mask)
    h_late = capture(site, after, 0)  # registered after the mask: sees its result

    def next_input(mod, args, kwargs):
        nxt[0] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h_next = decoder_layers(m)[site.layer + 1].register_forward_pre_hook(next_input, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = m(x).logits
    finally:
        h_obs.remove()
        h_late.remove()
        h_next.remove()
    assert (before[0][..., J] != 0).all()
    assert torch.all(after[0][..., J] == 0)
    assert torch.equal(after[0][..., keep], before[0][..., keep])
    # the masked state is what flows on: the next block's input is the masked one
    assert torch.equal(nxt[0], after[0])
    assert not torch.allclose(logits, base)
    h_mask.remove()
    with torch.no_grad():
        assert torch.equal(m(x).logits, base)


def test_hook_returning_none_leaves_activation():
    m = tiny("llama")
    x = ids()
    with torch.no_grad():
        base = m(x).logits
    handles = [register_site_hook(s, lambda a: None) for s in resolve_sites(m, "mlp") + resolve_sites(m, "residual")]
    try:
        with torch.no_grad():
            assert torch.equal(m(x).logits, base)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- value vectors


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_value_vector_parameter(family):
    m = tiny(family)
    site = resolve_sites(m, "mlp", "last")[0]
    W, axis = value_vector_parameter(site)
    is_conv1d = type(site.module).__name__ == "Conv1D"
    assert W is site.module.weight
    assert axis == (0 if is_conv1d else 1)
    assert W.shape[axis] == D_FF and W.shape[1 - axis] == D

    seen, outs = {}, {}
    h1 = capture(site, seen, 0, observer=True)
    h2 = site.module.register_forward_hook(lambda mod, a, o: outs.__setitem__(0, o.detach().clone()))
    try:
        with torch.no_grad():
            m(ids(3))
    finally:
        h1.remove()
        h2.remove()
    act = seen[0]
    bias = site.module.bias if site.module.bias is not None else torch.zeros(D)
    with torch.no_grad():
        # the output is the bias plus the sum of each neuron's act_j * value_vector_j
        vv = W.detach().movedim(axis, 0)  # [d_ff, d]
        torch.testing.assert_close(
            outs[0].reshape(act.shape[:-1] + (D,)) - bias, torch.einsum("bsj,jd->bsd", act, vv), rtol=1e-4, atol=1e-5
        )
        # and one neuron alone contributes act_j * value_vector_j
        for j in (0, 7, D_FF - 1):
            only_j = torch.zeros_like(act)
            only_j[..., j] = act[..., j]
            contrib = project(site.module, only_j) - project(site.module, torch.zeros_like(act))
            expected = act[..., j : j + 1] * W.detach().select(axis, j)
            torch.testing.assert_close(contrib, expected, rtol=1e-5, atol=1e-6)


def test_value_vector_rejects_residual():
    with pytest.raises(ValueError, match="mlp"):
        value_vector_parameter(resolve_sites(tiny("llama"), "residual", "last")[0])


# --------------------------------------------------------------------------- PEFT


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_lora_wrapped_sites():
    import peft  # installed by `make test` (the peft extra)

    plain = tiny("llama")
    x = ids(4)
    ref = {}
    hs = [capture(s, ref, s.layer, observer=True) for s in resolve_sites(plain, "mlp")]
    try:
        with torch.no_grad():
            ref_logits = plain(x).logits
    finally:
        for h in hs:
            h.remove()

    wrapped = peft.get_peft_model(
        copy.deepcopy(plain), peft.LoraConfig(target_modules=["down_proj", "q_proj"], r=4)
    ).eval()
    sites = resolve_sites(wrapped, "mlp", "all")
    assert num_layers(wrapped) == N_LAYERS
    assert [s.layer for s in sites] == list(range(N_LAYERS))
    named = dict(wrapped.named_modules())
    for s in sites:
        assert hasattr(s.module, "base_layer"), "the site should be the LoRA wrapper"
        assert isinstance(s.module.base_layer, nn.Linear)
        assert named[s.module_name] is s.module
        assert s.module_name.endswith(f"model.layers.{s.layer}.mlp.down_proj")
        assert s.width == D_FF
        W, axis = value_vector_parameter(s)
        assert W is s.module.base_layer.weight and axis == 1
    for s in resolve_sites(wrapped, "residual", "all"):
        assert s.width == D

    got = {}
    hs = [capture(s, got, s.layer, observer=True) for s in sites]
    try:
        with torch.no_grad():
            logits = wrapped(x).logits
    finally:
        for h in hs:
            h.remove()
    # LoRA B starts at zero: the wrapped model computes the same function
    torch.testing.assert_close(logits, ref_logits)
    for l in range(N_LAYERS):
        torch.testing.assert_close(got[l], ref[l], rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_observer_sees_base_layer_input_and_mask_reaches_it():
    import peft  # installed by `make test` (the peft extra)

    torch.manual_seed(1)
    wrapped = peft.get_peft_model(
        copy.deepcopy(tiny("llama")),
        peft.LoraConfig(target_modules=["down_proj", "q_proj"], r=4, init_lora_weights=False),
    ).eval()
    site = resolve_sites(wrapped, "mlp", "penultimate")[0]
    mask = torch.ones(D_FF)
    mask[:8] = 0
    obs, base_in = {}, {}
    h_obs = capture(site, obs, 0, observer=True)
    h_mask = register_site_hook(site, lambda a: a * mask)
    h_base = site.module.base_layer.register_forward_pre_hook(
        lambda mod, args: base_in.__setitem__(0, args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            wrapped(ids(5))
    finally:
        for h in (h_obs, h_mask, h_base):
            h.remove()
    assert (obs[0][..., :8] != 0).any()
    assert torch.equal(base_in[0], obs[0] * mask)


# --------------------------------------------------------------------------- parse_layers


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        (None, 4, [0, 1, 2, 3]),
        ("all", 4, [0, 1, 2, 3]),
        ("penultimate", 4, [2]),
        ("penultimate", 30, [28]),
        ("Penultimate ", 4, [2]),
        ("last", 4, [3]),
        ("middle", 4, [1]),  # block 1's output is hidden_states[2] = hidden_states[len//2] (len 5)
        ("middle", 5, [2]),  # hidden_states[3] = hidden_states[6 // 2]
        ("second_half", 4, [2, 3]),
        ("second_half", 5, [3, 4]),
        ("-1", 4, [3]),
        ("1,3", 4, [1, 3]),
        ("3, 1, 1", 4, [1, 3]),
        ("0-2", 4, [0, 1, 2]),
        ("1 - 2", 4, [1, 2]),
        ("-2--1", 4, [2, 3]),
        ("0,2-3", 4, [0, 2, 3]),
        (2, 4, [2]),
        (-4, 4, [0]),
        ([3, 0, -1], 4, [0, 3]),
        ((1,), 4, [1]),
        (torch.tensor(2), 4, [2]),
    ],
)
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


def test_middle_matches_inside_hidden_state_index():
    # INSIDE's middle layer is hidden_states[len(hidden_states) // 2]; the
    # "middle" block is the one whose output that entry is.
    for L in range(1, 12):
        (b,) = parse_layers("middle", L)
        assert b + 1 == (L + 1) // 2 or (L == 1 and b == 0)


@pytest.mark.parametrize(
    "spec, bad",
    [
        (4, "4"),
        ("4", "4"),
        (-5, "-5"),
        ("1,7", "7"),
        ("0-9", "9"),
        ([0, 4], "4"),
        ("banana", "banana"),
        ("1;2", "1;2"),
        ("", "''"),
        (" , ", "' , '"),
        ("3-1", "3-1"),
        ("1-", "1-"),
        ([1.5], "1.5"),
        (True, "True"),
    ],
)
def test_parse_layers_errors_name_value_and_range(spec, bad):
    with pytest.raises(ValueError) as e:
        parse_layers(spec, 4, kind="residual")
    msg = str(e.value)
    assert bad in msg
    assert "-4" in msg and "3" in msg, msg  # the valid range [-4, 3]
    assert "residual" in msg


def test_parse_layers_penultimate_needs_two_blocks():
    with pytest.raises(ValueError, match="penultimate"):
        parse_layers("penultimate", 1)


def test_resolve_sites_bad_layers_names_range():
    with pytest.raises(ValueError, match=r"-3\.\.2"):
        resolve_sites(tiny("gpt2"), "mlp", 3)


# --------------------------------------------------------------------------- unknown architectures


class WeirdConfig(PretrainedConfig):
    model_type = "weirdnet_for_tests"

    def __init__(self, hidden_size=16, **kw):
        super().__init__(**kw)
        self.hidden_size = hidden_size


class WeirdBlock(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.ff_in = nn.Linear(d, d_ff)
        self.ff_out = nn.Linear(d_ff, d)

    def forward(self, x):
        return x + self.ff_out(torch.relu(self.ff_in(x)))


class WeirdLM(nn.Module):
    def __init__(self, config, n=3, d_ff=48, vocab=50):
        super().__init__()
        self.config = config
        d = getattr(config, "hidden_size", 16)
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(WeirdBlock(d, d_ff) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_unknown_architecture_raises_helpful_error():
    m = WeirdLM(WeirdConfig())
    for call in (
        lambda: resolve_sites(m, "mlp"),
        lambda: resolve_sites(m, "residual"),
        lambda: num_layers(m),
        lambda: decoder_layers(m),
    ):
        with pytest.raises(UnsupportedArchitectureError) as e:
            call()
        msg = str(e.value)
        assert isinstance(e.value, ValueError)
        assert "weirdnet_for_tests" in msg
        assert "module_path" in msg
        for fam in ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "gptj", "opt", "phi", "falcon"):
            assert fam in msg


def test_module_path_for_unknown_architecture():
    torch.manual_seed(0)
    m = WeirdLM(WeirdConfig()).eval()
    x = torch.randint(0, 50, (2, 5))
    sites = resolve_sites(m, "mlp", "all", module_path="blocks.{layer}.ff_out")
    assert [s.layer for s in sites] == [0, 1, 2]
    assert [s.module_name for s in sites] == [f"blocks.{i}.ff_out" for i in range(3)]
    assert all(s.width == 48 and s.module is m.blocks[s.layer].ff_out for s in sites)
    assert value_vector_parameter(sites[0]) == (m.blocks[0].ff_out.weight, 1)

    (s1,) = resolve_sites(m, "mlp", "penultimate", module_path="blocks.{layer}.ff_out")
    assert s1.layer == 1
    seen = {}
    h = capture(s1, seen, 0, observer=True)
    try:
        with torch.no_grad():
            m(x)
    finally:
        h.remove()
    with torch.no_grad():
        h0 = m.emb(x)
        h0 = m.blocks[0](h0)
        expected = torch.relu(m.blocks[1].ff_in(h0))
    torch.testing.assert_close(seen[0], expected)

    res = resolve_sites(m, "residual", "last", module_path="blocks.{layer}")
    assert [(s.layer, s.module_name, s.width) for s in res] == [(2, "blocks.2", 16)]
    assert res[0].module is m.blocks[2]

    with pytest.raises(ValueError, match="layer"):
        resolve_sites(m, "mlp", module_path="blocks.0.ff_out")
    with pytest.raises(ValueError, match="matches no module"):
        resolve_sites(m, "mlp", module_path="layers.{layer}.ff_out")
    with pytest.raises(ValueError, match="out of range"):
        resolve_sites(m, "mlp", 3, module_path="blocks.{layer}.ff_out")


def test_residual_width_without_hidden_size_is_a_clear_error():
    m = WeirdLM(PretrainedConfig())
    with pytest.raises(UnsupportedArchitectureError, match="hidden size"):
        resolve_sites(m, "residual", module_path="blocks.{layer}")


def test_unknown_model_type_with_llama_layout_still_resolves():
    cfg = AutoConfig.for_model("llama", **SPECS["llama"][0])
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    m.config.model_type = "some_llama_clone"
    sites = resolve_sites(m, "mlp", "all")
    assert [s.module_name for s in sites] == [f"model.layers.{i}.mlp.down_proj" for i in range(N_LAYERS)]
    assert all(s.width == D_FF for s in sites)
    assert num_layers(m) == N_LAYERS


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_remove_leaves_no_hooks_behind(family):
    m = tiny(family)
    before = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    sites = resolve_sites(m, "mlp") + resolve_sites(m, "residual")
    handles = [register_site_hook(s, lambda a: a, observer=obs) for s in sites for obs in (False, True)]
    for s in sites:
        assert s.block is decoder_layers(m)[s.layer]
    for h in handles:
        h.remove()
    with register_site_hook(sites[0], lambda a: None):  # handles are context managers
        pass
    after = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    assert after == before

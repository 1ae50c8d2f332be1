"""Tests for ``neurodetox.patching`` (MINT, Gu et al., arXiv 2312.05356) on tiny offline models.

The checks are written against independent references: the direction against
``G δ = u_t − u_a`` and the logits it moves, the update rule against its
formula, the locators against finite differences and explicit sums, and the
checkpoint writer against sha256 of every file on disk.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import make_tokenizer

from neurodetox.core.sites import resolve_sites, value_vector_parameter
from neurodetox.patching import (
    CheckpointError,
    MintSettings,
    ParamPatch,
    PatchMismatchError,
    PatchSet,
    apply_to_checkpoint,
    bind_to_checkpoint,
    checkpoint_states,
    coerce_edits,
    encode_edit,
    find_failures,
    folder_sha256,
    inspect_checkpoint,
    neuron_scores,
    repair,
    revert_checkpoint,
    semantic_space,
    tensor_sha256,
    update_rule,
    verify_checkpoint,
)
from neurodetox.patching import checkpoint as ckpt_mod
from neurodetox.patching.direction import SemanticSpace, final_norm_gain

FIX_EDIT = {"prompt": "the capital of france is", "target": "paris"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: threads only add contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(init: float = 0.4, seed: int = 0, layers: int = 4, dtype=torch.float32):
    """A tiny Llama with peaky logits (larger init than the conftest one, so patches can flip argmaxes)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(make_tokenizer()),
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=init,
    )
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def save_checkpoint(model, tok, folder, **kw):
    model.save_pretrained(folder, **kw)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A checkpoint, a model loaded from it and a bound patch that fixes FIX_EDIT."""
    from neurodetox.core.models import load_model

    torch.set_num_threads(1)
    tok = make_tokenizer()
    folder = save_checkpoint(make_model(), tok, tmp_path_factory.mktemp("ckpt") / "base")
    model, tok = load_model(str(folder))
    model.eval()
    patch, report = repair(model, tok, [FIX_EDIT], show_progress=False)
    assert report.edits[0].status == "fixed", report.to_json()
    bind_to_checkpoint(patch, folder)
    return folder, model, tok, patch, report


# ----------------------------------------------------------------------------- direction


@pytest.mark.parametrize("fold", [False, True])
def test_direction_solves_G_delta(fold):
    model = make_model().double()
    space = SemanticSpace(model.get_output_embeddings().weight, final_norm_gain(model) if fold else None)
    W = model.get_output_embeddings().weight.detach().double()
    g = final_norm_gain(model).double() if fold else torch.ones(W.shape[1], dtype=torch.float64)
    Wf = W * g  # W_U diag(g)
    t, a = 7, 11
    delta = space.delta(t, a)
    torch.testing.assert_close(Wf.T @ Wf @ delta, Wf[t] - Wf[a], rtol=1e-6, atol=1e-8)
    tau = space.tau(t, a)
    assert float(tau.max() - tau.min()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(tau.double() / (tau.double().norm()), delta / delta.norm(), atol=1e-5)


def test_moving_final_hidden_along_delta_raises_target_logit():
    model = make_model()
    tok = make_tokenizer()
    ids = torch.tensor([tok("the capital of france is")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1][0, -1].double()  # after the final norm, what the head reads
    W = model.get_output_embeddings().weight.detach().double()
    logits = W @ h
    a = int(logits.argmax())
    t = int(torch.argsort(logits)[0])  # the least likely token
    delta = semantic_space(model).delta(t, a)
    for eps in (0.01, 0.1, 1.0):
        new = W @ (h + eps * delta)
        gain = float((new[t] - new[a]) - (logits[t] - logits[a]))
        # Δ(logit_t − logit_a) = ε δᵀ G δ = ε (u_t − u_a)·δ > 0
        assert gain == pytest.approx(eps * float((W[t] - W[a]) @ delta), rel=1e-6)
        assert gain > 0
    # δ is the smallest such change: any other d with the same gain is longer (min-norm in the G metric)
    G = W.T @ W
    other = delta + 0.1 * torch.randn_like(delta)
    other = other * (float((W[t] - W[a]) @ delta) / float((W[t] - W[a]) @ other))
    assert float(other @ G @ other) > float(delta @ G @ delta)


def test_orthogonalised_direction_is_orthogonal_to_used():
    space = semantic_space(make_model())
    used = [space.tau(3, 4), space.tau(5, 6)]
    tau = space.tau(7, 8, used)
    for u in used:
        assert abs(float(tau @ u)) / (float(tau.norm()) * float(u.norm())) < 1e-5


def test_semantic_space_is_cached_per_model():
    model = make_model()
    assert semantic_space(model) is semantic_space(model)
    assert semantic_space(model, fold_norm=True) is not semantic_space(model)


# ----------------------------------------------------------------------------- update rule


def test_update_rule_formula():
    from neurodetox.patching.mint import _step_scale

    w, tau = torch.randn(32), torch.randn(32)
    for alpha in (0.01, 0.1, 1.0):
        for sign in (1.0, -1.0):
            assert torch.equal(update_rule(w, tau, alpha, sign, "interpolate"), (w + alpha * sign * tau) / (1 + alpha))
            assert torch.equal(update_rule(w, tau, alpha, sign, "additive"), w + alpha * sign * tau)
            assert torch.equal(update_rule(w, tau, alpha, sign), update_rule(w, tau, alpha, sign, "additive"))
            # the step scale c(α) of the guard's head-change cache: Δ(α) = c(α) · v with v independent of α
            for rule, v in (("interpolate", sign * tau - w), ("additive", sign * tau)):
                c = _step_scale(alpha, rule)
                assert torch.allclose(update_rule(w, tau, alpha, sign, rule) - w, c * v, atol=1e-6)
    with pytest.raises(ValueError, match="valid rules are additive, interpolate"):
        update_rule(w, tau, 0.1, 1.0, "multiply")
    with pytest.raises(ValueError, match="unknown update 'multiply'; valid updates are additive, interpolate"):
        MintSettings(update="multiply").validate()


@pytest.mark.parametrize("rule", ["additive", "interpolate"])
def test_repair_writes_exactly_the_update_rule(rule):
    model = make_model()
    tok = make_tokenizer()
    settings = MintSettings(
        update=rule,
        alpha=0.5,
        alpha_steps=(1.0,),
        max_patches=1,
        entropy_guard=False,
        prune=False,
        selectivity=False,
        fold_norm=False,
    )
    edit = encode_edit(tok, coerce_edits([FIX_EDIT])[0])
    fail = find_failures(model, edit)[0]
    patch, report = repair(model, tok, [FIX_EDIT], settings, show_progress=False)
    f = report.edits[0].failures[0]
    assert len(f.patches) == 1
    p = f.patches[0]
    tau = semantic_space(model).tau(fail.target_id, fail.argmax_id)
    site = resolve_sites(model, "mlp", [p["layer"]])[0]
    weight, axis = value_vector_parameter(site)
    old = weight.detach().select(axis, p["index"]).float()
    expected = old + 0.5 * p["sign"] * tau
    if rule == "interpolate":
        expected = expected / 1.5
    if report.edits[0].status == "fixed":
        pp = patch.params[0]
        got = pp.new.select(pp.axis, pp.indices.tolist().index(p["index"]))
        assert torch.equal(got, expected)
    else:  # not fixed in one patch: undone, the model is unchanged
        assert len(patch) == 0
    assert torch.equal(weight.detach().select(axis, p["index"]).float(), old)  # repair leaves the model as it was


# ----------------------------------------------------------------------------- locators


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


# ----------------------------------------------------------------------------- repair + patch set


def test_repair_fixes_and_leaves_model_unchanged(fixed):
    _, model, tok, patch, report = fixed
    e = report.edits[0]
    assert e.status == "fixed" and 1 <= len(e.neurons) <= 10
    assert find_failures(model, e.edit)  # the model itself was restored
    patch.apply(model)
    try:
        assert not find_failures(model, e.edit)
    finally:
        patch.revert(model)


def test_nothing_to_fix_is_reported():
    model = make_model()
    tok = make_tokenizer()
    edit = encode_edit(tok, coerce_edits([{"prompt": "the capital of", "target": "x"}])[0])
    with torch.no_grad():
        pred = int(model(input_ids=torch.tensor([edit.prompt_ids])).logits[0, -1].argmax())
    target = tok.decode([pred]).strip()
    patch, report = repair(model, tok, [{"prompt": "the capital of", "target": target}], show_progress=False)
    assert report.edits[0].status == "nothing_to_fix"
    assert "nothing to fix" in report.edits[0].message and len(patch) == 0


def test_patchset_apply_revert_bit_exact_and_roundtrip(fixed, tmp_path):
    _, model, _, patch, _ = fixed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch.apply(model)
    assert patch.apply(model) == 0  # idempotent
    assert set(patch.states(model).values()) == {"patched"}
    patch.revert(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    path = patch.save(tmp_path / "p")
    loaded = PatchSet.load(tmp_path / "p")
    assert path.name == "manifest.json" and (tmp_path / "p" / "patch.safetensors").is_file()
    assert [p.name for p in loaded.params] == [p.name for p in patch.params]
    for a, b in zip(loaded.params, patch.params):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.original, b.original) and torch.equal(a.new, b.new)
    m = json.loads(path.read_text())
    for key in ("base", "tensors", "edits", "neurons", "settings", "library", "payload", "summary"):
        assert key in m
    name = patch.params[0].name
    assert len(m["tensors"][name]["sha256_original"]) == 64
    assert m["edits"][0]["status"] == "fixed" and m["edits"][0]["neurons"]


def test_patchset_in_memory_mismatch_names_tensor(fixed):
    _, _, _, patch, _ = fixed
    other = make_model(seed=1)
    with pytest.raises(PatchMismatchError, match=patch.params[0].name.replace(".", r"\.")):
        patch.apply(other)


def test_tampered_payload_is_refused(fixed, tmp_path):
    _, _, _, patch, _ = fixed
    patch.save(tmp_path / "p")
    f = tmp_path / "p" / "patch.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        PatchSet.load(tmp_path / "p")


# ----------------------------------------------------------------------------- checkpoints


def test_apply_revert_checkpoint_bit_exact(fixed, tmp_path):
    folder, _, _, patch, _ = fixed
    import shutil

    work = tmp_path / "c"
    shutil.copytree(folder, work)
    before = folder_sha256(work)
    res = apply_to_checkpoint(work, patch)
    assert res.shards == ["model.safetensors"] and res.written
    assert set(checkpoint_states(work, patch).values()) == {"patched"}
    assert folder_sha256(work)["config.json"] == before["config.json"]
    assert apply_to_checkpoint(work, patch).written == []  # idempotent
    revert_checkpoint(work, patch)
    assert folder_sha256(work) == before
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_fixed_failure_stays_fixed_after_reload(fixed, tmp_path):
    from neurodetox.core.models import load_model

    folder, _, _, patch, report = fixed
    out = tmp_path / "patched"
    apply_to_checkpoint(folder, patch, out=out)
    model, tok = load_model(str(out))
    edit = encode_edit(tok, coerce_edits([FIX_EDIT])[0])
    assert not find_failures(model, edit)
    assert edit.target_ids == report.edits[0].edit.target_ids


def test_hash_mismatch_refused_naming_tensor(fixed, tmp_path):
    folder, _, tok, patch, _ = fixed
    other = save_checkpoint(make_model(seed=3), tok, tmp_path / "other")
    before = folder_sha256(other)
    with pytest.raises(PatchMismatchError) as err:
        apply_to_checkpoint(other, patch)
    assert patch.params[0].name in str(err.value) and "model.safetensors" in str(err.value)
    assert folder_sha256(other) == before
    with pytest.raises(PatchMismatchError, match="already 'original'|not the checkpoint"):
        verify_checkpoint(folder, patch, expect="patched")


def test_killed_apply_leaves_checkpoint_unchanged(fixed, tmp_path, monkeypatch):
    folder, _, _, patch, _ = fixed
    import shutil

    work = tmp_path / "c"
    shutil.copytree(folder, work)
    before = folder_sha256(work)
    real = ckpt_mod._write_shard

    def dying(src, tmp, updates):
        real(src, tmp, updates)
        with open(tmp, "r+b") as f:  # half-written garbage, then the "kill"
            f.truncate(os.path.getsize(tmp) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        apply_to_checkpoint(work, patch)
    assert folder_sha256(work) == before
    assert sorted(p.name for p in work.iterdir()) == sorted(before)


def test_sharded_checkpoint_touches_only_touched_shards(fixed, tmp_path):
    folder, model, tok, patch, _ = fixed
    sharded = save_checkpoint(model, tok, tmp_path / "sharded", max_shard_size="60KB")
    info = inspect_checkpoint(sharded)
    assert info.index_file is not None and len(info.shards) >= 3
    touched = {info.shard_of(p.name) for p in patch.params}
    before = folder_sha256(sharded)
    mtimes = {p.name: p.stat().st_mtime_ns for p in sharded.iterdir()}
    res = apply_to_checkpoint(sharded, patch)
    assert set(res.shards) == touched
    after = folder_sha256(sharded)
    for p in sharded.iterdir():
        if p.name not in touched:
            assert after[p.name] == before[p.name] and p.stat().st_mtime_ns == mtimes[p.name], p.name
        else:
            assert after[p.name] != before[p.name]
    revert_checkpoint(sharded, patch)
    assert folder_sha256(sharded) == before


def test_bf16_checkpoint_roundtrip_reports_cast_error(tmp_path):
    from neurodetox.core.models import load_model

    tok = make_tokenizer()
    folder = save_checkpoint(make_model(dtype=torch.bfloat16), tok, tmp_path / "bf16", max_shard_size="80KB")
    model, tok = load_model(str(folder))  # computes in float32
    assert model.dtype == torch.float32
    settings = MintSettings(storage_dtype="bfloat16")
    patch, report = repair(model, tok, [FIX_EDIT], settings, show_progress=False)
    if not len(patch):
        pytest.skip("the bf16 tiny model could not be fixed")
    bind_to_checkpoint(patch, folder)
    assert {v["dtype"] for v in patch.manifest["tensors"].values()} == {"bfloat16"}
    # updates were rounded to bf16 while repairing: storing them loses nothing more
    res = apply_to_checkpoint(folder, patch, out=tmp_path / "bf16-patched")
    assert res.dtype and set(res.dtype.values()) == {"bfloat16"}
    assert max(res.cast_error.values()) == 0.0
    # an unrounded float32 patch gets a non-zero, reported cast error
    p0 = patch.params[0]
    assert p0.cast_error(torch.bfloat16) == 0.0
    assert ParamPatch(p0.name, p0.axis, p0.indices, p0.original, p0.new + 1e-4).cast_error(torch.bfloat16) > 0
    reloaded, _ = load_model(str(tmp_path / "bf16-patched"))
    assert not find_failures(reloaded, report.edits[0].edit)
    before = folder_sha256(folder)
    revert_checkpoint(tmp_path / "bf16-patched", patch)
    after = folder_sha256(tmp_path / "bf16-patched")
    for name in before:
        assert after[name] == before[name], name


def test_peft_adapter_only_folder_message(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"merge_and_unload\(\).*save_pretrained"):
        inspect_checkpoint(tmp_path)


def test_zero_folder_message(tmp_path):
    (tmp_path / "global_step10").mkdir()
    (tmp_path / "latest").write_text("global_step10")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"deepspeed\.utils\.zero_to_fp32.*convert_zero_checkpoint_to_fp32"):
        inspect_checkpoint(tmp_path)


def test_missing_and_bin_only_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        inspect_checkpoint(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        inspect_checkpoint(tmp_path)


def test_tensor_sha256_is_the_stored_bytes(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": t}, tmp_path / "x.safetensors")
    start, header = ckpt_mod._header(tmp_path / "x.safetensors")
    lo, hi = header["w"]["data_offsets"]
    raw = (tmp_path / "x.safetensors").read_bytes()[start + lo : start + hi]
    import hashlib

    assert tensor_sha256(t) == hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------- CLI


def test_cli_find_apply_show_eval_revert(tmp_path, capsys):
    from neurodetox.cli.patch import cmd_patch

    tok = make_tokenizer()
    folder = save_checkpoint(make_model(), tok, tmp_path / "base")
    before = folder_sha256(folder)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        json.dumps({"prompt": "the capital of germany is", "target": "berlin", "paraphrases": ["germany capital is"]})
        + "\n"
    )
    rc = cmd_patch(
        [
            "--threads",
            "1",
            "--quiet",
            "find",
            "--model",
            str(folder),
            "--prompt",
            FIX_EDIT["prompt"],
            "--target",
            FIX_EDIT["target"],
            "--edits",
            str(edits),
            "--out",
            str(tmp_path / "patch"),
        ]
    )
    assert rc in (0, 1)  # 1: some edit skipped, the patch holds the fixed ones
    assert (tmp_path / "patch" / "manifest.json").is_file()
    assert cmd_patch(["apply", str(folder), str(tmp_path / "patch"), "--in-place"]) == 0
    assert cmd_patch(["verify", str(folder), str(tmp_path / "patch")]) == 0
    assert "checkpoint is patched" in capsys.readouterr().out
    assert cmd_patch(["show", str(tmp_path / "patch")]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "before" in out and "after" in out
    assert (
        cmd_patch(
            [
                "--quiet",
                "eval",
                str(folder),
                str(tmp_path / "patch"),
                "--facts",
                str(_tiny_facts(tmp_path)),
                "--unrelated",
                "5",
                "--reference-texts",
                "3",
                "--max-new-tokens",
                "2",
                "--json",
                str(tmp_path / "ev.json"),
            ]
        )
        == 0
    )
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["success"] > 0 and ev["unrelated_prompts"] == 5
    assert cmd_patch(["revert", str(folder), str(tmp_path / "patch"), "--in-place"]) == 0
    assert folder_sha256(folder) == before
    # a different model is refused, naming the tensor, exit status 1
    other = save_checkpoint(make_model(seed=5), tok, tmp_path / "other")
    assert cmd_patch(["apply", str(other), str(tmp_path / "patch"), "--in-place"]) == 1
    assert "mlp.down_proj.weight" in capsys.readouterr().err
    # bad usage: exit status 2 with a message
    assert cmd_patch(["apply", str(folder), str(tmp_path / "patch")]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_cli_update_rule_reaches_the_manifest(tmp_path, capsys):
    from neurodetox.cli.patch import cmd_patch

    folder = save_checkpoint(make_model(), make_tokenizer(), tmp_path / "base")
    for rule in ("interpolate", "additive"):
        out = tmp_path / rule
        rc = cmd_patch(
            [
                "--threads",
                "1",
                "--quiet",
                "find",
                "--model",
                str(folder),
                "--prompt",
                FIX_EDIT["prompt"],
                "--target",
                FIX_EDIT["target"],
                "--update",
                rule,
                "--out",
                str(out),
            ]
        )
        assert rc in (0, 1)
        assert json.loads((out / "manifest.json").read_text())["settings"]["update"] == rule
    with pytest.raises(SystemExit):
        cmd_patch(
            [
                "find",
                "--model",
                str(folder),
                "--prompt",
                "x",
                "--target",
                "y",
                "--update",
                "shrink",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
    assert "invalid choice: 'shrink'" in capsys.readouterr().err


def _tiny_facts(tmp_path):
    rows = []
    for i, (s, a) in enumerate(
        [
            ("france", "paris"),
            ("germany", "berlin"),
            ("italy", "rome"),
            ("spain", "madrid"),
            ("japan", "tokyo"),
            ("france", "euro"),
            ("japan", "yen"),
            ("italy", "europe"),
            ("spain", "europe"),
            ("japan", "asia"),
        ]
    ):
        rows.append(
            {
                "fact_id": f"f{i}",
                "relation": "r",
                "subject": s,
                "answer": a,
                "aliases": [a],
                "prompt": f"the capital of {s} is",
                "statement": f"the capital of {s} is {a} .",
                "paraphrases": [f"{s} capital is", f"capital of {s} :"],
            }
        )
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ----------------------------------------------------------------------------- reference check

REFERENCE = [
    "the capital of germany is",
    "the capital of italy is",
    "the capital of spain is",
    "japan is located in",
    "the currency of japan is the",
    "france is located in",
    "the capital of japan is",
    "germany is located in",
    "the capital of",
    "italy is located in",
    "spain is located in",
    "the currency of france is the",
]


def _next_tokens_one_by_one(model, tok, prompts):
    with torch.no_grad():
        return [int(model(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1].argmax()) for p in prompts]


def test_reference_check_counts_changed_predictions_and_retries_without_rejected_neurons():
    tok = make_tokenizer()
    model = make_model()
    before = _next_tokens_one_by_one(model, tok, REFERENCE)
    runs = {}
    for retries in (0, 2):
        s = MintSettings(verify_reference=True, reference_retries=retries, max_reference_flips=0)
        patch, report = repair(model, tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
        e = report.edits[0]
        assert e.status == "fixed", report.to_json()
        patch.apply(model)
        try:
            after = _next_tokens_one_by_one(model, tok, REFERENCE)  # unbatched, independent of the check's forward
        finally:
            patch.revert(model)
        assert e.reference_flips == sum(a != b for a, b in zip(before, after))
        runs[retries] = e
    first, retried = runs[0], runs[2]
    assert first.attempts == 1
    assert first.reference_flips > 0, "the tiny model should change some reference prediction (else nothing is tested)"
    assert retried.attempts > 1 and retried.reference_flips <= first.reference_flips
    if retried.neurons != first.neurons:  # a later attempt was kept: it could not use the rejected neurons
        assert not set(retried.neurons) & set(first.neurons)
        assert "attempt" in retried.message
    off = repair(model, tok, [FIX_EDIT], MintSettings(), show_progress=False, reference_prompts=REFERENCE)[1].edits[0]
    assert off.reference_flips is None and off.neurons == first.neurons  # the check does not change attempt 1


def test_reference_settings_are_validated():
    with pytest.raises(ValueError, match="max_reference_flips"):
        MintSettings(max_reference_flips=-1).validate()
    with pytest.raises(ValueError, match="reference_retries"):
        MintSettings(reference_retries=1.5).validate()


def test_compare_splits_changed_unrelated_answers_by_correctness():
    from neurodetox.patching.edit_metrics import compare

    unrelated = [{"prompt": f"q{i}", "aliases": [a]} for i, a in enumerate(["paris", "rome", "tokyo", "berlin", "yen"])]
    state = lambda answers, nxt: {
        "teacher_forced": [],
        "edit_answers": [],
        "paraphrase_answers": [],
        "unrelated_answers": answers,
        "unrelated_next": nxt,
        "perplexity": float("nan"),
    }
    before = state([" Paris.", " Rome.", " Kyoto.", " Madrid.", " Euro."], [1, 2, 3, 4, 5])
    after = state([" Paris.", " Milan.", " Osaka.", " Berlin.", " Euro."], [1, 9, 9, 9, 5])
    res = compare(before, after, [], unrelated)
    # q1 right->wrong, q2 wrong->wrong, q3 wrong->right; q0 and q4 unchanged
    assert res["specificity"] == pytest.approx(2 / 5)
    assert res["known_facts"] == 2 and res["known_facts_kept"] == pytest.approx(1 / 2)
    assert res["changes"] == {"right_to_wrong": 1, "wrong_to_right": 1, "wrong_to_wrong": 1, "right_to_right": 0}
    plain = compare(before, after, [], [u["prompt"] for u in unrelated])  # prompts only: no breakdown
    assert "known_facts_kept" not in plain and plain["specificity"] == res["specificity"]


@pytest.mark.parametrize("family", __import__("test_sites").FAMILY_NAMES)
def test_plan_gaps_equal_writing_each_patch(family):
    """The batched plan (shared prefix, one row per candidate, rows added at
    their own layer, the block below them replayed) gives, for every row, the
    gap and argmax of a separate forward with that value vector really written
    into the weights, for candidates in several layers."""
    from test_sites import tiny

    from neurodetox.core.sites import decoder_layers
    from neurodetox.patching.locate import Candidate
    from neurodetox.patching.mint import _NO_SHARED_PREFIX, _measure, _plan, _PrefixCache

    model = copy.deepcopy(tiny(family))
    sites = resolve_sites(model, "mlp", "all")
    by_layer = {s.layer: s for s in sites}
    layers = sorted(by_layer)[1:]  # the lowest candidate layer is above block 0: the prefix is shared
    ids = [5, 9, 3, 17, 11, 4]
    target = 7
    g = torch.Generator().manual_seed(1)
    cands, deltas = [], []
    for k, layer in enumerate(layers * 2):
        weight, axis = value_vector_parameter(by_layer[layer])
        cands.append(Candidate(layer=layer, index=(3 * k + 1) % weight.shape[axis], score=0.0, activation=1.0))
        deltas.append(20.0 * torch.randn(weight.shape[1 - axis], generator=g))
    # every block's batch: one row (the unpatched model) below the lowest candidate layer, one more
    # per candidate from its own layer up; the block below replays its recorded output
    blocks = list(decoder_layers(model))
    seen: dict[int, list] = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(o)) for i, b in enumerate(blocks)
    ]
    prefix = _PrefixCache(model, below=layers[0])
    try:
        gaps, args = _plan(model, by_layer, ids, target, cands, deltas, prefix=prefix)  # records block 0
        again, again_args = _plan(model, by_layer, ids, target, cands, deltas, prefix=prefix)  # replays it
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(gaps, again) and torch.equal(args, again_args)
    first = seen[0]
    assert len(first) == 2 and first[1] is prefix.store[tuple(ids)]  # the recording, not a new forward
    for i in range(1, len(blocks)):
        out = seen[i][0] if isinstance(seen[i][0], torch.Tensor) else seen[i][0][0]
        assert out.shape[0] == 1 + sum(c.layer <= i for c in cands), (family, i)
    assert "forward" not in blocks[0].__dict__  # the replay was undone
    full_gaps, full_args = _plan(model, by_layer, ids, target, cands, deltas, share_prefix=False)
    base_gap, _ = _measure(model, ids, target)
    for r, (c, d) in enumerate(zip(cands, deltas)):
        weight, axis = value_vector_parameter(by_layer[c.layer])
        col = weight.detach().select(axis, c.index)
        orig = col.clone()
        with torch.no_grad():
            col.add_(d.to(col.dtype))
        try:
            gap, arg = _measure(model, ids, target)
        finally:
            with torch.no_grad():
                col.copy_(orig)
        assert gaps[r].item() == pytest.approx(gap, abs=2e-6), (family, r)
        assert full_gaps[r].item() == pytest.approx(gap, abs=2e-6), (family, r)
        assert int(args[r]) == arg == int(full_args[r])
    assert (gaps - base_gap).abs().max() > 1e-4  # the patches change the prediction: the check can fail
    assert type(model) not in _NO_SHARED_PREFIX  # the shared prefix really ran


@pytest.mark.parametrize("family", __import__("test_sites").FAMILY_NAMES)
def test_prefix_cache_replays_recorded_blocks_for_the_same_ids_and_their_prefixes(family):
    """After one recorded forward, a forward over the same ids, a prefix of
    them, or a right-padded batch of both gives the logits of a plain forward
    without running the replayed blocks (their weights are scrambled
    meanwhile, and the result is unchanged); the locator's gradient scores are
    unchanged with a frozen model; other ids run the blocks."""
    from test_sites import tiny

    from neurodetox.core.logits import tail_logits
    from neurodetox.core.sites import decoder_layers
    from neurodetox.patching.failures import right_pad
    from neurodetox.patching.mint import _PrefixCache

    model = copy.deepcopy(tiny(family)).eval()
    ids = [5, 9, 3, 17, 11, 4, 8]

    def logits(x):
        with torch.no_grad():
            return tail_logits(model, len(x), input_ids=torch.tensor([x]))[0]

    want_full, want_cut, want_other = logits(ids), logits(ids[:4]), logits([6, 2, 9])
    cache = _PrefixCache(model, below=2)
    with cache.replay(ids):
        assert torch.allclose(logits(ids), want_full, atol=1e-6)  # recorded
    block_params = [p for b in list(decoder_layers(model))[:2] for p in b.parameters()]
    saved = [p.detach().clone() for p in block_params]
    with torch.no_grad():
        for p in block_params:
            p.add_(torch.randn_like(p))  # the replayed blocks would now compute something else
    try:
        with cache.replay(ids):
            assert torch.allclose(logits(ids), want_full, atol=1e-6)
        with cache.replay(ids[:4]):
            assert torch.allclose(logits(ids[:4]), want_cut, atol=1e-5)
        # a right-padded batch of recorded ids (one a prefix): each row's real positions as alone
        ids_b, mask_b = right_pad([ids, ids[:4]])
        with cache.replay_batch([ids, ids[:4]]), torch.no_grad():
            batch = tail_logits(model, ids_b.shape[1], input_ids=ids_b, attention_mask=mask_b)
        if family != "gptj":  # its blocks also return attention weights: a batch is not stacked, the blocks run
            assert torch.allclose(batch[0], want_full, atol=1e-5)
            assert torch.allclose(batch[1, :4], want_cut, atol=1e-5)
        # under grad mode the replayed input is a leaf: the locator's backward reaches the searched blocks
        sites = resolve_sites(model, "mlp", "all")[2:]
        for p in model.parameters():
            p.requires_grad_(False)
        with cache.replay(ids[:5], grad=True):
            scores, acts, lg = neuron_scores(model, sites, ids[:5], 7, 3)
        for p, s in zip(block_params, saved):
            with torch.no_grad():
                p.copy_(s)
        plain_scores, plain_acts, plain_lg = neuron_scores(model, sites, ids[:5], 7, 3)
        assert torch.allclose(scores, plain_scores, atol=1e-6, rtol=1e-4) and scores.abs().max() > 0
        assert torch.allclose(lg, plain_lg, atol=1e-5)
        with torch.no_grad():
            for p in block_params:
                p.add_(torch.randn_like(p))
        with cache.replay([6, 2, 9]):  # not recorded: the blocks run (scrambled), and it is recorded
            assert not torch.allclose(logits([6, 2, 9]), want_other, atol=1e-3)
    finally:
        with torch.no_grad():
            for p, s in zip(block_params, saved):
                p.copy_(s)
    assert all("forward" not in b.__dict__ for b in decoder_layers(model))


def test_next_token_predictions_equal_unbatched_forwards():
    """Left-padded batches of mixed lengths (batch smaller than the prompt list) give each prompt's own argmax."""
    from neurodetox.patching.edit_metrics import next_token_predictions

    tok = make_tokenizer()
    model = make_model()
    got = next_token_predictions(model, tok, REFERENCE, batch_size=5)
    assert got == _next_tokens_one_by_one(model, tok, REFERENCE)
    assert len(set(len(tok(p)["input_ids"]) for p in REFERENCE)) > 1  # padding really happens
    assert len(set(got)) > 1  # not one constant prediction


def test_reference_statistics_cache_follows_the_weights(monkeypatch):
    """The selectivity statistics are computed once per weights: reused while the
    weights are untouched or written back to the same values, recomputed after a change."""
    from neurodetox.patching import mint

    calls = []
    real = mint.reference_stats
    monkeypatch.setattr(mint, "reference_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = make_tokenizer()
    model = make_model()
    sites = resolve_sites(model, "mlp", "second_half")
    first = mint._cached_reference(model, tok, sites, REFERENCE)
    assert mint._cached_reference(model, tok, sites, REFERENCE) is first and len(calls) == 1
    weight, axis = value_vector_parameter(sites[0])
    col = weight.detach().select(axis, 3)
    orig = col.clone()
    with torch.no_grad():
        col.add_(0.5)
    changed = mint._cached_reference(model, tok, sites, REFERENCE)
    assert len(calls) == 2 and changed is not first
    with torch.no_grad():
        col.copy_(orig)  # written back: same values, so the fingerprint matches the first one again
    assert mint._fingerprint(model) == mint._fingerprint(model)
    mint._cached_reference(model, tok, sites, REFERENCE)
    assert len(calls) == 3  # the single-entry cache held the changed weights' statistics
    with torch.no_grad():
        col.add_(0.0)  # an in-place write that keeps every value: recomputed fingerprint, cache hit
    mint._cached_reference(model, tok, sites, REFERENCE)
    assert len(calls) == 3


def test_weights_fingerprint_recomputes_written_tensors_only(monkeypatch):
    """After an in-place write the fingerprint equals one computed from scratch,
    and only the written tensor is summed again."""
    from neurodetox.patching import mint

    model = make_model()
    first = mint._fingerprint(model)
    weight, axis = value_vector_parameter(resolve_sites(model, "mlp", "last")[0])
    with torch.no_grad():
        weight.select(axis, 2).add_(0.25)
    summed = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: summed.append(self.shape) or real_sum(self, *a, **k))
    after = mint._fingerprint(model)
    monkeypatch.setattr(torch.Tensor, "sum", real_sum)
    assert summed == [weight.shape, weight.shape]  # its sum and abs-sum only
    mint._FINGERPRINTS.pop(model)
    assert after == mint._fingerprint(model) != first


def test_entropy_neuron_scores_equal_an_svd_of_the_head():
    """ρ_j = ‖U_kᵀ w_j‖ / ‖w_j‖ with U_k the bottom right singular vectors of W_U
    (an independent SVD in float64)."""
    from neurodetox.core.sites import base_model
    from neurodetox.patching.neurons import entropy_neuron_scores

    model = make_model()
    W_U = base_model(model).get_output_embeddings().weight.detach().double()
    _, _, Vh = torch.linalg.svd(W_U, full_matrices=False)
    k = max(1, round(0.25 * W_U.shape[1]))
    U = Vh[-k:].T  # [d, k], smallest singular values
    weight, axis = value_vector_parameter(resolve_sites(model, "mlp", "last")[0])
    W = weight.detach().double()
    W = W if axis == 1 else W.T
    expect = (U.T @ W).norm(dim=0) / W.norm(dim=0)
    got = entropy_neuron_scores(model, -1, bottom_fraction=0.25)
    assert torch.allclose(got.double(), expect, atol=1e-5)
    assert torch.equal(entropy_neuron_scores(model, -1, bottom_fraction=0.25), got)  # cached eigenvectors


def test_guard_predicted_logits_match_a_real_last_layer_patch():
    """For a last-layer neuron the guard's prediction (direct path through the
    final norm and LM head) matches the logits of a forward with the patch
    really written, up to the change of the norm's scale that it leaves out;
    the predicted flips are the argmax changes of those logits."""
    from neurodetox.patching.locate import Candidate

    tok, model, site, stats, head, gain = _last_layer_reference()
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


def test_guard_plans_the_candidate_with_fewest_predicted_flips(monkeypatch):
    """With the guard, the plan takes the candidate predicted to flip the fewest
    reference prompts, even when it is the lowest-ranked one."""
    from neurodetox.patching import mint
    from neurodetox.patching.locate import ReferenceStats

    seen = []
    real_top = mint.top_candidates
    monkeypatch.setattr(mint, "top_candidates", lambda *a, **k: seen.append(real_top(*a, **k)) or seen[-1])
    monkeypatch.setattr(
        ReferenceStats,
        "predicted_flips",
        lambda self, head, gain, cands, deltas, dlog=None: torch.tensor(
            [0 if (c.layer, c.index) == (seen[-1][-1].layer, seen[-1][-1].index) else 5 for c in cands]
        ),
    )
    tok = make_tokenizer()
    model = make_model()
    patch, report = repair(
        model,
        tok,
        [FIX_EDIT],
        MintSettings(max_patches=1, guard_fallback=False, relocate_fallback=False),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    first = report.edits[0].failures[0].patches[0]
    assert len(seen[0]) > 1
    assert (first["layer"], first["index"]) == (seen[0][-1].layer, seen[0][-1].index)


def test_guard_falls_back_to_gain_alone_for_a_failure_it_cannot_fix(monkeypatch):
    """A failure the guarded plan leaves unfixed is repaired again without the
    guard; the result equals a repair with the guard off."""
    from neurodetox.patching import mint

    tok = make_tokenizer()
    plain_patch, plain = repair(
        make_model(), tok, [FIX_EDIT], MintSettings(guard=False), show_progress=False, reference_prompts=REFERENCE
    )
    assert plain.edits[0].status == "fixed"
    real = mint._Repairer._repair_failure
    calls = []

    def guarded_fails(self, edit, f, guard, relocate):
        calls.append(guard)
        if guard:  # the guarded plan gives up, leaving the model as it was
            return mint.FailureResult(
                step=f.step, position=f.position, target_id=f.target_id, argmax_id=f.argmax_id, status="skipped"
            )
        return real(self, edit, f, guard, relocate)

    monkeypatch.setattr(mint._Repairer, "_repair_failure", guarded_fails)
    patch, report = repair(
        make_model(), tok, [FIX_EDIT], MintSettings(guard=True), show_progress=False, reference_prompts=REFERENCE
    )
    assert report.edits[0].status == "fixed"
    assert calls[:2] == [True, False]
    assert all(not f.guarded for f in report.edits[0].failures)
    assert [(p.name, p.indices.tolist()) for p in patch.params] == [
        (p.name, p.indices.tolist()) for p in plain_patch.params
    ]
    assert all(torch.equal(a.new, b.new) for a, b in zip(patch.params, plain_patch.params))
    monkeypatch.setattr(mint._Repairer, "_repair_failure", guarded_fails)
    calls.clear()
    _, off = repair(
        make_model(),
        tok,
        [FIX_EDIT],
        MintSettings(guard=True, guard_fallback=False, relocate_fallback=False),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert off.edits[0].status == "skipped" and calls == [True]


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


@pytest.mark.parametrize("relocate", [True, False])
def test_relocate_off_plans_over_the_first_pool(monkeypatch, relocate):
    """``relocate=False`` locates once per failure and patches from that pool
    (never the same neuron twice); ``True`` locates before every patch."""
    from neurodetox.patching import mint

    calls = []
    real = mint.neuron_scores
    monkeypatch.setattr(mint, "neuron_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    pools = []
    real_top = mint.top_candidates
    monkeypatch.setattr(mint, "top_candidates", lambda *a, **k: pools.append(real_top(*a, **k)) or pools[-1])
    tok = make_tokenizer()
    s = MintSettings(
        alpha=0.02,
        alpha_steps=(1.0,),
        guard=False,
        relocate=relocate,  # small steps: several patches
        relocate_fallback=False,
    )
    patch, report = repair(make_model(), tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
    failures = report.edits[0].failures
    patches = sum(len(f.patches) for f in failures)
    assert patches > len(failures)  # some failure needed more than one patch
    if relocate:
        assert len(calls) >= patches
    else:
        assert len(calls) == len(failures) == len(pools)
        for f, pool in zip(failures, pools):
            keys = [(p["layer"], p["index"]) for p in f.patches]
            assert len(keys) == len(set(keys)) and set(keys) <= {(c.layer, c.index) for c in pool}


def test_relocate_fallback_repairs_what_the_pool_cannot(monkeypatch):
    """Without relocating, a failure that its candidate pool cannot fix (guard and
    gain-only attempts) is repaired again by gain alone, locating before every
    patch; the result equals a repair with ``relocate=True`` and no guard.
    ``relocate_fallback=False`` leaves it skipped."""
    from neurodetox.patching import mint

    tok = make_tokenizer()
    plain_patch, plain = repair(
        make_model(),
        tok,
        [FIX_EDIT],
        MintSettings(guard=False, relocate=True),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert plain.edits[0].status == "fixed"
    real = mint._Repairer._repair_failure
    calls = []

    def pool_fails(self, edit, f, guard, relocate):
        calls.append((guard, relocate))
        if not relocate:  # the first pool gives up, leaving the model as it was
            return mint.FailureResult(
                step=f.step, position=f.position, target_id=f.target_id, argmax_id=f.argmax_id, status="skipped"
            )
        return real(self, edit, f, guard, relocate)

    monkeypatch.setattr(mint._Repairer, "_repair_failure", pool_fails)
    patch, report = repair(
        make_model(), tok, [FIX_EDIT], MintSettings(), show_progress=False, reference_prompts=REFERENCE
    )
    assert report.edits[0].status == "fixed"
    assert calls[:3] == [(True, False), (False, False), (False, True)]
    assert [(p.name, p.indices.tolist()) for p in patch.params] == [
        (p.name, p.indices.tolist()) for p in plain_patch.params
    ]
    assert all(torch.equal(a.new, b.new) for a, b in zip(patch.params, plain_patch.params))
    calls.clear()
    _, off = repair(
        make_model(),
        tok,
        [FIX_EDIT],
        MintSettings(relocate_fallback=False),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert off.edits[0].status == "skipped" and calls == [(True, False), (False, False)]


def test_guard_flip_counts_are_reused_only_for_the_same_value_vector_change(monkeypatch):
    """Planning the same pool again reuses the flip counts of unchanged rows:
    the repair is bit-identical to one that counts every row afresh, with
    fewer rows counted."""
    from neurodetox.patching import mint
    from neurodetox.patching.locate import ReferenceStats

    real = ReferenceStats.predicted_flips
    counted = []
    monkeypatch.setattr(ReferenceStats, "predicted_flips", lambda self, *a: counted.append(len(a[2])) or real(self, *a))
    tok = make_tokenizer()
    s = MintSettings(alpha=0.02, alpha_steps=(1.0, 2.0), relocate_fallback=False)  # small steps: several patches
    patch, report = repair(make_model(), tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
    with_cache = sum(counted)

    def afresh(self, rows, guard):
        return self.ref.predicted_flips(self.head, self.gain, [r[0] for r in rows], [r[4] for r in rows])

    monkeypatch.setattr(mint._Repairer, "_flips", afresh)
    counted.clear()
    patch2, report2 = repair(make_model(), tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
    assert sum(len(f.patches) for f in report.edits[0].failures) > 1  # the pool was planned again
    assert [f.patches for f in report.edits[0].failures] == [f.patches for f in report2.edits[0].failures]
    assert [(p.name, p.indices.tolist()) for p in patch.params] == [(p.name, p.indices.tolist()) for p in patch2.params]
    assert all(torch.equal(a.new, b.new) for a, b in zip(patch.params, patch2.params))
    assert with_cache < sum(counted)


# ----------------------------------------------------------------------------- reference protection


def _last_layer_reference(dtype=torch.float32):
    """A tiny model with a non-trivial final-norm gain, and the reference statistics of its last block:
    ``(tok, model, site, stats, head, gain)``."""
    from neurodetox.core.sites import base_model
    from neurodetox.patching.direction import final_norm, final_norm_gain
    from neurodetox.patching.locate import reference_stats

    tok = make_tokenizer()
    model = make_model().to(dtype)
    with torch.no_grad():  # a non-trivial gain, so leaving it out would show
        final_norm(model).weight.copy_(torch.linspace(0.3, 2.0, final_norm(model).weight.numel()))
    site = resolve_sites(model, "mlp", "last")[0]
    stats = reference_stats(model, tok, [site], REFERENCE)
    head = base_model(model).get_output_embeddings().weight
    return tok, model, site, stats, head, final_norm_gain(model)


def _protection_setup(strength: float, competitors: int = 2):
    from neurodetox.patching.direction import semantic_space
    from neurodetox.patching.protect import ReferenceProtection

    tok, model, site, stats, head, gain = _last_layer_reference(torch.float64)
    space = semantic_space(model, fold_norm=True)
    prot = ReferenceProtection(stats, space, head, gain, strength, competitors)
    return model, site, stats, head, gain, space, prot


def test_protection_equals_the_dense_minimiser():
    """``project`` (Woodbury, active rows only) equals the closed-form minimiser
    ``(G + Cᵀ diag(λw) C)⁻¹ G Δ`` built densely from the LM head, row by row."""
    from neurodetox.patching.locate import Candidate

    model, site, stats, head, gain, space, prot = _protection_setup(50.0, competitors=2)
    j = int(stats.last_acts[:, 0].abs().mean(dim=0).argmax())
    cand = Candidate(layer=site.layer, index=j, score=0.0, activation=0.7)
    delta = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = head.detach().double() * gain.double()[None, :]
    G = W.T @ W
    rows, weights = [], []
    scale_p = float(stats.norm_scale.median())
    for r in range(stats.last_logits.shape[0]):
        order = stats.last_logits[r].double().argsort(descending=True)
        coef = float(stats.last_acts[r, 0, j]) * float(stats.norm_scale[r])
        for c in order[1:3].tolist():
            gap = max(float(stats.last_logits[r, order[0]] - stats.last_logits[r, c]), 1e-3)
            rows.append(W[order[0]] - W[c])
            weights.append(50.0 * (coef / (0.7 * scale_p * gap)) ** 2)
    C = torch.stack(rows)
    dense = torch.linalg.solve(G + C.T @ torch.diag(torch.tensor(weights, dtype=torch.float64)) @ C, G @ delta)
    got = prot.project(cand, delta)
    assert torch.allclose(got, dense, rtol=1e-6, atol=1e-9 * float(dense.abs().max()))
    assert not torch.allclose(got, delta)  # it did change something


def test_strong_protection_keeps_reference_gaps_and_a_silent_neuron_is_untouched():
    """With a very large ``λ`` the protected change no longer moves any protected
    gap of a prompt where the neuron fires; a neuron silent on every reference
    prompt keeps its change exactly."""
    from neurodetox.patching.locate import Candidate

    model, site, stats, head, gain, space, prot = _protection_setup(1e12, competitors=2)
    j = int(stats.last_acts[:, 0].abs().mean(dim=0).argmax())
    cand = Candidate(layer=site.layer, index=j, score=0.0, activation=1.0)
    delta = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = (prot.C @ delta).abs()
    after = (prot.C @ prot.project(cand, delta)).abs()
    assert float(before.max()) > 0.1
    assert float(after.max()) < 1e-5 * float(before.max())
    stats.last_acts[:, 0, j] = 0.0  # silent everywhere
    assert torch.equal(prot.project(cand, delta), delta)


def test_repair_with_protection_writes_the_protected_update(monkeypatch):
    """Every planned row of a protected repair is ``old + project(update_rule(old) − old)``,
    and the protected repair still fixes the edit."""
    from neurodetox.patching import mint
    from neurodetox.patching.protect import ReferenceProtection

    seen = []
    real = mint._Repairer._proposals

    def spy(self, cands, t, a, alphas):
        rows = real(self, cands, t, a, alphas)
        seen.append((self, rows, dict(self._taus)))
        return rows

    monkeypatch.setattr(mint._Repairer, "_proposals", spy)
    tok = make_tokenizer()
    model = make_model()
    patch, report = repair(
        model, tok, [FIX_EDIT], MintSettings(protect=0.01), show_progress=False, reference_prompts=REFERENCE
    )
    assert report.edits[0].status == "fixed"
    self_, rows, taus = seen[0]
    assert isinstance(self_.protection, ReferenceProtection)
    # recompute the first plan's rows on the original model
    patch.revert(model)
    for c, alpha, sign, new, _delta in rows:
        old = self_.tracker.column(c.layer, c.index).float()
        plain = mint.update_rule(old, taus[c.layer], alpha, sign) - old
        expect = old + self_.protection.project(c, plain)
        assert torch.allclose(new.float(), expect, atol=1e-6)
        assert not torch.allclose(new.float(), old + plain)
    with pytest.raises(ValueError, match="protect must be"):
        MintSettings(protect=-1.0).validate()
    with pytest.raises(ValueError, match="protect_competitors"):
        MintSettings(protect_competitors=0).validate()


def test_reference_prompts_cover_every_relation():
    """The built-in train split is sorted by relation; the reference prompts
    and texts are interleaved so each relation is represented."""
    import collections

    from neurodetox.cli.patch import _fact_pools, _reference_prompts
    from neurodetox.data import interleave_relations, load_facts

    rows = [{"relation": r, "i": i} for i, r in enumerate("aaaabbc")]
    assert [r["i"] for r in interleave_relations(rows)] == [0, 4, 6, 1, 5, 2, 3]
    assert interleave_relations([]) == []
    ds = load_facts("facts", seed=0)
    relation = {r["prompt"]: r["relation"] for r in ds["train"]}
    ref, unrelated, texts = _fact_pools("facts", 0, [], [], 50, 128, 12)
    counts = collections.Counter(relation[p] for p in ref)
    assert len(counts) == 3 and min(counts.values()) >= 42, counts
    assert not set(ref) & {u["prompt"] for u in unrelated}
    assert _reference_prompts("facts") == ref
    assert len({relation[p] for p in _reference_prompts("facts+default")[:96]}) == 3


def test_last_sixth_layer_spec():
    from neurodetox.core.sites import parse_layers

    assert parse_layers("last_sixth", 30) == [25, 26, 27, 28, 29]
    assert parse_layers("last_sixth", 4) == [3]
    assert parse_layers("second_half", 30) == list(range(15, 30))
    assert MintSettings().layers == "last_sixth"


@pytest.mark.parametrize("rule", ["additive", "interpolate"])
def test_guard_head_changes_scaled_within_a_round_equal_a_fresh_pass(monkeypatch, rule):
    """The guard's ``W_U (g ⊙ Δ)`` of a candidate at a smaller step, scaled from
    its largest step by linearity, equals a fresh pass over the LM head."""
    from neurodetox.patching.locate import ReferenceStats

    calls = []
    real = ReferenceStats.predicted_flips

    def spy(self, head, gain, cands, deltas, dlog=None):
        calls.append((self, head, gain, list(deltas), dlog))
        return real(self, head, gain, cands, deltas, dlog)

    from neurodetox.patching import mint

    scaled = []
    real_changes = mint._Repairer._head_changes

    def count(self, rows):
        scaled.append(sum((r[0].layer, r[0].index) in self._head_cache for r in rows))
        return real_changes(self, rows)

    monkeypatch.setattr(ReferenceStats, "predicted_flips", spy)
    monkeypatch.setattr(mint._Repairer, "_head_changes", count)
    tok = make_tokenizer()
    model = make_model()
    patch, report = repair(
        model,
        tok,
        [FIX_EDIT],
        MintSettings(layers="second_half", update=rule),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert len(calls) >= 2 and sum(scaled) > 0  # some rows were scaled, not recomputed
    for stats, head, gain, deltas, dlog in calls:
        fresh = stats.head_change(head, gain, deltas)
        assert dlog is not None
        assert torch.allclose(dlog, fresh, rtol=1e-4, atol=1e-6 * float(fresh.abs().max()))

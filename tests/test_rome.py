"""The rank-one subject-position editor (ROME, arXiv 2202.05262; MEMIT, arXiv 2210.07229).

The closed form is checked against brute-force least squares (a null-space parametrisation and a
stacked ``lstsq``), edits against independent teacher-forced forwards, revert bit-exactly in memory
and on a checkpoint folder (file hashes), and every bad input for a clear ``UserError`` naming the
edits file's line.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from patching_helpers import make_model, one_thread, save_checkpoint

from neurodetox.core.errors import UserError
from neurodetox.patching import coerce_edits, encode_edit, teacher_forced_argmax
from neurodetox.patching.pools import read_edits
from neurodetox.patching.rome import RomeSettings, edit_rank_one, rank_update, subject_last_index


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


# the subject ends each phrasing, so a value written at the subject's last token reaches the
# prediction through the blocks above (a tiny random model's attention cannot carry it far)
EDITS = [
    {
        "prompt": "the capital city of france",
        "target": "tokyo",
        "subject": "france",
        "paraphrases": ["capital of france"],
    },
    {
        "prompt": "the capital city of spain",
        "target": "berlin",
        "subject": "spain",
        "paraphrases": ["capital of spain"],
    },
]
FAST = dict(edit_layer=1, spread_layers=1, lam=0.0, covariance_samples=8, covariance_tokens=16)


def _null_space(k: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``[m, m - n]`` of ``{x : kᵀx = 0}`` for ``k`` ``[m, n]``."""
    u, _, _ = np.linalg.svd(k, full_matrices=True)
    return u[:, k.shape[1] :]


@pytest.mark.parametrize("n", [1, 3])
def test_exact_update_equals_brute_force_least_squares(n):
    rng = np.random.default_rng(n)
    d, m, N = 4, 6, 25
    W = rng.normal(size=(d, m))
    K0 = rng.normal(size=(m, N))  # keys that must keep their values
    K = rng.normal(size=(m, n))
    V = rng.normal(size=(d, n))
    R = V - W @ K
    C = K0 @ K0.T
    got = rank_update(torch.tensor(W), torch.tensor(K), torch.tensor(R), torch.tensor(C), 0.0).double().numpy()
    # brute force, row by row: δ = δ0 + N z over the constraint set, z by ordinary least squares on ‖δᵀK0‖
    Ns = _null_space(K)
    want = np.zeros((d, m))
    for i in range(d):
        d0 = np.linalg.lstsq(K.T, R[i], rcond=None)[0]  # any particular solution
        z = np.linalg.lstsq(K0.T @ Ns, -(K0.T @ d0), rcond=None)[0]
        want[i] = d0 + Ns @ z
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((W + got) @ K, V, rtol=1e-4, atol=1e-5)  # constraints met
    if n == 1:  # ROME's printed formula
        k = K[:, 0]
        ck = np.linalg.solve(C, k)
        np.testing.assert_allclose(got, np.outer(R[:, 0], ck) / (ck @ k), rtol=1e-4, atol=1e-5)


def test_least_squares_update_equals_memit_objective():
    rng = np.random.default_rng(7)
    d, m, N, n, lam = 3, 5, 12, 4, 2.5
    W, K0, K, V = (rng.normal(size=s) for s in [(d, m), (m, N), (m, n), (d, n)])
    R = V - W @ K
    got = rank_update(torch.tensor(W), torch.tensor(K), torch.tensor(R), torch.tensor(K0 @ K0.T), lam).double().numpy()
    # min λ‖Δ K0‖² + ‖Δ K − R‖² as one stacked least-squares problem
    A = np.concatenate([np.sqrt(lam) * K0, K], axis=1)
    B = np.concatenate([np.zeros((d, N)), R], axis=1)
    want = np.linalg.lstsq(A.T, B.T, rcond=None)[0].T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_subject_last_index_from_offsets():
    tok = make_tokenizer()
    ids = tok("the capital of france is")["input_ids"]
    i = subject_last_index(tok, "the capital of france is", "france")
    assert tok.convert_ids_to_tokens([ids[i]]) == ["france"]
    assert subject_last_index(tok, "the capital of France is".lower(), "France") == i  # case-insensitive fallback
    with pytest.raises(UserError, match="edits.jsonl:4: subject 'germany' is not in"):
        subject_last_index(tok, "the capital of france is", "germany", "edits.jsonl:4")


def _fixed_everywhere(model, tok, rows) -> list[list[bool]]:
    out = []
    for e in coerce_edits(rows):
        e = encode_edit(tok, e)
        out.append(
            [
                bool(torch.equal(teacher_forced_argmax(model, v.prompt_ids, v.target_ids), torch.tensor(v.target_ids)))
                for v in e.variants
            ]
        )
    return out


@pytest.mark.parametrize("mode", ["batch", "sequential"])
@pytest.mark.parametrize("covariance", ["model_text", "identity"])
def test_edit_makes_target_the_argmax_and_reverts_bit_exactly(mode, covariance):
    tok = make_tokenizer()
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(all(f) for f in _fixed_everywhere(model, tok, EDITS))
    patch, report = edit_rank_one(
        model, tok, EDITS, RomeSettings(edit_mode=mode, covariance=covariance, **FAST), show_progress=False
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the call restores the model
    assert [e.status for e in report.edits] == ["fixed", "fixed"], report.to_json()
    assert len(patch.params) == 1 and patch.params[0].name == "model.layers.1.mlp.down_proj.weight"
    patch.apply(model)
    assert all(all(f) for f in _fixed_everywhere(model, tok, EDITS))  # prompt and paraphrase, independently
    delta = model.get_parameter(patch.params[0].name) - before[patch.params[0].name]
    # one rank-one (rank-n) update per round: the change is low-rank
    assert int(torch.linalg.matrix_rank(delta.double(), atol=1e-5)) <= len(EDITS) * RomeSettings().rounds
    patch.revert(model)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_bf16_storage_and_checkpoint_round_trip_is_bit_exact(tmp_path):
    from neurodetox.core.models import load_model
    from neurodetox.patching import apply_to_checkpoint, bind_to_checkpoint, folder_sha256, revert_checkpoint

    tok = make_tokenizer()
    folder = save_checkpoint(make_model(dtype=torch.bfloat16), tok, tmp_path / "base")
    hashes = folder_sha256(folder)
    model, tok = load_model(str(folder))
    patch, report = edit_rank_one(
        model, tok, EDITS, RomeSettings(**FAST), show_progress=False, storage_dtype="bfloat16"
    )
    assert any(e.status == "fixed" for e in report.edits), report.to_json()
    bind_to_checkpoint(patch, folder)
    patch.save(tmp_path / "patch")
    apply_to_checkpoint(folder, patch, out=None)
    assert folder_sha256(folder) != hashes
    revert_checkpoint(folder, patch, out=None)
    assert folder_sha256(folder) == hashes


def _file(tmp_path, rows):
    p = tmp_path / "edits.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(p)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {**EDITS[1], "subject": "germany"},
            r"edits\.jsonl:2: subject 'germany' is not in 'the capital city of spain'",
        ),
        ({k: v for k, v in EDITS[1].items() if k != "subject"}, r"edits\.jsonl:2: the rome method needs a 'subject'"),
        (
            {**EDITS[1], "paraphrases": ["spain capital :", "capital city"]},
            r"edits\.jsonl:2 \(paraphrase 2\): subject 'spain' is not in 'capital city'",
        ),
        ({**EDITS[1], "paraphrases": ["The capital  city of spain"]}, r"edits\.jsonl:2: paraphrase 1 .* prompt itself"),
        ({**EDITS[1], "paraphrases": ["capital of spain is berlin"]}, r"edits\.jsonl:2: paraphrase 1 .* already ends"),
        ({**EDITS[0], "target": "rome"}, r"edits\.jsonl:2: prompt .* also the prompt of .*edits\.jsonl:1"),
    ],
)
def test_bad_input_names_the_line(tmp_path, bad, message):
    tok = make_tokenizer()
    rows = read_edits(_file(tmp_path, [EDITS[0], bad]))
    with pytest.raises(UserError, match=message):
        edit_rank_one(make_model(), tok, rows, RomeSettings(**FAST), show_progress=False)


def test_settings_are_checked():
    with pytest.raises(UserError, match="unknown edit_mode 'all'"):
        RomeSettings(edit_mode="all")
    with pytest.raises(UserError, match="v_steps"):
        RomeSettings(v_steps=0)
    with pytest.raises(UserError, match="covariance"):
        RomeSettings(covariance="wikipedia")


def test_cli_find_method_rome_apply_revert(tmp_path):
    from neurodetox.cli.patch import cmd_patch
    from neurodetox.patching import folder_sha256

    tok = make_tokenizer()
    folder = save_checkpoint(make_model(), tok, tmp_path / "base")
    before = folder_sha256(folder)
    edits = _file(tmp_path, EDITS[1:])
    common = ["--threads", "1", "--quiet", "find", "--model", str(folder), "--method", "rome", "--edit_layer", "1"]
    common += ["--spread_layers", "1", "--lam", "0", "--covariance_samples", "8", "--covariance_tokens", "16"]
    rc = cmd_patch(
        common
        + ["--prompt", EDITS[0]["prompt"], "--target", EDITS[0]["target"], "--subject", "france"]
        + ["--edits", edits, "--out", str(tmp_path / "patch")]
    )
    assert rc == 0
    assert cmd_patch(["apply", str(folder), str(tmp_path / "patch"), "--in_place"]) == 0
    assert folder_sha256(folder) != before
    assert cmd_patch(["revert", str(folder), str(tmp_path / "patch"), "--in_place"]) == 0
    assert folder_sha256(folder) == before
    # a subject that is not in the prompt: one error line, exit 2
    bad = _file(tmp_path, [{**EDITS[1], "subject": "germany"}])
    assert cmd_patch(common + ["--edits", bad, "--out", str(tmp_path / "p2")]) == 2


def test_batched_value_optimisation_equals_one_edit_at_a_time():
    """Each edit has its own δ and loss (Adam is element-wise), and frozen edits leave the batch: optimising
    two edits together gives each one's key and value shift as optimising it alone."""
    from neurodetox.patching.rome import edit_site, optimise_values

    tok = make_tokenizer()
    model = make_model()
    edits = [encode_edit(tok, e) for e in coerce_edits(EDITS)]
    s = RomeSettings(**FAST)
    site = edit_site(model, 1)
    K, D, L = optimise_values(model, tok, edits, site, s, [""], True)
    for j, e in enumerate(edits):
        k1, d1, l1 = optimise_values(model, tok, [e], site, s, [""], True)
        torch.testing.assert_close(K[:, j], k1[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(D[:, j], d1[:, 0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(L[j], l1[0], rtol=1e-3, atol=1e-5)


def test_memit_spread_moves_the_hidden_state_by_the_optimised_value_and_reverts():
    """MEMIT's spreading (arXiv 2210.07229): with exact constraints the last of the blocks closes the gap, so
    after the update the hidden state edit_layer outputs at the subject's last token is its original value
    plus the optimised shift δ, read independently with ``output_hidden_states``; each block's change is
    rank one, the blocks share the residual, and revert is bit-exact."""
    from neurodetox.patching.rome import edit_site, optimise_values, subject_last_index

    tok = make_tokenizer()
    model = make_model(layers=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = RomeSettings(edit_layer=3, spread_layers=3, rounds=1, covariance="identity", lam=0.0)
    e = encode_edit(tok, coerce_edits(EDITS[:1])[0])
    _, D, _ = optimise_values(model, tok, [e], edit_site(model, 3), s, [""], False)
    ids = torch.tensor([tok(e.prompt)["input_ids"]])
    look = subject_last_index(tok, e.prompt, e.subject)
    z0 = model(input_ids=ids, output_hidden_states=True).hidden_states[4][0, look]
    patch, report = edit_rank_one(model, tok, EDITS[:1], s, show_progress=False, use_paraphrases=False)
    assert [p.name for p in patch.params] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)]
    assert patch.manifest["method"]["name"] == "MEMIT, 3 blocks"
    patch.apply(model)
    z1 = model(input_ids=ids, output_hidden_states=True).hidden_states[4][0, look]
    torch.testing.assert_close(z1 - z0, D[:, 0], rtol=1e-3, atol=1e-4)
    norms = []
    for p in patch.params:
        delta = (model.get_parameter(p.name).detach() - before[p.name]).double()
        assert int(torch.linalg.matrix_rank(delta, atol=1e-6)) == 1, p.name
        norms.append(float(delta.norm()))
    assert min(norms) > 0.1 * max(norms), norms  # spread, not all in one block
    assert report.edits[0].status in ("fixed", "skipped")
    patch.revert(model)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_spread_below_block_zero_is_refused():
    with pytest.raises(UserError, match="spread_layers 3 reaches below block 0 from edit_layer 1; valid: 1 to 2"):
        edit_rank_one(
            make_model(), make_tokenizer(), EDITS, RomeSettings(edit_layer=1, spread_layers=3), show_progress=False
        )
    with pytest.raises(UserError, match="spread_layers"):
        RomeSettings(spread_layers=0)
    with pytest.raises(UserError, match=r"edit_layer 8 is out of range: the model has 4 blocks \(valid -4..3\)"):
        edit_rank_one(make_model(), make_tokenizer(), EDITS, RomeSettings(), show_progress=False)


def test_key_covariances_match_outer_products_and_are_kept_on_disk(tmp_path, monkeypatch):
    """``C`` of each block is the mean outer product of its FFN keys over the sampled text (checked against
    keys read with the project-independent ``output_hidden_states`` route: the block's MLP recomputed by hand
    from its input), all blocks from one sampling; a second process (empty memory cache) reads the files
    instead of sampling, and different weights get a new file."""
    from neurodetox.patching import covariance as rome

    tok = make_tokenizer()
    model = make_model(layers=3)
    s = RomeSettings(covariance="model_text", covariance_samples=4, covariance_tokens=8, covariance_ridge=1e-3)
    calls = []
    real = rome._sampled_texts
    monkeypatch.setattr(rome, "_sampled_texts", lambda *a: calls.append(1) or real(*a))
    rome._COV_CACHE.clear()
    got = rome.key_covariances(model, tok, [0, 2], s, cache_dir=tmp_path / "cov")
    assert len(calls) == 1 and len(list((tmp_path / "cov").glob("rome-covariance-*.safetensors"))) == 2
    # brute force: the keys act(gate(x)) * up(x) from each block's post-attention norm output
    texts = real(model, tok, s)
    for layer in (0, 2):
        block = model.model.layers[layer]
        keys = []
        with torch.no_grad():
            for t in texts:
                hs = model(input_ids=t[None], output_hidden_states=True).hidden_states[layer][0]
                pos = torch.arange(hs.shape[0])[None]
                cos_sin = model.model.rotary_emb(hs[None], pos)
                attn = block.self_attn(
                    block.input_layernorm(hs[None]), position_embeddings=cos_sin, attention_mask=None
                )[0]
                x = block.post_attention_layernorm(hs[None] + attn)[0]
                keys.append(block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x))
        k = torch.cat(keys).double()
        want = k.T @ k / len(k)
        want += 1e-3 * float(want.diagonal().mean()) * torch.eye(want.shape[0], dtype=torch.float64)
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-7)
    rome._COV_CACHE.clear()
    monkeypatch.setattr(rome, "_sampled_texts", lambda *a: pytest.fail("sampled again despite the cache"))
    again = rome.key_covariances(model, tok, [2, 0], s, cache_dir=tmp_path / "cov")
    assert all(torch.equal(again[i], got[i]) for i in (0, 2))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    rome._COV_CACHE.clear()
    monkeypatch.setattr(rome, "_sampled_texts", lambda *a: calls.append(1) or real(*a))
    rome.key_covariances(model, tok, [2], s, cache_dir=tmp_path / "cov")
    assert len(calls) == 2 and len(list((tmp_path / "cov").glob("rome-covariance-*.safetensors"))) == 3


def test_cli_covariance_cache_is_written_in_the_named_folder_and_refused_where_unused(tmp_path, capsys):
    from neurodetox.cli.patch import cmd_patch

    tok = make_tokenizer()
    folder = save_checkpoint(make_model(), tok, tmp_path / "base")
    edits = _file(tmp_path, EDITS[1:])
    common = ["--threads", "1", "--quiet", "find", "--model", str(folder), "--edits", edits]
    rome = ["--method", "rome", "--edit_layer", "1", "--covariance_samples", "8", "--covariance_tokens", "16"]
    rome += ["--spread_layers", "2", "--lam", "0"]
    rc = cmd_patch(
        common
        + rome
        + ["--covariance", "model_text", "--covariance_cache", str(tmp_path / "cov"), "--out", str(tmp_path / "p0")]
    )
    assert rc == 0 and cmd_patch(common + rome + ["--covariance", "model_text"]) == 2  # no --out
    assert "patch find needs --output_dir DIR" in capsys.readouterr().err
    assert sorted(p.name.split("-")[3] for p in (tmp_path / "cov").iterdir()) == ["layer0", "layer1"]
    capsys.readouterr()
    ident = ["--covariance", "identity", "--covariance_cache", str(tmp_path / "c2"), "--out", str(tmp_path / "p")]
    assert cmd_patch(common + rome + ident) == 2
    err = capsys.readouterr().err
    assert "--covariance_cache" in err and "only with --method rome --covariance model_text" in err, err
    assert cmd_patch(common + ["--covariance_cache", str(tmp_path / "c2"), "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "c2").exists() and not (tmp_path / "p").exists()

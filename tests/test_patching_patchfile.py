"""Tests for ``neurodetox.patching.patchfile``: in-memory apply/revert bit-exact, save/load, tamper checks."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from patching_helpers import fixed_patch, make_model, one_thread

from neurodetox.patching import PatchMismatchError, PatchSet


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A checkpoint, a model loaded from it and a bound patch that fixes FIX_EDIT (see ``fixed_patch``)."""
    return fixed_patch(tmp_path_factory)


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

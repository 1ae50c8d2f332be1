"""Shared pieces of the patching tests (``tests/test_patching_*.py``, ``tests/test_mint_*.py``).

Tiny offline Llama models with peaky logits (so that a patch can flip an
argmax), the edit most tests repair, reference prompts over every relation of
the tiny vocabulary, and the checkpoint + bound patch that the patch-file and
checkpoint tests share.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from conftest import make_tokenizer

from neurodetox.core.sites import resolve_sites

FIX_EDIT = {"prompt": "the capital of france is", "target": "paris"}

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


def one_thread():
    """Generator body of the tests' autouse fixture: tiny models on one torch thread
    (threads only add contention on a shared 2-core machine)."""
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


def fixed_patch(tmp_path_factory):
    """``(folder, model, tok, patch, report)``: a checkpoint, a model loaded from it and a
    patch bound to it that fixes :data:`FIX_EDIT` (asserted)."""
    from neurodetox.core.models import load_model
    from neurodetox.patching import bind_to_checkpoint, repair

    torch.set_num_threads(1)
    tok = make_tokenizer()
    folder = save_checkpoint(make_model(), tok, tmp_path_factory.mktemp("ckpt") / "base")
    model, tok = load_model(str(folder))
    model.eval()
    patch, report = repair(model, tok, [FIX_EDIT], show_progress=False)
    assert report.edits[0].status == "fixed", report.to_json()
    bind_to_checkpoint(patch, folder)
    return folder, model, tok, patch, report


def next_tokens_one_by_one(model, tok, prompts):
    """Next-token argmax of each prompt, one unbatched forward each (the reference for batched code)."""
    with torch.no_grad():
        return [int(model(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1].argmax()) for p in prompts]


def last_layer_reference(dtype=torch.float32):
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


def tiny_facts(tmp_path):
    """A 10-row facts JSONL file in the tiny vocabulary; returns its path."""
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

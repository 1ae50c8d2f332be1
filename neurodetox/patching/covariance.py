"""The key second moment ``C = E[k kᵀ]`` of FFN output projections, for the rank-one editor.

ROME (Meng et al., arXiv 2202.05262) and MEMIT (arXiv 2210.07229) weigh their
update by the uncentred second moment of the edited projection's input (the
FFN keys) over Wikipedia text; neurodetox samples the model's own text instead
(no corpus download; ``docs/methods.md`` §8). The sampling is the cost, so the
moments are kept in memory per model weights and, with ``cache_dir``, on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import nn

from neurodetox.core.checks import model_device
from neurodetox.core.errors import UserError
from neurodetox.core.io import atomic_save_safetensors
from neurodetox.core.sites import resolve_sites
from neurodetox.patching.mint.reference import fingerprint

if TYPE_CHECKING:
    from neurodetox.patching.rome import RomeSettings

__all__ = ["TEXT_STARTS", "edit_site", "key_covariance", "key_covariances", "weights_sha256"]

logger = logging.getLogger(__name__)

#: Starts of the model's own text for the key covariance (ROME samples Wikipedia; we sample the model).
TEXT_STARTS: tuple[str, ...] = (
    "The",
    "In",
    "Therefore",
    "Because",
    "I",
    "You",
    "It",
    "Many",
    "When",
    "After",
    "Scientists",
    "Today",
    "A",
    "This",
    "One",
    "We",
)


_COV_CACHE: dict[tuple, torch.Tensor] = {}


def edit_site(model: nn.Module, layer: int):
    """The FFN output-projection site of block ``layer``.

    Raises:
        UserError: the block has none.
    """
    sites = resolve_sites(model, "mlp", [layer])
    if not sites:
        raise UserError(f"layer {layer} has no FFN output projection in this model")
    return sites[0]


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 (hex) of every parameter's name, dtype, shape and bytes: the identity a covariance file is kept under."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sampled_texts(
    model: nn.Module, tokenizer, settings: RomeSettings, show_progress: bool = False
) -> list[torch.Tensor]:
    """``covariance_samples`` token sequences of ``covariance_tokens`` tokens sampled (temperature 1, seeded)
    from the model after each of :data:`TEXT_STARTS` in turn; padding removed."""
    device = model_device(model)
    side = getattr(tokenizer, "padding_side", "right")
    starts = [TEXT_STARTS[i % len(TEXT_STARTS)] for i in range(settings.covariance_samples)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[torch.Tensor] = []
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(settings.covariance_seed)
            from tqdm.auto import tqdm

            batches = range(0, len(starts), 16)
            for b in tqdm(batches, desc="key covariance: sampling text", unit="batch", disable=not show_progress):
                enc = tokenizer(starts[b : b + 16], return_tensors="pt", padding=True).to(device)
                out = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=settings.covariance_tokens,
                    pad_token_id=pad,
                )
                texts += [row[row != pad] if pad is not None else row for row in out[:, enc["input_ids"].shape[1] :]]
    finally:
        tokenizer.padding_side = side
    return texts


def _covariance_file(folder: Path, digest: str, layer: int, settings: RomeSettings) -> Path:
    return folder / (
        f"rome-covariance-{digest[:20]}-layer{layer}-{settings.covariance_samples}x{settings.covariance_tokens}"
        f"-seed{settings.covariance_seed}.safetensors"
    )


@torch.no_grad()
def key_covariances(
    model: nn.Module,
    tokenizer,
    layers: Sequence[int],
    settings: RomeSettings,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``{layer: C}``: ``C = E[k kᵀ] + ridge`` (``[d_ff, d_ff]`` float64) of the FFN keys of each block over the
    model's own sampled text.

    ``covariance_samples`` texts of ``covariance_tokens`` tokens are sampled once (temperature 1,
    seeded) from :data:`TEXT_STARTS`, and every real token's key of every block in ``layers`` is read
    in the same forwards. The second moment (before the ridge) is kept in memory per model weights,
    block and settings, and, when ``cache_dir`` is given, in ``cache_dir`` as one safetensors file per
    block named by the SHA-256 of the weights (:func:`weights_sha256`), the block and the sampling
    settings, written atomically; a later run on the same weights reads it instead of sampling.
    ``show_progress`` shows a progress bar while sampling.

    Raises:
        UserError: ``cache_dir`` cannot be written, or a block has no FFN output projection.
    """
    sites = {layer: edit_site(model, layer) for layer in layers}
    common = (settings.covariance_samples, settings.covariance_tokens, settings.covariance_seed)
    fp = fingerprint(model)
    moments: dict[int, torch.Tensor] = {}
    digest = None
    folder = Path(cache_dir) if cache_dir is not None else None
    for layer, site in sites.items():
        key = (id(model), fp, site.layer, *common)
        if key in _COV_CACHE:
            moments[layer] = _COV_CACHE[key]
        elif folder is not None:
            digest = digest or weights_sha256(model)
            path = _covariance_file(folder, digest, site.layer, settings)
            if path.is_file():
                from safetensors.torch import load_file

                moments[layer] = _COV_CACHE[key] = load_file(str(path))["second_moment"]
                logger.info("key covariance of block %d read from %s", site.layer, path)
    missing = [layer for layer in sites if layer not in moments]
    if missing:
        device = model_device(model)
        texts = _sampled_texts(model, tokenizer, settings, show_progress)
        sums = {layer: None for layer in missing}
        count = 0

        def adder(layer):
            def hook(module, args):
                k = args[0].reshape(-1, args[0].shape[-1]).double().cpu()
                sums[layer] = k.T @ k if sums[layer] is None else sums[layer] + k.T @ k

            return hook

        handles = [sites[layer].module.register_forward_pre_hook(adder(layer)) for layer in missing]
        try:
            for t in texts:
                if t.numel():
                    model(input_ids=t[None].to(device), use_cache=False)
                    count += int(t.numel())
        finally:
            for h in handles:
                h.remove()
        if len(_COV_CACHE) > 16:
            _COV_CACHE.clear()
        for layer in missing:
            moments[layer] = _COV_CACHE[(id(model), fp, sites[layer].layer, *common)] = sums[layer] / max(count, 1)
            if folder is not None:
                digest = digest or weights_sha256(model)
                path = _covariance_file(folder, digest, sites[layer].layer, settings)
                atomic_save_safetensors(
                    path,
                    {"second_moment": moments[layer]},
                    {"layer": str(sites[layer].layer), "tokens": str(count), "weights_sha256": digest},
                )
    out = {}
    for layer in layers:
        C = moments[layer].clone()
        C += settings.covariance_ridge * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=torch.float64)
        out[layer] = C
    return out


def key_covariance(model: nn.Module, tokenizer, layer: int, settings: RomeSettings) -> torch.Tensor:
    """``C`` of one block: :func:`key_covariances` for ``[layer]``."""
    return key_covariances(model, tokenizer, [layer], settings)[layer]

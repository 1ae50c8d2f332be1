"""Neuron sites: where neurons live in a decoder-only transformer.

Two kinds of site are supported (see ``docs/methods.md`` §0):

* ``mlp`` — FFN neuron ``j`` of block ``l`` is the ``j``-th *input* feature of
  the FFN output projection (``act(gate(x)) * up(x)`` for gated FFNs,
  ``act(fc_in(x))`` otherwise). It is observed and masked with a
  ``forward_pre_hook`` on that projection. Its **value vector** is column ``j``
  of the projection weight (``nn.Linear`` stores ``[d, d_ff]``) or row ``j`` for
  GPT-2's ``Conv1D`` (``[d_ff, d]``).
* ``residual`` — index ``i`` of the hidden state that block ``l`` outputs
  (``hidden_states[l + 1]`` in Hugging Face numbering). This is what the SeND
  paper (Mohammadzadeh et al., arXiv 2410.15460) calls a *sensitive neuron*.

Every consumer (activation statistics, tracking embeddings, dropout masks,
EigenScore embeddings, MINT patching) goes through :func:`register_site_hook`,
so the pre-hook / forward-hook and tuple-output details live here only.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

SITE_KINDS = ("mlp", "residual")

# model_type -> (path of the decoder block list, path of the FFN output
# projection inside one block). Paths are relative to the *base* transformers
# model (PEFT wrappers are unwrapped first).
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp.down_proj"),
    "mixtral": ("model.layers", "mlp.down_proj"),
    "qwen2": ("model.layers", "mlp.down_proj"),
    "qwen3": ("model.layers", "mlp.down_proj"),
    "gemma": ("model.layers", "mlp.down_proj"),
    "gemma2": ("model.layers", "mlp.down_proj"),
    "gemma3_text": ("model.layers", "mlp.down_proj"),
    "phi3": ("model.layers", "mlp.down_proj"),
    "olmo": ("model.layers", "mlp.down_proj"),
    "olmo2": ("model.layers", "mlp.down_proj"),
    "smollm3": ("model.layers", "mlp.down_proj"),
    "granite": ("model.layers", "mlp.down_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "gptj": ("transformer.h", "mlp.fc_out"),
    "opt": ("model.decoder.layers", "fc2"),
    "phi": ("model.layers", "mlp.fc2"),
    "falcon": ("transformer.h", "mlp.dense_4h_to_h"),
}

LayerSpec = Union[int, str, Sequence[int], None]


class UnsupportedArchitectureError(ValueError):
    """Raised when a model's family has no known neuron-site layout."""


@dataclass(frozen=True)
class NeuronSite:
    """One hookable group of neurons.

    Attributes:
        kind: ``"mlp"`` or ``"residual"``.
        layer: 0-based decoder block index.
        module_name: dotted name of the hooked module in ``model.named_modules()``.
        module: the hooked module (FFN output projection for ``mlp``, the
            decoder block for ``residual``).
        width: number of neurons: ``d_ff`` for ``mlp``, ``d`` (hidden size)
            for ``residual``.
        block: the decoder block that contains ``module`` (``None`` if
            unknown). :func:`register_site_hook` reads the ``[batch, seq]``
            shape from it for families whose FFN works on flattened tokens
            (OPT feeds ``fc2`` a ``[batch * seq, d_ff]`` tensor).
    """

    kind: str
    layer: int
    module_name: str
    module: nn.Module
    width: int
    block: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        """Stable name used in saved state, e.g. ``"mlp.12"``."""
        return f"{self.kind}.{self.layer}"


def base_model(model: nn.Module) -> nn.Module:
    """Strip PEFT and DeepSpeed wrappers, returning the transformers model."""
    m = model
    for _ in range(4):
        if hasattr(m, "get_base_model") and callable(m.get_base_model):  # peft.PeftModel
            m = m.get_base_model()
        elif type(m).__name__ == "DeepSpeedEngine" and hasattr(m, "module"):
            m = m.module
        else:
            break
    return m


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _family(model: nn.Module) -> tuple[str, tuple[str, str]]:
    base = base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return model_type, FAMILIES[model_type]
    # A family not in the table but laid out like Llama still works.
    # dict.fromkeys keeps table order (a set's order changes with PYTHONHASHSEED).
    for layers_path, proj in dict.fromkeys(FAMILIES.values()):
        try:
            layers = _get(base, layers_path)
            _get(layers[0], proj)
            return str(model_type), (layers_path, proj)
        except (AttributeError, IndexError, TypeError):
            continue
    raise UnsupportedArchitectureError(
        f"neurodetox does not know where the neurons of model_type={model_type!r} "
        f"({type(base).__name__}) live. Supported families: {', '.join(sorted(FAMILIES))}. "
        "Name the module explicitly with module_path, e.g. "
        "module_path='model.layers.{layer}.mlp.down_proj' (site 'mlp') or "
        "'model.layers.{layer}' (site 'residual')."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model`` (PEFT/DeepSpeed wrappers allowed).

    Raises:
        UnsupportedArchitectureError: the family is unknown.
    """
    _, (layers_path, _) = _family(model)
    return _get(base_model(model), layers_path)


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks ``L``."""
    return len(decoder_layers(model))


def parse_layers(spec: LayerSpec, n_layers: int, kind: str = "mlp") -> list[int]:
    """Turn a layer spec into sorted 0-based block indices.

    Accepted specs: ``None`` or ``"all"``; ``"penultimate"`` (block ``L-2``,
    the SeND default), ``"last"``, ``"middle"`` (block ``(L+1)//2 - 1``,
    whose output is ``hidden_states[(L+1)//2]``, INSIDE's middle layer);
    ``"second_half"`` (the last ``L//2`` blocks, the search space of the authors'
    MINT code, docs/methods.md §4); ``"last_sixth"`` (the last ``max(L//6, 1)`` blocks, the
    patching default); an int
    (negative counts from the end); a comma list ``"3,5,-1"``; a range
    ``"10-20"`` (inclusive); or a sequence of ints.

    Raises:
        ValueError: a malformed spec or an index outside ``[-L, L)``, naming
            the bad value and the valid range.
    """
    valid = f"valid indices are {-n_layers}..{n_layers - 1}" if n_layers else "the model has no blocks"
    hint = (
        "expected 'all', 'penultimate', 'last', 'middle', 'second_half', 'last_sixth', an index in "
        f"[-{n_layers}, {n_layers - 1}], a comma list '3,5' or a range '10-20'"
    )

    def check(i: int) -> int:
        if not -n_layers <= i < n_layers:
            raise ValueError(
                f"layer {i} is out of range for site {kind!r}: the model has {n_layers} decoder blocks, {valid}"
            )
        return i % n_layers

    if spec is None:
        spec = "all"
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "penultimate" and n_layers < 2:
            raise ValueError(
                f"layer spec 'penultimate' needs at least 2 decoder blocks for site {kind!r}; "
                f"the model has {n_layers} ({valid})"
            )
        named = {
            "all": list(range(n_layers)),
            "penultimate": [n_layers - 2],
            "last": [n_layers - 1],
            "middle": [max((n_layers + 1) // 2 - 1, 0)],
            "second_half": list(range(n_layers - n_layers // 2, n_layers)),
            "last_sixth": list(range(n_layers - max(n_layers // 6, 1), n_layers)) if n_layers else [],
        }
        if s in named:
            out = named[s]
        else:
            out = []
            for part in (p.strip() for p in s.split(",") if p.strip()):
                m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
                if m:
                    lo, hi = (check(int(g)) for g in m.groups())
                    if lo > hi:
                        raise ValueError(
                            f"bad layer range {part!r} in {spec!r} for site {kind!r}: the start comes "
                            f"after the end; {valid}"
                        )
                    out.extend(range(lo, hi + 1))
                else:
                    try:
                        out.append(int(part))
                    except ValueError:
                        raise ValueError(f"bad layer spec {spec!r} for site {kind!r}: {hint}") from None
            if not out:
                raise ValueError(f"empty layer spec {spec!r} for site {kind!r}: {hint}")
    elif isinstance(spec, bool):
        raise ValueError(f"bad layer spec {spec!r} for site {kind!r}: {hint}")
    else:
        try:
            out = [operator.index(spec)]  # int, numpy integer, 0-d integer tensor
        except TypeError:
            try:
                out = [int(x) if isinstance(x, str) else operator.index(x) for x in spec]
            except (TypeError, ValueError):
                raise ValueError(f"bad layer spec {spec!r} for site {kind!r}: {hint}, or a sequence of ints") from None
    return sorted({check(i) for i in out})


def _width(kind: str, module: nn.Module, model: nn.Module) -> int:
    if kind == "residual":
        config = getattr(base_model(model), "config", None)
        for attr in ("hidden_size", "n_embd", "d_model"):
            if getattr(config, attr, None) is not None:
                return int(getattr(config, attr))
        raise UnsupportedArchitectureError(
            f"cannot tell the hidden size of {type(base_model(model)).__name__}: its config has no "
            "hidden_size (nor n_embd, d_model)"
        )
    w = getattr(module, "base_layer", module)  # peft LoRA wrapper
    if isinstance(w, nn.Linear):
        return w.in_features
    if hasattr(w, "nx"):  # transformers Conv1D: weight [d_ff, d]
        return int(w.weight.shape[0]) if w.weight.numel() else int(w.nx)
    if hasattr(w, "in_features"):
        return int(w.in_features)
    raise UnsupportedArchitectureError(f"cannot tell the width of {type(w).__name__}")


def resolve_sites(
    model: nn.Module,
    kind: str,
    layers: LayerSpec = "all",
    module_path: Optional[str] = None,
) -> list[NeuronSite]:
    """Resolve the neuron sites of ``model`` for ``kind`` at ``layers``.

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT or DeepSpeed.
        kind: ``"mlp"`` or ``"residual"``.
        layers: see :func:`parse_layers`. Default ``"all"``.
        module_path: explicit dotted path with a ``{layer}`` placeholder, for
            architectures not in :data:`FAMILIES`, e.g.
            ``"model.layers.{layer}.mlp.down_proj"``.

    Returns:
        One :class:`NeuronSite` per layer, in layer order.

    Raises:
        ValueError: unknown ``kind`` or bad ``layers``.
        UnsupportedArchitectureError: unknown family and no ``module_path``.
    """
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site {kind!r}; valid sites are {', '.join(SITE_KINDS)}")
    base = base_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    if module_path is not None:
        if "{layer}" not in module_path:
            raise ValueError(f"module_path {module_path!r} must contain the placeholder '{{layer}}'")
        n = 0
        while True:
            try:
                _get(base, module_path.format(layer=n))
            except (AttributeError, IndexError, TypeError):
                break
            n += 1
        if n == 0:
            raise ValueError(f"module_path {module_path!r} matches no module (tried layer 0)")
        idx = parse_layers(layers, n, kind)
        modules = [_get(base, module_path.format(layer=i)) for i in idx]
        # The block is the path up to the layer index, e.g. "blocks.{layer}.ff" -> "blocks.3".
        prefix = module_path.split("{layer}")[0]
        owners = []
        for i in idx:
            try:
                owners.append(_get(base, f"{prefix}{i}"))
            except (AttributeError, IndexError, TypeError):
                owners.append(None)
    else:
        _, (layers_path, proj) = _family(model)
        blocks = _get(base, layers_path)
        idx = parse_layers(layers, len(blocks), kind)
        modules = [blocks[i] if kind == "residual" else _get(blocks[i], proj) for i in idx]
        owners = [blocks[i] for i in idx]
    return [
        NeuronSite(
            kind=kind,
            layer=i,
            module_name=names.get(id(m), ""),
            module=m,
            width=_width(kind, m, model),
            block=b,
        )
        for i, m, b in zip(idx, modules, owners)
    ]


SiteFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


class _HandleGroup:
    """Several hook handles removed together (quacks like ``RemovableHandle``)."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_site_hook(site: NeuronSite, fn: SiteFn, *, observer: bool = False):
    """Call ``fn(activation)`` on every forward pass through ``site``.

    ``activation`` has shape ``[batch, seq, width]`` (``width`` = ``site.width``).
    If ``fn`` returns a tensor of the same shape it replaces the activation
    (how dropout masks are applied); ``None`` leaves it unchanged.

    Args:
        observer: register ahead of existing hooks (``prepend=True``) so that
            an observer sees the activation before any mask changes it.

    Returns:
        A handle with ``remove()`` (a ``torch.utils.hooks.RemovableHandle``, or
        a group of them when an ``mlp`` site also needs a hook on its block),
        usable as a context manager.
    """
    if site.kind == "mlp":
        # Some families (OPT) flatten tokens before the FFN, so the projection
        # sees [batch * seq, d_ff]; the block's input tells us [batch, seq].
        tokens_shape: list = [None]

        def block_pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            tokens_shape[0] = tuple(hidden.shape[:-1]) if isinstance(hidden, torch.Tensor) else None

        def pre_hook(module, args):
            x = args[0]
            shape = tokens_shape[0]
            flat = x.dim() == 2 and shape is not None and len(shape) == 2 and shape[0] * shape[1] == x.shape[0]
            out = fn(x.reshape(*shape, x.shape[-1]) if flat else x)
            if out is None:
                return None
            if flat:
                out = out.reshape(x.shape)
            return (out,) + tuple(args[1:])

        handles = [site.module.register_forward_pre_hook(pre_hook, prepend=observer)]
        if site.block is not None and site.block is not site.module:
            handles.append(site.block.register_forward_pre_hook(block_pre_hook, with_kwargs=True))
        return handles[0] if len(handles) == 1 else _HandleGroup(handles)

    def fwd_hook(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        out = fn(hidden)
        if out is None:
            return None
        if isinstance(output, tuple):
            return (out,) + output[1:]
        if isinstance(output, list):
            return [out] + output[1:]
        return out

    return site.module.register_forward_hook(fwd_hook, prepend=observer)


def value_vector_parameter(site: NeuronSite) -> tuple[nn.Parameter, int]:
    """The weight that holds the value vectors of an ``mlp`` site, and the axis
    that indexes neurons: ``(weight [d, d_ff], 1)`` for ``nn.Linear`` and
    ``(weight [d_ff, d], 0)`` for GPT-2's ``Conv1D``.

    Raises:
        ValueError: ``site.kind`` is not ``"mlp"``.
    """
    if site.kind != "mlp":
        raise ValueError(f"value vectors exist only for 'mlp' sites, not {site.kind!r}")
    w = getattr(site.module, "base_layer", site.module)
    return w.weight, (0 if hasattr(w, "nx") else 1)


def assert_sites_reached(
    model: nn.Module,
    sites: Sequence[NeuronSite],
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
) -> None:
    """Run one no-grad forward and check that every site's hook fires.

    A wrapper (a PEFT method, a custom module) that bypasses the hooked
    module would otherwise make statistics and masks silently do nothing.

    Args:
        input_ids: ``[B, T]`` token ids (one short example is enough).

    Raises:
        ValueError: naming each site that the forward pass never reached.
    """
    hit: set[str] = set()
    handles = [register_site_hook(s, (lambda key: lambda a: hit.add(key))(s.key), observer=True) for s in sites]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(
                input_ids=input_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
            )
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missed = [f"{s.key} ({s.module_name or type(s.module).__name__})" for s in sites if s.key not in hit]
    if missed:
        raise ValueError(
            f"the forward pass never reached site(s) {', '.join(missed)}: a wrapper (e.g. a PEFT method) hides "
            "them. Name the module that really runs with module_path (send_module_path), or change the wrapper's "
            "target modules."
        )

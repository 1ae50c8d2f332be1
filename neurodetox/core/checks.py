"""Input checks shared by every settings class and public function.

Each check returns the value it accepted and raises :class:`~neurodetox.core.errors.UserError`
(a :class:`ValueError`) naming the argument, the bad value and what is valid. ``bool`` is never
accepted where a number is expected (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from neurodetox.core.errors import UserError

__all__ = ["DTYPES", "check_int", "check_number", "check_probability", "model_device", "resolve_dtype"]

#: Accepted dtype names (as in configs and on the command line) → torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound may be ``None``).

    Raises:
        UserError: not an integer (bools refused) or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UserError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """``value`` as a finite real number within the given bounds.

    Raises:
        UserError: not a finite ``int``/``float`` (bools refused) or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    lo = "" if minimum is None else (f"{minimum} <= " if min_inclusive else f"{minimum} < ")
    hi = "" if maximum is None else (f" <= {maximum}" if max_inclusive else f" < {maximum}")
    bad = (
        minimum is not None
        and (value < minimum if min_inclusive else value <= minimum)
        or maximum is not None
        and (value > maximum if max_inclusive else value >= maximum)
    )
    if bad:
        raise UserError(f"{name} must satisfy {lo}{name}{hi}, got {value!r}")
    return float(value)


def check_probability(name: str, value: Any, *, open_low: bool = True, open_high: bool = False) -> float:
    """A fraction in ``(0, 1]`` by default (``open_low``/``open_high`` choose the ends)."""
    return check_number(name, value, minimum=0.0, maximum=1.0, min_inclusive=not open_low, max_inclusive=not open_high)


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a name in :data:`DTYPES`, a ``torch.dtype`` or ``None`` (→ ``default``).

    Raises:
        UserError: an unknown name.
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[key]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (``model.device`` when it has one; CPU for a model without any)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")

"""Tests for ``neurodetox.patching.mint.settings``: the update rule against its formula, the settings checks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from patching_helpers import one_thread

from neurodetox.patching import MintSettings, update_rule


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def test_update_rule_formula():
    from neurodetox.patching.mint.settings import step_scale

    w, tau = torch.randn(32), torch.randn(32)
    for alpha in (0.01, 0.1, 1.0):
        for sign in (1.0, -1.0):
            assert torch.equal(update_rule(w, tau, alpha, sign, "interpolate"), (w + alpha * sign * tau) / (1 + alpha))
            assert torch.equal(update_rule(w, tau, alpha, sign, "additive"), w + alpha * sign * tau)
            assert torch.equal(update_rule(w, tau, alpha, sign), update_rule(w, tau, alpha, sign, "additive"))
            # the step scale c(α) of the guard's head-change cache: Δ(α) = c(α) · v with v independent of α
            for rule, v in (("interpolate", sign * tau - w), ("additive", sign * tau)):
                c = step_scale(alpha, rule)
                assert torch.allclose(update_rule(w, tau, alpha, sign, rule) - w, c * v, atol=1e-6)
    with pytest.raises(ValueError, match="valid rules are additive, interpolate"):
        update_rule(w, tau, 0.1, 1.0, "multiply")
    with pytest.raises(ValueError, match="unknown update 'multiply'; valid updates are additive, interpolate"):
        MintSettings(update="multiply").validate()


def test_reference_settings_are_validated():
    with pytest.raises(ValueError, match="max_reference_flips"):
        MintSettings(max_reference_flips=-1).validate()
    with pytest.raises(ValueError, match="reference_retries"):
        MintSettings(reference_retries=1.5).validate()


def test_last_sixth_layer_spec():
    from neurodetox.core.sites import parse_layers

    assert parse_layers("last_sixth", 30) == [25, 26, 27, 28, 29]
    assert parse_layers("last_sixth", 4) == [3]
    assert parse_layers("second_half", 30) == list(range(15, 30))
    assert MintSettings().layers == "last_sixth"


def test_every_setting_is_reachable_through_hf_argument_parser():
    """``HfArgumentParser`` builds a command line from the dataclass: no flags give the defaults, and every
    field takes a non-default value from its flag (compared with the same value passed in Python)."""
    import dataclasses
    import typing

    from transformers import HfArgumentParser

    parser = HfArgumentParser(MintSettings)
    assert parser.parse_args_into_dataclasses(args=[])[0] == MintSettings()
    other = {
        "update": ("interpolate", ["interpolate"]),
        "alpha": (0.25, ["0.25"]),
        "alpha_steps": ([1.0, 3.0], ["1", "3"]),
        "locator": ("contrastive", ["contrastive"]),
        "candidates": (7, ["7"]),
        "max_patches": (3, ["3"]),
        "layers": ("1,3", ["1,3"]),
        "storage_dtype": ("bfloat16", ["bfloat16"]),
        "max_failures_per_edit": (4, ["4"]),
        "margin": (0.0, ["0"]),
        "max_reference_flips": (2, ["2"]),
        "reference_retries": (0, ["0"]),
        "protect": (1e4, ["1e4"]),
        "protect_competitors": (5, ["5"]),
    }
    fields = dataclasses.fields(MintSettings)
    hints = typing.get_type_hints(MintSettings)  # (the parser rewrites Field.type in place)
    for f in fields:
        assert f.metadata.get("help"), f.name  # the command line's help text
        default = getattr(MintSettings(), f.name)
        if hints[f.name] is bool:
            value, argv = (not default), [str(not default).lower()]
        else:
            value, argv = other[f.name]
        assert value != default, f.name
        got = parser.parse_args_into_dataclasses(args=[f"--{f.name}", *argv])[0]
        assert got == MintSettings(**{f.name: value}), f.name
        assert getattr(got, f.name) == value, f.name
    assert len(fields) >= 27  # every field was exercised (new fields join the loop)


@pytest.mark.parametrize(
    "field, value",
    [
        ("margin", 1.0),
        ("margin", -0.1),
        ("alpha", 0.0),
        ("alpha", True),
        ("alpha_steps", []),
        ("alpha_steps", [1.0, -2.0]),
        ("candidates", 0),
        ("max_patches", 2.5),
        ("max_failures_per_edit", False),
        ("protect_competitors", 0),
        ("locator", "magic"),
        ("storage_dtype", "int8"),
        ("protect", float("nan")),
    ],
)
def test_bad_settings_raise_a_user_error_naming_the_field(field, value):
    from neurodetox.core.errors import UserError

    with pytest.raises(UserError, match=field):
        MintSettings(**{field: value})
    s = MintSettings()
    setattr(s, field, value)  # a field changed after construction is caught by validate(), which repair() calls
    with pytest.raises(UserError, match=field):
        s.validate()


def test_storage_dtype_names_and_torch_dtypes():
    assert MintSettings(storage_dtype="bf16").storage == torch.bfloat16
    assert MintSettings(storage_dtype=torch.float16).storage_dtype == "float16"
    assert MintSettings().storage is None
    assert MintSettings(alpha_steps=2).alpha_steps == [2.0]

"""The rules the package tree keeps (docs/architecture.md): checked on the source, so a change that
breaks one fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "neurodetox"
ROOT_ENTRY_POINTS = {"__init__.py", "__main__.py"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_at_most_four_loose_modules_at_the_package_root():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_ENTRY_POINTS)
    assert len(loose) <= 4, loose


def test_no_module_over_900_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 900}
    assert not long, long


def test_no_private_helper_is_imported_from_another_module():
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neurodetox"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{_dotted(path)}: from {node.module} import {alias.name}")
    assert not offenders, offenders


def test_readme_documented_imports_keep_working():
    from neurodetox.callbacks import ActivationStatsCallback, EigenScoreCallback, SensitiveNeuronDropoutCallback
    from neurodetox.core.models import load_model as core_load_model
    from neurodetox.core.sites import resolve_sites as core_resolve_sites
    from neurodetox.data import load_facts
    from neurodetox.data.lm import tokenize_texts
    from neurodetox.metrics.callback import EigenScoreCallback as NewEigenScoreCallback
    from neurodetox.models import load_model
    from neurodetox.send import SeNDConfig as NewSeNDConfig
    from neurodetox.send import SeNDTrainer as NewSeNDTrainer
    from neurodetox.send.callbacks import ActivationStatsCallback as NewActivationStatsCallback
    from neurodetox.send.callbacks import SensitiveNeuronDropoutCallback as NewDropoutCallback
    from neurodetox.sites import resolve_sites
    from neurodetox.trainer import SeNDConfig, SeNDTrainer

    assert load_model is core_load_model and resolve_sites is core_resolve_sites
    assert SeNDTrainer is NewSeNDTrainer and SeNDConfig is NewSeNDConfig
    assert ActivationStatsCallback is NewActivationStatsCallback
    assert SensitiveNeuronDropoutCallback is NewDropoutCallback
    assert EigenScoreCallback is NewEigenScoreCallback
    assert callable(load_facts) and callable(tokenize_texts)

"""Shared ground under the three pillars: neuron sites, model loading, hook primitives,
distributed helpers, running moments, atomic I/O and input checks.

Nothing here imports :mod:`neurodetox.send`, :mod:`neurodetox.metrics` or
:mod:`neurodetox.patching`.
"""

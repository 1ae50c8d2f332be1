"""Compatibility alias: the Trainer callbacks at their pre-0.2 path.

New code imports them from :mod:`neurodetox.send.callbacks`,
:mod:`neurodetox.metrics.callback` and :mod:`neurodetox.reports.metrics_log`.
"""

from neurodetox.metrics.callback import EigenScoreCallback
from neurodetox.reports.metrics_log import JsonlMetricsCallback
from neurodetox.send.callbacks import (
    SEND_MODES,
    ActivationStatsCallback,
    CheckpointedCallback,
    SensitiveNeuronDropoutCallback,
)

__all__ = [
    "ActivationStatsCallback",
    "CheckpointedCallback",
    "EigenScoreCallback",
    "JsonlMetricsCallback",
    "SEND_MODES",
    "SensitiveNeuronDropoutCallback",
]

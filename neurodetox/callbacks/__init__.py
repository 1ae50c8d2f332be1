"""Trainer callbacks: activation statistics, sensitive-neuron dropout, EigenScore."""

from .activation_stats import ActivationStatsCallback
from .base import CheckpointedCallback
from .eigenscore import EigenScoreCallback
from .metrics_log import JsonlMetricsCallback
from .sensitive_dropout import SEND_MODES, SensitiveNeuronDropoutCallback

__all__ = [
    "ActivationStatsCallback",
    "CheckpointedCallback",
    "EigenScoreCallback",
    "JsonlMetricsCallback",
    "SEND_MODES",
    "SensitiveNeuronDropoutCallback",
]

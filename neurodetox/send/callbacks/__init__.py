"""SeND's Trainer callbacks: activation statistics and sensitive-neuron dropout."""

from neurodetox.send.callbacks.activation_stats import ActivationStatsCallback
from neurodetox.send.callbacks.base import CheckpointedCallback
from neurodetox.send.callbacks.sensitive_dropout import SEND_MODES, SensitiveNeuronDropoutCallback

__all__ = ["ActivationStatsCallback", "CheckpointedCallback", "SEND_MODES", "SensitiveNeuronDropoutCallback"]

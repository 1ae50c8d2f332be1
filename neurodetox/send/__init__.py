"""SeND training (Sensitive Neuron Dropout; Mohammadzadeh et al., "Hallucination Detox:
Sensitivity Dropout (SenD) for Large Language Model Training", arXiv 2410.15460).

Flow: tracking items → embeddings at a site (:mod:`.callbacks.sensitive_dropout`) →
sensitivity (:mod:`.sensitivity`) → masks (:mod:`.masks`) for the next window, run by
:class:`SeNDTrainer` (:mod:`.trainer`) with :class:`SeNDConfig` (:mod:`.config`);
the ``neurodetox train`` job is :mod:`.run`, its recipes :mod:`.recipes`. Any other Trainer
(TRL's ``SFTTrainer`` first) gets the same through :func:`add_send` or :class:`SeNDMixin`
(:mod:`.integration`).
"""

from neurodetox.send.config import SeNDConfig
from neurodetox.send.integration import SeNDArguments, SeNDMixin, add_send
from neurodetox.send.trainer import SeNDTrainer, last_checkpoint

__all__ = ["SeNDArguments", "SeNDConfig", "SeNDMixin", "SeNDTrainer", "add_send", "last_checkpoint"]

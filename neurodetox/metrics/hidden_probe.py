"""Hidden-state probe: logistic regression on one layer's hidden state predicts a hallucinated answer.

SAPLMA (Azaria & Mitchell, "The Internal State of an LLM Knows When It's Lying", arXiv
2304.13734) and Obeso et al. (arXiv 2509.03531) train a linear classifier on a hidden state
to tell true from false; here the input is the output of one decoder block
(``EigenScoreSettings.probe_layer``) at the last prompt token, at the greedy answer's last
token before the answer boundary, or both concatenated (``probe_position``), read by
:func:`neurodetox.metrics.sampling.sample_answers` / ``greedy_generate`` with
``feature_layer``. The classifier is scikit-learn's ``LogisticRegressionCV`` after
standardisation, its regularisation chosen by cross-validated AUROC **on the labelled
training probes only**. It is supervised: fit it on probes whose correctness is known and
that are disjoint from the probes it scores (``neurodetox eval``: the data's other probes;
training: the tracking probes), never on the scored ones.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from neurodetox.core.errors import UserError
from neurodetox.metrics.settings import DEFAULTS, PROBE_POSITIONS

__all__ = ["HiddenStateProbe", "probe_inputs"]

#: Inverse regularisation strengths tried by the cross-validation.
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0)


def probe_inputs(features, position: str = DEFAULTS.probe_position) -> np.ndarray:
    """The probe's input matrix from ``[N, 2, d]`` features (last prompt token, last answer token).

    Returns:
        float64 ``[N, d]`` (``"prompt"`` / ``"answer"``) or ``[N, 2d]`` (``"both"``).

    Raises:
        UserError: unknown ``position``; ValueError: features not shaped ``[N, 2, d]``.
    """
    if position not in PROBE_POSITIONS:
        raise UserError(f"probe_position must be one of {', '.join(PROBE_POSITIONS)}, got {position!r}")
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if x.ndim != 3 or x.shape[1] != 2:
        raise ValueError(f"hidden-state features must be shaped [N, 2, d], got {list(x.shape)}")
    x = x.astype(np.float64)
    if position == "prompt":
        return x[:, 0]
    if position == "answer":
        return x[:, 1]
    return x.reshape(x.shape[0], -1)


class HiddenStateProbe:
    """Logistic-regression probe ``P(hallucinated | hidden state)`` (SAPLMA, arXiv 2304.13734).

    Args:
        position: ``"prompt"``, ``"answer"`` or ``"both"`` (default from
            :class:`~neurodetox.metrics.settings.EigenScoreSettings`).
        min_labelled: fewest labelled probes :meth:`fit` accepts (≥ 4); it also needs at least 2
            hallucinated and 2 correct ones.

    Attributes:
        n_train, n_train_hallucinated: what the last :meth:`fit` used.
        C: the regularisation the cross-validation chose.
    """

    def __init__(
        self,
        position: str = DEFAULTS.probe_position,
        min_labelled: int = DEFAULTS.probe_min_labelled,
    ):
        if position not in PROBE_POSITIONS:
            raise UserError(f"probe_position must be one of {', '.join(PROBE_POSITIONS)}, got {position!r}")
        self.position, self.min_labelled = position, int(min_labelled)
        self.model = None
        self.n_train = 0
        self.n_train_hallucinated = 0
        self.C = float("nan")

    def check_labels(self, hallucinated: Sequence[bool]) -> None:
        """Raise if these labels are too few to fit on.

        Raises:
            UserError: fewer than ``min_labelled`` labelled probes, or fewer than 2 of an outcome,
                naming how many it has and needs.
        """
        y = np.asarray(hallucinated, dtype=bool)
        n, h = int(y.size), int(y.sum())
        if n < self.min_labelled or h < 2 or n - h < 2:
            raise UserError(
                f"the hidden-state probe needs at least {self.min_labelled} labelled probes with at least 2 "
                f"hallucinated and 2 correct; it has {n} ({h} hallucinated, {n - h} correct)"
            )

    def fit(self, features, hallucinated: Sequence[bool]) -> HiddenStateProbe:
        """Fit on ``[N, 2, d]`` features and their labels (True = hallucinated).

        Raises:
            UserError: too few labelled probes (see :meth:`check_labels`).
        """
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        y = np.asarray(hallucinated, dtype=bool)
        self.check_labels(y)
        x = probe_inputs(features, self.position)
        if x.shape[0] != y.size:
            raise ValueError(f"{x.shape[0]} feature rows but {y.size} labels")
        folds = int(min(5, y.sum(), (~y).sum()))
        clf = LogisticRegressionCV(Cs=list(PROBE_CS), cv=folds, scoring="roc_auc", max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8's notices about its 1.10 API
            self.model = make_pipeline(StandardScaler(), clf).fit(x, y)
        self.C = float(clf.C_[0])
        self.n_train, self.n_train_hallucinated = int(y.size), int(y.sum())
        return self

    def score(self, features) -> np.ndarray:
        """``P(hallucinated)`` for ``[M, 2, d]`` features, float64 ``[M]`` (higher = hallucinated).

        Raises:
            RuntimeError: before :meth:`fit`.
        """
        if self.model is None:
            raise RuntimeError("HiddenStateProbe.score called before fit")
        return self.model.predict_proba(probe_inputs(features, self.position))[:, 1]

"""Baseline predictor: the oracle (computes exactly the neurons that fire)."""
from __future__ import annotations

import numpy as np

from ndpsched.policy import PredictorPolicy
from ndpsched.registry import register_policy


@register_policy("predictor", "oracle")
class OraclePredictor(PredictorPolicy):
    """Perfect prediction: the computed set is the true active set (an upper bound)."""

    def _predict(self, token: int, on: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return on, off

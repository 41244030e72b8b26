"""Shared fixtures: a tiny model on a tiny GPU so every test runs in milliseconds."""
from __future__ import annotations

import numpy as np
import pytest

from ndpsched.presets import load_hardware, load_model
from ndpsched.tracegen import synthetic_trace

#: a GPU small enough that the tiny model must split its neurons between GPU and DIMMs
TINY_HW = {"gpu": {"memory_bytes": 4.6e5, "reserved_bytes": 0.0},
           "dimm": {"capacity_bytes": 4.0e6}}


@pytest.fixture(scope="session")
def tiny_model():
    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_hw():
    return load_hardware("rtx4090", 4, overrides=TINY_HW)


@pytest.fixture(scope="session")
def tiny_trace(tiny_model):
    return synthetic_trace(tiny_model, n_tokens=48, n_seqs=3, seed=7)


def recount(trace, key_of_device: np.ndarray, group: np.ndarray, n_dev: int, token: int, batch: int):
    """From-scratch (total, union) counts at ``token`` for a placement (test oracle)."""
    active = sum(trace.active(s, token).astype(np.int64) for s in range(batch))
    key = group * n_dev + key_of_device
    K = (group.max() + 1) * n_dev
    total = np.bincount(key, weights=active, minlength=K).reshape(-1, n_dev)
    union = np.bincount(key, weights=active > 0, minlength=K).reshape(-1, n_dev)
    return total, union

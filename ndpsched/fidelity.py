"""`ndpsched fidelity`: the model's predictions against published measurements it can cite.

No parameter of the model was fitted to these points; the defaults come from data sheets and
physical arguments (see the presets and ``CostParams``), so the errors below are honest
out-of-sample figures.
"""
from __future__ import annotations

from typing import Any

from .config import RunConfig
from .run import simulate

#: published end-to-end decode throughputs (tokens/s, prefill included)
CALIBRATION_POINTS: list[dict[str, Any]] = [
    {"system": "hermes", "model": "llama2-70b", "gpu": "rtx4090", "dimms": 8, "batch": 1, "prompt_len": 128,
     "gen_len": 128, "published_tokens_per_s": 13.75,
     "source": "Hermes (HPCA'25) evaluation, calibration point stated for the full system: LLaMA2-70B on one RTX 4090 + 8 NDP-DIMMs, batch 1"},
    {"system": "hermes", "model": "opt-66b", "gpu": "rtx4090", "dimms": 8, "batch": 1, "prompt_len": 128,
     "gen_len": 128, "published_tokens_per_s": 20.37,
     "source": "Hermes (HPCA'25) evaluation, calibration point stated for the full system: OPT-66B on one RTX 4090 + 8 NDP-DIMMs, batch 1"},
]


def run_fidelity(trace: str = "skew", seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for point in CALIBRATION_POINTS:
        cfg_keys = {k: point[k] for k in ("system", "model", "gpu", "dimms", "batch", "prompt_len", "gen_len")}
        r = simulate(RunConfig(**cfg_keys, trace=trace, seed=seed))
        published = point["published_tokens_per_s"]
        rows.append({**point, "trace": trace, "model_tokens_per_s": r.tokens_per_s,
                     "error_pct": 100.0 * (r.tokens_per_s - published) / published})
    return rows

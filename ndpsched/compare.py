"""`ndpsched compare`: every system on the same model, machine and trace, side by side."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import CapacityError
from .presets import load_model
from .run import simulate
from .tracegen import synthetic_trace

log = logging.getLogger(__name__)

DEFAULT_SYSTEMS = ("hermes", "hermes-offline", "powerinfer", "dejavu", "hermes-base", "papi",
                   "flexgen", "zero-inference", "accelerate", "airllm", "gpu-only")


def run_compare(model: str, batches: list[int], systems: list[str], baseline: str = "accelerate", gpu: str = "rtx4090",
                dimms: int = 8, prompt_len: int = 128, gen_len: int = 128, seed: int = 0,
                reference_gpu: str = "a100-40gb") -> list[dict[str, Any]]:
    """One row per (system, batch): tokens/s and speed-up over ``baseline`` at the same batch.

    A system that cannot run a configuration gets ``tokens_per_s = None`` and the reason. The
    ``gpu-only`` reference runs on ``reference_gpu`` (Hermes: 5 x A100-40GB).
    """
    from .baselines import BASELINES

    spec = load_model(model)
    trace = synthetic_trace(spec, prompt_len + gen_len, max(batches), seed=seed)
    rows = []
    for batch in batches:
        sub = trace if trace.n_seqs == batch else trace.sequences(range(batch))
        for system in systems:
            cfg = RunConfig(system=system, model=model, batch=batch, gpu=reference_gpu if system == "gpu-only" else gpu,
                            dimms=dimms, prompt_len=prompt_len, gen_len=gen_len, seed=seed)
            row: dict[str, Any] = {"model": model, "batch": batch, "system": system, "gpu": cfg.gpu}
            try:
                r = simulate(cfg, trace=None if system in BASELINES else sub)
                row.update(tokens_per_s=r.tokens_per_s, prefill_s=r.prefill_s, decode_s=r.decode_s, reason="")
            except CapacityError as exc:
                row.update(tokens_per_s=None, prefill_s=None, decode_s=None, reason=str(exc))
            rows.append(row)
    for batch in batches:
        base = next((r["tokens_per_s"] for r in rows if r["batch"] == batch and r["system"] == baseline), None)
        for r in rows:
            if r["batch"] == batch:
                r["speedup_vs_" + baseline] = (r["tokens_per_s"] / base) if (base and r["tokens_per_s"]) else None
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict[str, Any]], path: str | Path, title: str) -> bool:
    """tokens/s vs batch, one line per system, log scale; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'ndpsched[plot]'): no plot written")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [(r["batch"], r["tokens_per_s"]) for r in rows if r["system"] == system and r["tokens_per_s"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


__all__ = ["run_compare", "write_csv", "plot", "DEFAULT_SYSTEMS"]

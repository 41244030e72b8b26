"""Analytic (expected-value) mode against the trace-driven mode on the same configurations.

Prints a Markdown table: tokens/s and decode time in both modes, the relative error of the
analytic mode, and the wall time of each (docs/sweeps.md holds a measured copy).

    python scripts/analytic_vs_trace.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import ndpsched  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ndpsched.analytic import _CACHE
from ndpsched.config import RunConfig
from ndpsched.run import simulate

GRID = [("relullama-7b", 1, 4), ("relullama-7b", 1, 8), ("relullama-7b", 1, 16), ("relullama-7b", 8, 8),
        ("llama2-13b", 1, 8), ("llama2-13b", 8, 8), ("opt-66b", 1, 8), ("opt-66b", 4, 16),
        ("llama2-70b", 1, 8), ("llama2-70b", 4, 12)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="hermes-offline,hermes,topk")
    ap.add_argument("--models", default="", help="comma-separated subset of the grid's models")
    args = ap.parse_args()
    print("| system | model | batch | DIMMs | trace tok/s | analytic tok/s | tok/s error | decode error "
          "| trace wall (s) | analytic wall (s) | analytic, frequencies cached (s) | of which partition solve (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for system in args.systems.split(","):
        for model, batch, dimms in GRID:
            if args.models and model not in args.models.split(","):
                continue
            cfg = RunConfig(system=system, model=model, batch=batch, dimms=dimms)
            t0 = time.perf_counter()
            tr = simulate(cfg)
            t_trace = time.perf_counter() - t0
            _CACHE.clear()
            t0 = time.perf_counter()
            an = simulate(cfg.with_overrides({"mode": "analytic"}))
            t_ana = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = simulate(cfg.with_overrides({"mode": "analytic"}))
            t_cached = time.perf_counter() - t0
            solve_s = (again.config["partition"].get("info") or {}).get("solve_s", 0.0)
            print(f"| {system} | {model} | {batch} | {dimms} | {tr.tokens_per_s:.2f} | {an.tokens_per_s:.2f} | "
                  f"{100 * (an.tokens_per_s / tr.tokens_per_s - 1):+.1f} % | "
                  f"{100 * (an.decode_s / tr.decode_s - 1):+.1f} % | {t_trace:.1f} | {t_ana:.1f} | {t_cached:.2f} | {solve_s:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

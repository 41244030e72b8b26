"""Simulator speed benchmark: simulated decode tokens per second of wall time."""
from __future__ import annotations

import time
from typing import Any

from .config import RunConfig
from .presets import TINY_SPLIT, load_model
from .run import simulate
from .tracegen import synthetic_trace


def run_bench(models: list[str], batches: list[int], prompt_len: int = 128, gen_len: int = 128,
              systems: tuple[str, ...] = ("hermes-offline", "hermes"), seed: int = 0,
              progress: bool = False, gpu: str = "rtx4090", gpu_profile: str | None = None) -> list[dict[str, Any]]:
    """One row per (model, batch).

    ``sim_tokens_per_s`` = generated tokens / wall time of the decode loop; the modelled machine's
    own decode speed is ``modelled_tokens_per_s`` = generated tokens / modelled decode time, and
    ``ratio`` is how much faster than real time the simulator runs. The synthetic trace is made
    once per model (with the largest batch's sequences) and its cost reported as ``trace_gen_s``.
    One row per (model, batch, system): ``hermes-offline`` (offline ILP, static mapping) exercises
    the execution model alone; ``hermes`` adds the online predictor, adjustment and remapping.
    ``gpu`` and ``gpu_profile`` choose the GPU preset and its measured profile (see RunConfig).

    The compiled loops (:mod:`ndpsched.jit`) are compiled, or loaded from their cache, by a
    short run of every system on the tiny model first, so that the rows time the steady state;
    that one-time cost is ``jit_warmup_s`` (compiling from scratch, the first time on a machine,
    takes seconds; loading the cache, a fraction of one).
    """
    t0 = time.perf_counter()
    for system in systems:
        simulate(RunConfig.from_dict({**TINY_SPLIT, "system": system, "seed": seed}))
    warmup_s = time.perf_counter() - t0
    rows = []
    for name in models:
        model = load_model(name)
        t0 = time.perf_counter()
        trace = synthetic_trace(model, prompt_len + gen_len, max(batches), seed=seed)
        gen_s = time.perf_counter() - t0
        for batch in batches:
            for system in systems:
                cfg = RunConfig(system=system, model=name, batch=batch, prompt_len=prompt_len, gen_len=gen_len, seed=seed,
                                gpu=gpu, gpu_profile=gpu_profile)
                sub = trace if trace.n_seqs == batch else trace.sequences(range(batch))
                r = simulate(cfg, trace=sub, progress=progress)
                tokens = gen_len * batch
                sim_tps = tokens / r.loop_wall_s
                modelled_tps = tokens / r.decode_s
                rows.append({
                    "model": name, "batch": batch, "system": system,
                    "sim_tokens_per_s": sim_tps,
                    "modelled_tokens_per_s": modelled_tps,
                    "ratio": sim_tps / modelled_tps,
                    "setup_s": r.wall_s - r.loop_wall_s,
                    "end_to_end_tokens_per_s": tokens / r.wall_s,
                    "trace_gen_s": gen_s,
                    "jit_warmup_s": warmup_s,
                    "n_neurons": model.n_neurons,
                })
    return rows

"""Environment speed: env steps per second against the bare simulator on the same windows.

For every env id the heuristic action is played (so the env's policies do the same work as in
``Simulator.run``) over ``episodes`` episodes on the pool's sequences; the reference is the bare
:class:`~ndpsched.simulator.DecodeRun` loop (``next_window`` + ``apply_policies``) over the same
sequences from the same start, timed in the same process right after. Per-sequence caches are
warmed for both first, so both time the steady state an RL run sees.
"""
from __future__ import annotations

import time
from typing import Any

from . import ENV_IDS


def _bare_windows(sim, seqs_list, initial) -> tuple[int, float]:
    t0 = time.perf_counter()
    windows = 0
    for seqs in seqs_list:
        result = sim.run(seqs=seqs, initial=initial)
        windows += -(-len(result.token_s) // sim.window_tokens)
    return windows, time.perf_counter() - t0


def run_env_bench(env_ids: list[str] | None = None, model: str | None = "relullama-7b", dimms: int | None = 8,
                  episodes: int = 8, repeats: int = 3, **env_kwargs: Any) -> list[dict[str, Any]]:
    """One row per env id: ``env_steps_per_s`` (reset included), the bare simulator's
    ``sim_windows_per_s`` on the same windows, and ``env_overhead`` = env time / simulator time - 1
    (best of ``repeats`` for both)."""
    import gymnasium as gym

    from ndpsched.run import build_simulator

    rows = []
    for env_id in env_ids or list(ENV_IDS):
        env = gym.make(env_id, model=model, dimms=dimms, **env_kwargs)   # None: the env's (preset's) default
        u = env.unwrapped
        action = u.heuristic_action()
        seqs_list = [[s] for s in range(u.pool_size)] * (episodes // u.pool_size + 1)
        seqs_list = seqs_list[:episodes]
        sim = build_simulator(u.config, u.sim.trace)
        best_env = best_sim = float("inf")
        steps = windows = 0
        for rep in range(repeats + 1):                # the first round warms the caches
            t0 = time.perf_counter()
            steps = 0
            for seqs in seqs_list:
                env.reset(options={"seqs": seqs})
                steps += 1                            # reset simulates the first window
                while True:
                    *_, terminated, truncated, _ = env.step(action)
                    steps += 1
                    if terminated or truncated:
                        break
            env_s = time.perf_counter() - t0
            windows, sim_s = _bare_windows(sim, seqs_list, u._initial)
            if rep:
                best_env, best_sim = min(best_env, env_s), min(best_sim, sim_s)
        decisions = steps - len(seqs_list)
        rows.append({
            "env": env_id, "model": u.config.model, "dimms": u.config.dimms,
            "window_tokens": u.config.window_tokens,
            "env_steps_per_s": decisions / best_env,
            "env_windows_per_s": steps / best_env,
            "sim_windows_per_s": windows / best_sim,
            "env_overhead": best_env / best_sim - 1.0,
            "policies": {role: getattr(u.config, role).name for role in ("partition", "predictor", "balancer")},
        })
        env.close()
    return rows

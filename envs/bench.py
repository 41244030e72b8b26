"""Environment speed: env steps per second against the bare simulator on the same windows.

For every env id the heuristic action is played (so the env's policies do the same work as in
``Simulator.run``) over ``episodes`` episodes on the pool's sequences; the reference is the bare
:class:`~ndpsched.simulator.DecodeRun` loop (``next_window`` + ``apply_policies``) over the same
sequences from the same start, timed in the same process, episode by episode in turn. Per-sequence
caches are warmed for both first, so both time the steady state an RL run sees.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

from . import ENV_IDS


def _env_episode(env, seqs, action) -> int:
    """Play one episode with ``action``; env steps taken (the reset counts: it simulates a window)."""
    env.reset(options={"seqs": seqs})
    steps = 1
    while True:
        *_, terminated, truncated, _ = env.step(action)
        steps += 1
        if terminated or truncated:
            return steps


def run_env_bench(env_ids: list[str] | None = None, model: str | None = "relullama-7b", dimms: int | None = 8,
                  episodes: int = 8, repeats: int = 5, **env_kwargs: Any) -> list[dict[str, Any]]:
    """One row per env id: ``env_steps_per_s`` (reset included), the bare simulator's
    ``sim_windows_per_s`` on the same windows, and ``env_overhead`` = env time / simulator time - 1.

    Env and simulator alternate episode by episode on the same sequence (which of them goes first
    alternates too), so a slow spell of the machine hits both; the rates are the best of
    ``repeats`` rounds, the overhead the median of the rounds' ratios (a ratio of two best-ofs
    would mix rounds). The simulator is the env's own
    (``Simulator.run`` from the env's start placement), so both read the same cached state."""
    import gymnasium as gym

    rows = []
    for env_id in env_ids or list(ENV_IDS):
        env = gym.make(env_id, model=model, dimms=dimms, **env_kwargs)   # None: the env's (preset's) default
        u = env.unwrapped
        action = u.heuristic_action()
        seqs_list = [[s % u.pool_size] for s in range(episodes)]
        sim = u.sim
        env_s, sim_s, ratios = [], [], []
        for rep in range(repeats + 1):                # the first round warms the caches
            steps = windows = 0
            round_env = round_sim = 0.0
            for i, seqs in enumerate(seqs_list):
                # which of the two runs a sequence first alternates: the second finds the
                # sequence's cached state warm in the CPU caches
                for env_turn in ((True, False) if (rep + i) % 2 == 0 else (False, True)):
                    t0 = time.perf_counter()
                    if env_turn:
                        steps += _env_episode(env, seqs, action)
                        round_env += time.perf_counter() - t0
                    else:
                        result = sim.run(seqs=seqs, initial=u._initial)
                        round_sim += time.perf_counter() - t0
                        windows += -(-len(result.token_s) // sim.window_tokens)
            if rep:
                env_s.append(round_env)
                sim_s.append(round_sim)
                ratios.append(round_env / round_sim)
        decisions = steps - len(seqs_list)
        rows.append({
            "env": env_id, "model": u.config.model, "dimms": u.config.dimms,
            "window_tokens": u.config.window_tokens,
            "env_steps_per_s": decisions / min(env_s),
            "env_windows_per_s": steps / min(env_s),
            "sim_windows_per_s": windows / min(sim_s),
            "env_overhead": statistics.median(ratios) - 1.0,
            "policies": {role: getattr(u.config, role).name for role in ("partition", "predictor", "balancer")},
        })
        env.close()
    return rows

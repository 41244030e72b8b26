"""Train a DIMM balancer with PPO and judge it against Hermes' heuristic and the hindsight oracle.

    .venv/bin/python examples/train_balancer.py                 # tiny preset, about a minute
    .venv/bin/python examples/train_balancer.py --model relullama-7b --timesteps 20000

Top to bottom: make the environment, train, evaluate every policy on a held-out trace pool
(one the agent never saw, not even for validation), print the table.
"""
from __future__ import annotations

import argparse

import gymnasium as gym

import ndpsched.envs  # noqa: F401  (registers ndpsched/DimmBalance-v0 and friends)
from ndpsched.artifact import load_artifact
from ndpsched.envs.evaluate import FixedAgent, HeuristicAgent, RandomAgent, evaluate
from ndpsched.train import HELD_OUT_TRACE_SEED, train_policy

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="model preset (default: the tiny test preset)")
parser.add_argument("--timesteps", type=int, default=4096)
parser.add_argument("--episodes", type=int, default=6)
parser.add_argument("--out", default="runs/example-balancer")
args = parser.parse_args()

env_id = "ndpsched/DimmBalance-v0"
env_kwargs = {"model": args.model} if args.model else {"preset": "tiny"}

# 1. The environment: one step = one 5-token window; the action picks how Hermes' Algorithm 1
#    remaps cold neurons between DIMMs this window (or not at all).
env = gym.make(env_id, **env_kwargs)
print(f"{env_id}: observation {env.observation_space.shape}, actions {env.action_space}")
print("Hermes' own decision is action", env.unwrapped.heuristic_action(),
      env.unwrapped.describe_action(env.unwrapped.heuristic_action()))

# 2. Train PPO on the training trace pool (hyperparameters: ndpsched/hyperparams.yaml).
result = train_policy(env_id, "ppo", timesteps=args.timesteps, seed=0, env_kwargs=env_kwargs,
                      out_dir=args.out, progress=True)
print(f"trained {result.timesteps} steps in {result.wall_s:.0f} s; validation return {result.score:.3f}")

# 3. Evaluate on the held-out pool: every policy through the same evaluate() on the same episodes.
trained = load_artifact(args.out)
held_out = {**env_kwargs, "trace_seed": HELD_OUT_TRACE_SEED}
policies = {
    "hermes (Algorithm 1)": (HeuristicAgent(), {}, None),
    "no remapping": (FixedAgent(0), {}, None),
    "random settings": (RandomAgent(seed=0), {}, None),
    "learned (PPO)": (trained.model, {}, trained.normalize),
    "hindsight oracle": (HeuristicAgent({"balancer": "oracle.lpt"}), {}, None),
}
rows = []
for name, (agent, extra, transform) in policies.items():
    r = evaluate(agent, env_id, n_episodes=args.episodes, env_kwargs={**held_out, **extra}, obs_transform=transform)
    rows.append((name, r))

# 4. The table.
hermes = rows[0][1]["tokens_per_s"]
print(f"\n{'policy':<22} {'tokens/s':>14} {'vs hermes':>10} {'imbalance':>10} {'bytes migrated':>15}")
for name, r in rows:
    print(f"{name:<22} {r['tokens_per_s']:>8.2f}±{r['tokens_per_s_ci95']:<4.2f}"
          f"{100 * (r['tokens_per_s'] / hermes - 1):>+9.2f}% {r['dimm_imbalance']:>10.4f} {r['bytes_migrated']:>15.3g}")

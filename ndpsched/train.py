"""Train RL schedulers with Stable-Baselines3 (and many seeds at once with Ray).

:func:`train_policy` is what ``ndpsched train`` runs: hyperparameters from the shipped YAML
(:file:`hyperparams.yaml`, per algorithm and env) updated by the caller's, vectorised envs on
the *training* trace pool, optional VecNormalize, TensorBoard logs, checkpoints every N steps
(``resume=True`` continues from the last), periodic evaluation on the *validation* pool (which
can stop a run early, as an Optuna pruner does), and a final artifact (:mod:`ndpsched.artifact`)
that ``--balancer rl:DIR`` runs.

Trace pools, by ``trace_seed`` (the environments' synthetic traces): training 0, validation 100
(evaluation during training, pruning, model selection), held-out 1000 and up (only
``ndpsched evaluate``). Never tune on the held-out pools.
"""
from __future__ import annotations

import copy
import inspect
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .artifact import ALGORITHMS, algorithm_class, save_artifact
from .errors import ConfigError, unknown_name

TRAIN_TRACE_SEED = 0
VALIDATION_TRACE_SEED = 100
HELD_OUT_TRACE_SEED = 1000

#: keys of a hyperparameter entry that are not SB3 constructor arguments
TRAIN_KEYS = ("n_envs", "normalize", "env_kwargs", "policy")


@dataclass
class TrainResult:
    """What one training run produced."""

    env_id: str
    algo: str
    seed: int
    timesteps: int
    out_dir: str
    score: float                    # mean return on the validation pool (higher is better)
    wall_s: float
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_hyperparams(env_id: str, algo: str) -> dict[str, Any]:
    """The shipped defaults for (algorithm, env): the env's entry, else the algorithm's default."""
    if algo not in ALGORITHMS:
        raise unknown_name("algorithm", algo, ALGORITHMS)
    table = yaml.safe_load((Path(__file__).with_name("hyperparams.yaml")).read_text())
    entry = table.get(algo, {})
    return copy.deepcopy(entry.get(env_id, entry.get("default", {})))


def load_train_config(path: str | Path) -> dict[str, Any]:
    """A ``--config`` YAML: hyperparameters (and ``env_kwargs``, ``n_envs``, ``normalize``)."""
    from .config import load_yaml_mapping

    return load_yaml_mapping(path, "training config")


def _check_hyperparams(cls, hp: dict[str, Any], algo: str) -> None:
    valid = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "env", "policy")]
    for key in hp:
        if key not in valid:
            raise unknown_name(f"hyperparameter of {algo}", key, [*valid, *TRAIN_KEYS])


def _last_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
    """(steps, path) of the newest complete checkpoint (a file that is not a whole zip, say one
    an older release was writing when it was killed, is passed over)."""
    import zipfile

    best = None
    for path in ckpt_dir.glob("ckpt_*_steps.zip"):
        m = re.match(r"ckpt_(\d+)_steps\.zip$", path.name)
        if m and (best is None or int(m.group(1)) > best[0]) and zipfile.is_zipfile(path):
            best = (int(m.group(1)), path)
    return best


def _checkpoint_callback(save_freq: int, save_path: Path, save_vecnormalize: bool, save_replay_buffer: bool):
    """SB3's CheckpointCallback, written so that a kill cannot leave a half-written checkpoint
    behind: each file goes to a temporary name and is renamed into place, and the model's zip
    (what a resume looks for) comes last, after its normalisation statistics and replay buffer."""
    from stable_baselines3.common.callbacks import CheckpointCallback

    class AtomicCheckpoint(CheckpointCallback):
        def _on_step(self) -> bool:
            if self.n_calls % self.save_freq == 0:
                def write(path: str, save: Callable[[str], Any]) -> None:
                    part = f"{path}.part"
                    save(part)
                    os.replace(part, path)

                if self.save_replay_buffer and getattr(self.model, "replay_buffer", None) is not None:
                    write(self._checkpoint_path("replay_buffer_", extension="pkl"), self.model.save_replay_buffer)
                vec_normalize = self.model.get_vec_normalize_env()
                if self.save_vecnormalize and vec_normalize is not None:
                    write(self._checkpoint_path("vecnormalize_", extension="pkl"), vec_normalize.save)
                write(self._checkpoint_path(extension="zip"), self.model.save)
            return True

    return AtomicCheckpoint(save_freq=save_freq, save_path=str(save_path), name_prefix="ckpt",
                            save_vecnormalize=save_vecnormalize, save_replay_buffer=save_replay_buffer)


def train_policy(env_id: str, algo: str, *, timesteps: int, seed: int, hyperparams: dict[str, Any] | None = None,
                 env_kwargs: dict[str, Any] | None = None, out_dir: str | Path | None = None,
                 eval_every: int = 0, on_eval: Callable[[int, float], bool] | None = None,
                 n_eval_episodes: int = 4, checkpoint_every: int = 0, resume: bool = False,
                 progress: bool = False, tensorboard: bool = True, verbose: int = 0) -> TrainResult:
    """Train one scheduler and save it in ``out_dir`` (see the module docstring).

    Args:
        env_id: a registered ndpsched env id.
        algo: 'ppo', 'a2c', 'dqn' (Discrete actions only) or 'maskable_ppo'.
        timesteps: total environment steps (windows) of training.
        seed: seeds the model, the envs' episode draws and SB3's sampling.
        hyperparams: updates of the shipped defaults (SB3 arguments, ``n_envs``, ``normalize``,
            ``env_kwargs``).
        env_kwargs: environment arguments (model, dimms, preset, ...); the training pool's
            ``trace_seed`` is set unless given.
        eval_every: evaluate on the validation pool every this many steps (0: only at the end);
            ``on_eval(timesteps_done, mean_return)`` returning True stops the run (pruned).
        checkpoint_every: save a checkpoint every this many steps (0: none) under
            ``out_dir/checkpoints``; ``resume=True`` continues from the newest one.
    """
    import gymnasium as gym
    import torch
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    import ndpsched.envs  # noqa: F401  (registers the ids)

    from .envs.evaluate import evaluate

    if not isinstance(timesteps, int) or timesteps <= 0:
        raise ConfigError(f"timesteps must be a positive integer, got {timesteps!r}")
    if env_id not in gym.registry:
        raise unknown_name("environment", env_id, [k for k in gym.registry if k.startswith("ndpsched/")])
    cls = algorithm_class(algo)
    hp = default_hyperparams(env_id, algo)
    for key, value in (hyperparams or {}).items():
        if key == "env_kwargs" and isinstance(value, dict):
            hp["env_kwargs"] = {**hp.get("env_kwargs", {}), **value}
        else:
            hp[key] = value
    n_envs = int(hp.pop("n_envs", 1))
    normalize = hp.pop("normalize", False)
    policy = hp.pop("policy", "MlpPolicy")
    kw = {"trace_seed": TRAIN_TRACE_SEED, **hp.pop("env_kwargs", {}), **(env_kwargs or {})}
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{env_id.split('/')[-1]}-{algo}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)

    # same seed, same model: one thread, deterministic torch ops
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=kw, vec_env_cls=DummyVecEnv)
    if algo == "dqn" and not isinstance(venv.action_space, gym.spaces.Discrete):
        raise ConfigError(f"DQN needs a Discrete action space; {env_id} has {venv.action_space} "
                          "(use ppo, a2c or maskable_ppo)")
    _check_hyperparams(cls, hp, algo)
    if normalize:
        opts = {} if normalize is True else dict(normalize)
        venv = VecNormalize(venv, gamma=hp.get("gamma", 0.99), **opts)

    ckpt_dir = out / "checkpoints"
    last = _last_checkpoint(ckpt_dir) if resume else None
    if last is not None:
        model = cls.load(last[1], env=venv, device="cpu")
        vn_path = ckpt_dir / f"ckpt_vecnormalize_{last[0]}_steps.pkl"
        if normalize and vn_path.is_file():
            venv = VecNormalize.load(str(vn_path), venv.venv)
            model.set_env(venv)
        buffer_path = ckpt_dir / f"ckpt_replay_buffer_{last[0]}_steps.pkl"
        if hasattr(model, "load_replay_buffer") and buffer_path.is_file():
            model.load_replay_buffer(buffer_path)
    else:
        try:
            model = cls(policy, venv, seed=seed, device="cpu", verbose=verbose,
                        tensorboard_log=str(out / "tb") if tensorboard else None, **hp)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{algo} hyperparameters: {exc}") from None

    eval_env = gym.make(env_id, **{**kw, "trace_seed": VALIDATION_TRACE_SEED})

    def validation_score() -> float:
        transform = None
        if isinstance(venv, VecNormalize):
            from .artifact import obs_normalizer

            transform = obs_normalizer(venv)
        res = evaluate(model, env_id, n_episodes=n_eval_episodes, seed=0, env=eval_env, obs_transform=transform)
        return res["return"]

    evaluations: list[tuple[int, float]] = []

    class EvalHook(BaseCallback):
        """Validation every ``eval_every`` steps; ``on_eval`` may stop the run (pruning)."""

        def __init__(self) -> None:
            super().__init__()
            self.next_at = model.num_timesteps + eval_every
            self.stopped = False

        def _on_step(self) -> bool:
            if eval_every and self.num_timesteps >= self.next_at:
                self.next_at += eval_every
                score = validation_score()
                evaluations.append((self.num_timesteps, score))
                if on_eval is not None and on_eval(self.num_timesteps, score):
                    self.stopped = True
                    return False
            return True

    hook = EvalHook()
    callbacks: list[BaseCallback] = [hook]
    if checkpoint_every:
        callbacks.append(_checkpoint_callback(max(checkpoint_every // n_envs, 1), ckpt_dir, bool(normalize),
                                              hasattr(model, "replay_buffer")))
    remaining = timesteps - model.num_timesteps
    t0 = time.perf_counter()
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=CallbackList(callbacks), progress_bar=progress,
                    reset_num_timesteps=last is None, tb_log_name=algo)
    score = validation_score()
    env0 = (venv.venv if isinstance(venv, VecNormalize) else venv).envs[0].unwrapped
    n_dimms = env0.sim.hw.n_dimms
    meta = {
        "algo": algo, "env_id": env_id, "seed": seed, "timesteps": int(model.num_timesteps),
        "controlled": list(env0.controlled),
        "policies": {role: {"name": getattr(env0.config, role).name, "params": dict(getattr(env0.config, role).params)}
                     for role in env0.controlled},
        "env_kwargs": kw, "n_dimms": int(n_dimms), "with_candidates": bool(env0.with_candidates),
        "window_tokens": int(env0.config.window_tokens), "feature_names": list(env0.feature_names),
        "hyperparams": {**hp, "n_envs": n_envs, "normalize": normalize, "policy": policy},
        "validation_return": score, "trace_seeds": {"train": kw["trace_seed"], "validation": VALIDATION_TRACE_SEED},
    }
    save_artifact(out, model, venv if isinstance(venv, VecNormalize) else None, _plain(meta))
    venv.close()
    eval_env.close()
    return TrainResult(env_id, algo, seed, int(model.num_timesteps), str(out), score,
                       time.perf_counter() - t0, evaluations, hook.stopped)


def _plain(value: Any) -> Any:
    """YAML-safe copy (tuples -> lists, numpy scalars -> Python)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def parse_seeds(text: str) -> list[int]:
    """'3' -> [3]; '0-7' -> [0..7]; '1,4,9' -> [1, 4, 9]."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(f"seeds must look like '3', '0-7' or '1,4,9', got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def train_seeds(seeds: list[int], env_id: str, algo: str, *, out_dir: str | Path, address: str | None = None,
                num_cpus: int | None = None, show_progress: bool = True, **kwargs: Any) -> list[TrainResult]:
    """One training run per seed as Ray tasks (local Ray by default, a cluster with ``address``);
    run ``s`` writes ``out_dir/seed_s``. A task whose worker dies is retried once."""
    import ray

    from .ray_session import init_ray

    started = init_ray(num_cpus, address)

    @ray.remote(num_cpus=1, max_retries=1)
    def one(seed: int) -> dict[str, Any]:
        import os

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return train_policy(env_id, algo, seed=seed, out_dir=Path(out_dir) / f"seed_{seed}", **kwargs).to_dict()

    refs = [one.remote(s) for s in seeds]
    from tqdm import tqdm

    results = []
    with tqdm(total=len(refs), desc=f"train {algo} x {len(refs)} seeds", unit="run", leave=False,
              disable=not show_progress) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
        results = [TrainResult(**{**r, "evaluations": [tuple(e) for e in r["evaluations"]]}) for r in ray.get(refs)]
    if started:
        ray.shutdown()
    return results

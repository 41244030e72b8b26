"""The on-disk form of a trained scheduler, shared by ``ndpsched train`` (writer) and the
learned policies ``rl:DIR`` (reader).

A directory holding:

- ``model.zip``: the Stable-Baselines3 model;
- ``vecnormalize.pkl``: observation-normalisation statistics, when training normalised them
  (a policy must see observations scaled as in training);
- ``policy.yaml``: what the model acts on: algorithm, env id and env keyword arguments
  (roles, base heuristics, knob grids, history), the DIMM count and feature names, and how it
  was trained (seed, timesteps, hyperparameters).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from .errors import ConfigError

MODEL_FILE = "model.zip"
NORMALIZE_FILE = "vecnormalize.pkl"
META_FILE = "policy.yaml"

#: algorithm name -> (module, class); sb3-contrib's MaskablePPO reads the env's action masks
ALGORITHMS = {
    "ppo": ("stable_baselines3", "PPO"),
    "a2c": ("stable_baselines3", "A2C"),
    "dqn": ("stable_baselines3", "DQN"),
    "maskable_ppo": ("sb3_contrib", "MaskablePPO"),
}


def algorithm_class(algo: str):
    """The SB3 class of an algorithm name (imported on demand)."""
    import importlib

    from .errors import unknown_name

    if algo not in ALGORITHMS:
        raise unknown_name("algorithm", algo, ALGORITHMS)
    module, cls = ALGORITHMS[algo]
    return getattr(importlib.import_module(module), cls)


@dataclass
class TrainedScheduler:
    """A loaded artifact: ``act(obs, masks)`` returns the model's action."""

    model: Any
    meta: dict[str, Any]
    normalize: Callable[[np.ndarray], np.ndarray] | None

    @property
    def masked(self) -> bool:
        return self.meta["algo"] == "maskable_ppo"

    def act(self, obs: np.ndarray, masks: np.ndarray | None = None, deterministic: bool = True):
        x = self.normalize(obs) if self.normalize is not None else obs
        if self.masked:
            action, _ = self.model.predict(x, deterministic=deterministic, action_masks=masks)
        else:
            action, _ = self.model.predict(x, deterministic=deterministic)
        return action


def obs_normalizer(vecnormalize) -> Callable[[np.ndarray], np.ndarray] | None:
    """The observation transform of a (loaded) VecNormalize, frozen; None when it does not
    normalise observations."""
    if vecnormalize is None or not vecnormalize.norm_obs:
        return None
    rms, eps, clip = vecnormalize.obs_rms, vecnormalize.epsilon, vecnormalize.clip_obs
    mean, std = rms.mean.copy(), np.sqrt(rms.var + eps)

    def normalize(obs: np.ndarray) -> np.ndarray:
        return np.clip((obs - mean) / std, -clip, clip).astype(np.float32)

    return normalize


def save_artifact(out_dir: str | Path, model, vecnormalize, meta: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    if vecnormalize is not None:
        vecnormalize.save(str(out / NORMALIZE_FILE))
    (out / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    return out


#: trained schedulers shipped in the package, usable by name (``rl:dimm-balance-ppo``)
SHIPPED_DIR = Path(__file__).parent / "data" / "trained"


def resolve(path: str | Path) -> Path:
    """A directory, or the name of a scheduler shipped with ndpsched."""
    root = Path(path)
    if not root.is_dir() and (SHIPPED_DIR / str(path)).is_dir():
        return SHIPPED_DIR / str(path)
    return root


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / META_FILE).is_file()) if SHIPPED_DIR.is_dir() else []


def read_meta(path: str | Path) -> dict[str, Any]:
    """The artifact's ``policy.yaml``, or a one-line error naming what is missing."""
    root = resolve(path)
    if not root.is_dir():
        from .errors import unknown_name

        if not any(sep in str(path) for sep in "/\\") and shipped_names():
            raise unknown_name("trained scheduler (a directory or a shipped name)", str(path), shipped_names())
        raise ConfigError(f"trained scheduler '{path}' is not a directory (expected the --out of ndpsched train)")
    meta_path = root / META_FILE
    if not meta_path.is_file() or not (root / MODEL_FILE).is_file():
        raise ConfigError(f"'{path}' holds no trained scheduler: {META_FILE} and {MODEL_FILE} are needed "
                          "(written by ndpsched train)")
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{meta_path}' is corrupt: {str(exc).splitlines()[0]}") from None
    if not isinstance(meta, dict) or not {"algo", "env_id", "env_kwargs"} <= set(meta):
        raise ConfigError(f"'{meta_path}' is not a trained-scheduler description (needs algo, env_id, env_kwargs)")
    return meta


def load_artifact(path: str | Path) -> TrainedScheduler:
    """Load a trained scheduler on CPU."""
    meta = read_meta(path)
    root = resolve(path)
    cls = algorithm_class(meta["algo"])
    try:
        model = cls.load(root / MODEL_FILE, device="cpu")
    except Exception as exc:  # a truncated or foreign zip
        raise ConfigError(f"'{root / MODEL_FILE}' could not be loaded as {meta['algo']}: {exc}") from None
    normalize = None
    if (root / NORMALIZE_FILE).is_file():
        try:
            with open(root / NORMALIZE_FILE, "rb") as fh:
                normalize = obs_normalizer(pickle.load(fh))
        except Exception as exc:
            raise ConfigError(f"'{root / NORMALIZE_FILE}' is corrupt: {exc}") from None
    return TrainedScheduler(model, meta, normalize)

"""Training RL schedulers: real (small) SB3 runs on the tiny preset, determinism, resume after a
kill, learned policies inside the simulator, the leaderboard, and bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
pytest.importorskip("sb3_contrib")

from ndpsched.errors import ConfigError, NdpschedError  # noqa: E402
from ndpsched.train import parse_seeds, train_policy  # noqa: E402

pytestmark = pytest.mark.rl

TINY = {"preset": "tiny"}
#: small but real: 2 envs x 64 steps per PPO update
SMALL_HP = {"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 4}


def _train(tmp: Path, name: str, env_id="ndpsched/DimmBalance-v0", algo="ppo", timesteps=256, seed=0, **kw):
    return train_policy(env_id, algo, timesteps=timesteps, seed=seed, hyperparams=kw.pop("hp", SMALL_HP),
                        env_kwargs=TINY, out_dir=tmp / name, tensorboard=False, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    return _train(tmp, "ppo", timesteps=512)


def _params(path: Path) -> list[np.ndarray]:
    from stable_baselines3 import PPO

    model = PPO.load(path / "model.zip", device="cpu")
    return [p.detach().numpy().copy() for p in model.policy.parameters()]


def test_artifact_is_complete(trained):
    out = Path(trained.out_dir)
    assert {"model.zip", "policy.yaml", "vecnormalize.pkl"} <= {p.name for p in out.iterdir()}
    import yaml

    meta = yaml.safe_load((out / "policy.yaml").read_text())
    assert meta["controlled"] == ["balancer"] and meta["policies"]["balancer"]["name"] == "hermes.window"
    assert meta["timesteps"] == trained.timesteps == 512 and meta["n_dimms"] == 4


def test_same_seed_same_model(tmp_path):
    a = _train(tmp_path, "a", seed=3)
    b = _train(tmp_path, "b", seed=3)
    c = _train(tmp_path, "c", seed=4)
    pa, pb, pc = _params(Path(a.out_dir)), _params(Path(b.out_dir)), _params(Path(c.out_dir))
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert not all(np.array_equal(x, y) for x, y in zip(pa, pc))
    assert a.score == b.score


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    first = _train(tmp_path, "r", timesteps=256, checkpoint_every=128)
    ckpts = sorted(p.name for p in (Path(first.out_dir) / "checkpoints").glob("ckpt_*_steps.zip"))
    assert ckpts == ["ckpt_128_steps.zip", "ckpt_256_steps.zip"]
    again = _train(tmp_path, "r", timesteps=512, checkpoint_every=128, resume=True)
    assert again.timesteps == 512
    assert (Path(again.out_dir) / "checkpoints" / "ckpt_512_steps.zip").is_file()


def test_learned_balancer_runs_in_the_simulator_exactly_as_in_the_env(trained):
    """``--balancer rl:DIR`` rebuilds the env's observation inside the simulator: same actions,
    same per-token latencies as the env episode."""
    import gymnasium as gym

    import ndpsched.envs  # noqa: F401
    from ndpsched.artifact import load_artifact
    from ndpsched.config import PolicySpec
    from ndpsched.run import build_simulator

    agent = load_artifact(trained.out_dir)
    env = gym.make("ndpsched/DimmBalance-v0", **TINY, trace_seed=1000).unwrapped
    obs, _ = env.reset(options={"seqs": [1]})
    while True:
        obs, _, terminated, _, _ = env.step(agent.act(obs, env.action_masks()))
        if terminated:
            break
    in_env = env.episode_result()
    import dataclasses

    cfg = dataclasses.replace(env.config, balancer=PolicySpec(f"rl:{trained.out_dir}"))
    sim = build_simulator(cfg, env.sim.trace)
    in_sim = sim.run(seqs=[1], initial=env._initial)
    assert np.array_equal(in_env.token_s, in_sim.token_s)
    assert in_env.moves == in_sim.moves


def test_simulate_cli_runs_a_learned_balancer(trained):
    out = subprocess.run([sys.executable, "-m", "ndpsched", "simulate", "--model", "tiny", "--gpu", "tiny-gpu",
                          "--dimms", "4", "--prompt-len", "16", "--gen-len", "40", "--system", "hermes-offline",
                          "--balancer", f"rl:{trained.out_dir}", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout)["config"]["balancer"]["name"] == "rl"
    bad = subprocess.run([sys.executable, "-m", "ndpsched", "simulate", "--model", "tiny", "--dimms", "2",
                          "--balancer", f"rl:{trained.out_dir}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "trained with 4 DIMMs" in bad.stderr and bad.stderr.count("\n") == 1


def test_evaluate_cli_writes_the_leaderboard(trained, tmp_path):
    out = subprocess.run([sys.executable, "-m", "ndpsched", "evaluate", "--preset", "tiny", "--models", "tiny",
                          "--traces", "skew", "--episodes", "2", "--out", str(tmp_path / "lb"),
                          "--policies", f"hermes,no-move,oracle,rl:{trained.out_dir}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    csv_text = (tmp_path / "lb" / "leaderboard.csv").read_text()
    assert csv_text.count("\n") == 5 and "vs_hermes_pct" in csv_text
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "| tiny/skew/seed1000 | oracle |" in md


def test_maskable_ppo_trains_on_the_two_role_env(tmp_path):
    r = _train(tmp_path, "mask", env_id="ndpsched/Schedule-v0", algo="maskable_ppo", timesteps=128)
    assert r.timesteps == 128 and Path(r.out_dir, "model.zip").is_file()


def test_dqn_trains_on_a_discrete_env(tmp_path):
    r = _train(tmp_path, "dqn", algo="dqn", timesteps=200,
               hp={"learning_starts": 50, "buffer_size": 1000, "n_envs": 1})
    assert r.timesteps == 200


def test_eval_hook_reports_and_can_stop_a_run(tmp_path):
    seen = []

    def stop_after_first(steps, score):
        seen.append((steps, score))
        return True

    r = _train(tmp_path, "pruned", timesteps=512, eval_every=128, on_eval=stop_after_first)
    assert r.stopped_early and len(seen) == 1 and seen[0][0] >= 128 and r.timesteps < 512


@pytest.mark.parametrize("kwargs, match", [
    ({"algo": "dqn", "env_id": "ndpsched/Schedule-v0"}, "DQN needs a Discrete action space"),
    ({"algo": "ppoo"}, "Did you mean 'ppo'"),
    ({"hp": {"learning_rat": 0.1}}, "Did you mean 'learning_rate'"),
    ({"env_id": "ndpsched/DimBalance-v0"}, "Did you mean 'ndpsched/DimmBalance-v0'"),
])
def test_bad_training_input_is_one_clear_line(tmp_path, kwargs, match):
    with pytest.raises(NdpschedError, match=match) as err:
        _train(tmp_path, "bad", **kwargs)
    assert "\n" not in str(err.value)


def test_missing_or_corrupt_artifact_is_named(tmp_path):
    from ndpsched.artifact import load_artifact

    with pytest.raises(ConfigError, match="not a directory"):
        load_artifact(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "policy.yaml").write_text("algo: ppo\nenv_id: x\nenv_kwargs: {}\n")
    (tmp_path / "broken" / "model.zip").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_artifact(tmp_path / "broken")


def test_last_checkpoint_passes_over_a_half_written_one(tmp_path):
    import zipfile

    from ndpsched.train import _last_checkpoint
    with zipfile.ZipFile(tmp_path / "ckpt_256_steps.zip", "w") as z:
        z.writestr("data", "{}")
    (tmp_path / "ckpt_512_steps.zip").write_bytes(b"PK\x03\x04 cut short")   # a kill mid-write
    (tmp_path / "ckpt_768_steps.zip.part").write_bytes(b"")                     # an unfinished atomic write
    assert _last_checkpoint(tmp_path) == (256, tmp_path / "ckpt_256_steps.zip")
    assert _last_checkpoint(tmp_path / "none") is None


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("1,5") == [1, 5] and parse_seeds("7") == [7]
    with pytest.raises(ConfigError):
        parse_seeds("a-b")


@pytest.mark.slow
def test_learned_balancer_beats_random_on_held_out_seeds(tmp_path):
    """CI's real training run: a few thousand steps of PPO on the tiny preset, judged on a
    held-out trace pool against uniformly random knob settings (same episodes, paired)."""
    from ndpsched.artifact import load_artifact
    from ndpsched.envs.evaluate import RandomAgent, evaluate

    r = _train(tmp_path, "ci", timesteps=4096, hp={"n_envs": 4, "n_steps": 128, "batch_size": 128})
    agent = load_artifact(r.out_dir)
    kw = dict(env_id="ndpsched/DimmBalance-v0", n_episodes=8, seed=0, env_kwargs={**TINY, "trace_seed": 1000})
    learned = evaluate(agent.model, obs_transform=agent.normalize, **kw)
    random = evaluate(RandomAgent(seed=0), **kw)
    assert learned["tokens_per_s"] > random["tokens_per_s"]
    assert learned["return"] > random["return"]


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ndpsched", "train", "--preset", "tiny", "--timesteps", "100000",
           "--checkpoint-every", "256", "--out", str(out), "--no-progress", "--n-envs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    ckpt_dir = out / "checkpoints"
    while time.time() < deadline and not list(ckpt_dir.glob("ckpt_*_steps.zip")):
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("ckpt_*_steps.zip"))
    assert saved, "no checkpoint was written before the kill"
    resume = subprocess.run(cmd[:cmd.index("100000")] + [str(saved[-1] + 256)] + cmd[cmd.index("100000") + 1:]
                            + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    assert f"{saved[-1] + 256} steps" in resume.stdout


@pytest.mark.slow
def test_seeds_train_in_parallel_with_ray(tmp_path):
    from ndpsched.train import train_seeds

    results = train_seeds([0, 1], "ndpsched/DimmBalance-v0", "ppo", out_dir=tmp_path / "multi", num_cpus=2,
                          timesteps=128, hyperparams=SMALL_HP, env_kwargs=TINY, tensorboard=False)
    assert [r.seed for r in results] == [0, 1]
    assert all((tmp_path / "multi" / f"seed_{s}" / "model.zip").is_file() for s in (0, 1))


def test_shipped_schedulers_load_by_name_and_run():
    """The trained models in ndpsched/data/trained run as policies by name, on another model."""
    from ndpsched.artifact import shipped_names
    from ndpsched.config import RunConfig
    from ndpsched.run import simulate

    assert {"dimm-balance-ppo", "hot-cold-ppo"} <= set(shipped_names())
    cfg = RunConfig(model="smollm2-135m", system="hermes", predictor="oracle", balancer="rl:dimm-balance-ppo",
                    partition="rl:hot-cold-ppo", prompt_len=16, gen_len=20)
    result = simulate(cfg)
    assert result.tokens_per_s > 0
    assert result.config["balancer"]["trained"]["env_id"] == "ndpsched/DimmBalance-v0"
    assert result.config["partition"]["base"]["name"] == "hermes.adjust"


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    """examples/train_balancer.py from top to bottom (tiny preset, a few thousand steps)."""
    script = Path(__file__).resolve().parents[1] / "examples" / "train_balancer.py"
    out = subprocess.run([sys.executable, str(script), "--timesteps", "1024", "--episodes", "2",
                          "--out", str(tmp_path / "ex")], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    for name in ("hermes (Algorithm 1)", "learned (PPO)", "hindsight oracle"):
        assert name in out.stdout

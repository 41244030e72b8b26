"""``ndpsched evaluate``: heuristic, learned and oracle schedulers on held-out traces, one table.

Every policy runs through :func:`ndpsched.envs.evaluate.evaluate` on the same episodes (same
held-out trace pool, same episode seeds), so per-episode differences are paired: the margin
over the reference heuristic (Hermes' by default) is the mean of per-episode relative
differences with its 95 % confidence interval (Student t over episodes).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .train import HELD_OUT_TRACE_SEED

#: policy names understood besides registered heuristics of the controlled role and rl:DIR
SPECIAL_POLICIES = ("hermes", "no-move", "random", "oracle")
#: env arguments a trained model brings to its evaluation (they shape its spaces or its roles)
AGENT_ENV_KEYS = ("knobs", "history", "window_tokens", "partition", "predictor", "balancer",
                  "partition_params", "predictor_params", "balancer_params")


@dataclass
class TestSet:
    """A held-out trace pool: model, trace source, pool seed."""

    model: str
    trace: str
    trace_seed: int = HELD_OUT_TRACE_SEED

    @property
    def label(self) -> str:
        return f"{self.model}/{self.trace}/seed{self.trace_seed}"


def make_agent(spec: str, env_id: str, seed: int = 0):
    """(agent, env kwargs, obs transform) for a policy spec (see :data:`SPECIAL_POLICIES`)."""
    from .envs.evaluate import FixedAgent, HeuristicAgent, RandomAgent

    if spec == "hermes":
        return HeuristicAgent(name="hermes"), {}, None
    if spec == "no-move":
        return FixedAgent(0 if env_id != "ndpsched/Schedule-v0" else np.array([0, 0])), {}, None
    if spec == "random":
        return RandomAgent(seed=seed), {}, None
    if spec == "oracle":
        if env_id != "ndpsched/DimmBalance-v0":
            raise ConfigError("the hindsight oracle balances DIMMs: it applies to ndpsched/DimmBalance-v0 only")
        return HeuristicAgent({"balancer": "oracle.lpt"}, name="oracle"), {}, None
    if spec.startswith("rl:"):
        from .artifact import load_artifact

        trained = load_artifact(spec[3:])
        if trained.meta["env_id"] != env_id:
            raise ConfigError(f"'{spec[3:]}' was trained on {trained.meta['env_id']}, not {env_id}")
        model = trained.model
        model.name = f"rl:{Path(spec[3:]).name}"
        # what defines the model's observation and action spaces travels with it; the machine,
        # workload and traces are the leaderboard's, the same for every policy
        env_kw = {k: v for k, v in trained.meta["env_kwargs"].items() if k in AGENT_ENV_KEYS}
        return model, env_kw, trained.normalize
    from .registry import registry

    role = "balancer" if env_id == "ndpsched/DimmBalance-v0" else "partition"
    if spec in registry(role):
        return HeuristicAgent({role: spec}), {}, None
    from .errors import unknown_name

    raise unknown_name(f"policy for {env_id}", spec, [*SPECIAL_POLICIES, "rl:DIR", *registry(role).names()])


def run_leaderboard(env_id: str, policies: list[str], test_sets: list[TestSet], episodes: int = 5,
                    reference: str = "hermes", env_kwargs: dict[str, Any] | None = None,
                    out_dir: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every policy on every test set; write ``leaderboard.csv`` and ``leaderboard.md``
    into ``out_dir`` when given. Returns the rows."""
    from .envs.evaluate import ci95_half_width, evaluate

    if reference not in policies:
        policies = [reference, *policies]
    groups = {spec: expand_seeds(spec) for spec in policies}
    policies = [one for spec in policies for one in groups[spec]]
    rows: list[dict[str, Any]] = []
    jobs = [(ts, p) for ts in test_sets for p in policies]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="evaluate", unit="run", leave=False)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for ts, spec in jobs:
        agent, agent_kw, transform = make_agent(spec, env_id)
        kw = {**(env_kwargs or {}), **agent_kw, "model": ts.model, "trace": ts.trace, "trace_seed": ts.trace_seed}
        res = evaluate(agent, env_id, n_episodes=episodes, seed=0, env_kwargs=kw, obs_transform=transform)
        results[(ts.label, spec)] = res
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for ts in test_sets:
        ref = np.asarray(results[(ts.label, reference)]["per_episode"]["tokens_per_s"])
        best_tps = max(results[(ts.label, p)]["tokens_per_s"] for p in policies)
        for spec in policies:
            res = results[(ts.label, spec)]
            tps = np.asarray(res["per_episode"]["tokens_per_s"])
            gain = tps / ref - 1.0
            rows.append({
                "test_set": ts.label, "policy": spec,
                "tokens_per_s": res["tokens_per_s"], "tokens_per_s_ci95": res["tokens_per_s_ci95"],
                f"vs_{reference}_pct": 100.0 * float(gain.mean()),
                f"vs_{reference}_ci95_pct": 100.0 * ci95_half_width(gain),
                "of_best_pct": 100.0 * res["tokens_per_s"] / best_tps,
                "dimm_imbalance": res["dimm_imbalance"], "bytes_migrated": res["bytes_migrated"],
                "return": res["return"], "episodes": episodes, "kind": "policy",
            })
        for spec, members in groups.items():
            if len(members) > 1:
                rows.extend(_seed_rows(spec, members, ts, results, ref, reference, episodes))
    if out_dir is not None:
        write_leaderboard(rows, Path(out_dir), reference)
    return rows


def expand_seeds(spec: str) -> list[str]:
    """``rl:DIR`` where DIR holds ``seed_*`` runs (``ndpsched train --seeds``) -> one spec per seed."""
    if not spec.startswith("rl:"):
        return [spec]
    root = Path(spec[3:])
    seeds = sorted((p for p in root.glob("seed_*") if (p / "policy.yaml").is_file()),
                   key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else 0)
    if (root / "policy.yaml").is_file() or not seeds:
        return [spec]
    return [f"rl:{p}" for p in seeds]


def _seed_rows(spec, members, ts, results, ref, reference, episodes) -> list[dict[str, Any]]:
    """Rows summarising a multi-seed run: mean over seeds with the 95 % interval over seeds, and
    the seed with the best *validation* return (chosen without looking at held-out traces)."""
    import yaml

    from .envs.evaluate import ci95_half_width

    per_seed_tps = np.array([results[(ts.label, m)]["tokens_per_s"] for m in members])
    per_seed_gain = np.array([np.mean(np.asarray(results[(ts.label, m)]["per_episode"]["tokens_per_s"]) / ref - 1.0)
                              for m in members])
    best = max(members, key=lambda m: yaml.safe_load(Path(m[3:], "policy.yaml").read_text()).get("validation_return", -np.inf))
    out = []
    for label, chosen in ((f"{spec} ({len(members)} seeds)", members), (f"{spec} (best validation: {Path(best[3:]).name})", [best])):
        idx = [members.index(m) for m in chosen]
        res = [results[(ts.label, m)] for m in chosen]
        out.append({
            "test_set": ts.label, "policy": label,
            "tokens_per_s": float(per_seed_tps[idx].mean()),
            "tokens_per_s_ci95": ci95_half_width(per_seed_tps[idx]) if len(idx) > 1 else res[0]["tokens_per_s_ci95"],
            f"vs_{reference}_pct": 100.0 * float(per_seed_gain[idx].mean()),
            f"vs_{reference}_ci95_pct": 100.0 * (ci95_half_width(per_seed_gain[idx]) if len(idx) > 1 else ci95_half_width(
                np.asarray(res[0]["per_episode"]["tokens_per_s"]) / ref - 1.0)),
            "of_best_pct": float("nan"),
            "dimm_imbalance": float(np.mean([r["dimm_imbalance"] for r in res])),
            "bytes_migrated": float(np.mean([r["bytes_migrated"] for r in res])),
            "return": float(np.mean([r["return"] for r in res])), "episodes": episodes,
            "kind": "seeds" if len(idx) > 1 else "best-validation-seed",
        })
    return out


def markdown_table(rows: list[dict[str, Any]], reference: str = "hermes") -> str:
    head = ("| test set | policy | tokens/s | vs " + reference + " | DIMM imbalance | bytes migrated | return |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    summarised = any(r["kind"] == "seeds" for r in rows)
    for r in rows:
        if summarised and r["kind"] == "policy" and r["policy"].startswith("rl:") and "/seed_" in r["policy"]:
            continue                          # per-seed rows stay in the CSV; the table shows the summary
        lines.append(
            f"| {r['test_set']} | {r['policy']} | {r['tokens_per_s']:.2f} ± {r['tokens_per_s_ci95']:.2f} | "
            f"{r[f'vs_{reference}_pct']:+.2f}% ± {r[f'vs_{reference}_ci95_pct']:.2f} | {r['dimm_imbalance']:.4f} | "
            f"{r['bytes_migrated']:.3g} | {r['return']:.3f} |")
    return "\n".join(lines)


def write_leaderboard(rows: list[dict[str, Any]], out: Path, reference: str = "hermes") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "leaderboard.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "leaderboard.md").write_text(
        "Tokens/s are means over episodes ± the 95 % interval; 'vs' is the paired per-episode gain over "
        f"{reference} ± its 95 % interval.\n\n" + markdown_table(rows, reference) + "\n")


def parse_test_sets(models: str, traces: str, trace_seed: int = HELD_OUT_TRACE_SEED) -> list[TestSet]:
    return [TestSet(m, t, trace_seed) for m in models.split(",") if m for t in traces.split(",") if t]

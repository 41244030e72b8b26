"""Sweep throughput vs Ray workers: trials per minute and parallel efficiency.

Runs the same simulator-bound sweep (trace-mode ``hermes`` scheduling with a top-k partition, so
every trial is the decode loop, no ILP solver threads) with 1, 2, 4, ... workers on one local Ray
instance and prints a Markdown table. Ray starts once; a warm-up sweep first starts one worker
process per CPU and lets each draw (and cache) the trace, so the measured sweeps time trials, not
process start-up or trace generation.

    python scripts/sweep_scaling.py --workers 1,2,4,8,16 --trials-per-worker 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import ndpsched  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ndpsched.ray_session import WORKER_ENV
from ndpsched.sweep import run_sweep
from ndpsched.sweep_spec import parse_sweep


def spec_for(model: str, gen_len: int, n_trials: int, seed: int):
    return parse_sweep({
        "name": "scaling",
        "base": {"system": "hermes", "model": model, "gen_len": gen_len, "partition": {"name": "topk"}},
        "objective": {"kind": "simulate", "seeds": [0]},
        "space": {"predictor.params.lam": "float[4, 8]", "balancer.params.tolerance": "float[0.03, 0.08]"},
        "metrics": {"tokens_per_s": "max"},
        "sampler": {"name": "random", "seed": seed},
        "n_trials": n_trials,
    })


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8,16")
    ap.add_argument("--trials-per-worker", type=int, default=4)
    ap.add_argument("--model", default="relullama-7b")
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--pool-baseline", action="store_true",
                    help="also time the same trials in a plain multiprocessing pool (no Ray, no Optuna): "
                         "separates Ray overhead from the machine's own per-core slowdown under load")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    for key, value in WORKER_ENV.items():
        os.environ[key] = value
    import ray

    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV)})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_sweep(spec_for(args.model, args.gen_len, 2 * max(counts), 99), workers=max(counts),
                  out_dir=Path(tmp) / "warmup")
        print(f"warm-up ({2 * max(counts)} trials on {max(counts)} workers): {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        for w in counts:
            n = args.trials_per_worker * w
            res = run_sweep(spec_for(args.model, args.gen_len, n, w), workers=w, out_dir=Path(tmp) / f"w{w}")
            import optuna

            study = optuna.load_study(study_name="scaling", storage=f"sqlite:///{Path(tmp) / f'w{w}' / 'study.db'}")
            trials = study.get_trials(deepcopy=False)
            start = min(t.datetime_start for t in trials)
            end = max(t.datetime_complete for t in trials)
            span_s = (end - start).total_seconds()
            trial_s = statistics.mean(t.user_attrs.get("wall_s", float("nan")) for t in trials)
            rows.append((w, n, span_s, 60.0 * n / span_s, trial_s, res.n_failed))
            print(f"workers {w}: {n} trials in {span_s:.1f} s", file=sys.stderr)
    ray.shutdown()
    if args.pool_baseline:
        pool_rows = pool_baseline(args, counts)
    base = rows[0][3] / rows[0][0]
    print(f"model {args.model}, gen_len {args.gen_len}, {args.trials_per_worker} trials per worker, "
          f"{os.cpu_count()} CPUs")
    print("| workers | trials | span (s) | trials/min | mean trial (s) | speed-up | efficiency | failed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, n, span, tpm, trial_s, failed in rows:
        print(f"| {w} | {n} | {span:.1f} | {tpm:.1f} | {trial_s:.2f} | {tpm / (base):.2f} | "
              f"{100 * tpm / (w * base):.0f} % | {failed} |")
    if args.pool_baseline:
        pbase = pool_rows[0][2]
        print()
        print("plain multiprocessing pool, same trials (no Ray, no Optuna):")
        print("| workers | trials | span (s) | trials/min | mean trial (s) | efficiency |")
        print("|---:|---:|---:|---:|---:|---:|")
        for w, n, tpm, span, trial_s in pool_rows:
            print(f"| {w} | {n} | {span:.1f} | {tpm:.1f} | {trial_s:.2f} | {100 * tpm / (w * pbase):.0f} % |")
    return 0


def _pool_trial(args_tuple):
    payload, params = args_tuple
    from ndpsched.sweep_objectives import limit_threads, simulate_objective

    limit_threads()
    t0 = time.perf_counter()
    simulate_objective(payload, params)
    return time.perf_counter() - t0


def pool_baseline(args, counts):
    """The same simulate trials in a multiprocessing pool: (workers, trials, trials/min, span, mean trial)."""
    import multiprocessing as mp

    import numpy as np

    rows = []
    spec = spec_for(args.model, args.gen_len, 1, 0)
    payload = spec.to_payload()
    rng = np.random.default_rng(0)
    ctx = mp.get_context("fork")
    with ctx.Pool(max(counts), maxtasksperchild=None) as pool:
        warm = [(payload, {"predictor.params.lam": 6.0})] * (2 * max(counts))
        pool.map(_pool_trial, warm, chunksize=1)          # every process draws and caches its trace
        for w in counts:
            n = args.trials_per_worker * w
            jobs = [(payload, {"predictor.params.lam": float(rng.uniform(4, 8)),
                               "balancer.params.tolerance": float(rng.uniform(0.03, 0.08))}) for _ in range(n)]
            # w concurrent trials: a semaphore-free way is w chunks of the pool's processes busy at once
            t0 = time.perf_counter()
            times = []
            it = iter(jobs)
            running = []
            for job in [next(it) for _ in range(w)]:
                running.append(pool.apply_async(_pool_trial, (job,)))
            for job in it:
                times.append(running.pop(0).get())
                running.append(pool.apply_async(_pool_trial, (job,)))
            times += [r.get() for r in running]
            span = time.perf_counter() - t0
            rows.append((w, n, 60.0 * n / span, span, statistics.mean(times)))
            print(f"pool {w}: {n} trials in {span:.1f} s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())

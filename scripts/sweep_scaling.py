"""Sweep throughput vs Ray workers: trials per minute and parallel efficiency.

Runs the same simulator-bound sweep (trace-mode ``hermes`` scheduling with a top-k partition, so
every trial is the decode loop, no ILP solver threads) with 1, 2, 4, ... workers on one local Ray
instance and prints a Markdown table. Ray starts once; a warm-up sweep first starts one worker
process per CPU and lets each draw (and cache) the trace, so the measured sweeps time trials, not
process start-up or trace generation. ``--rounds R`` times the whole series R times in turn (odd
rounds in reverse order, so a drift of the machine's speed does not favour one end); the table
gives each count's best round and, per round, its efficiency against that round's own baseline
(the median over rounds), with the machine's steal time. The "machine ceiling" column (off with
``--no-ceiling``; ``--ceiling-only`` runs it alone) shows how much of its speed a CPU-bound
pure-Python loop keeps with N copies running at once.

    python scripts/sweep_scaling.py --workers 1,2,4,8,16 --trials-per-worker 16 --rounds 3
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
from ndpsched.sweep import run_sweep, trial_metrics
from ndpsched.sweep_spec import parse_sweep


#: the trials timed: Hermes with its FSM predictor (the token-by-token path, random access over
#: ~10 MB of per-neuron tables) or with the ideal predictor (the whole-window path, which streams
#: the trace); both tune the window balancer, the first also the predictor's lambda
TRIALS = {
    "hermes": ({"predictor.params.lam": "float[4, 8]", "balancer.params.tolerance": "float[0.03, 0.08]"}, {}),
    "oracle": ({"balancer.params.move_fraction": "float[0.25, 1]", "balancer.params.tolerance": "float[0.03, 0.08]"},
               {"predictor": {"name": "oracle"}}),
}


def spec_for(model: str, gen_len: int, n_trials: int, seed: int, trial: str = "hermes"):
    space, base = TRIALS[trial]
    return parse_sweep({
        "name": "scaling",
        "base": {"system": "hermes", "model": model, "gen_len": gen_len, "partition": {"name": "topk"}, **base},
        "objective": {"kind": "simulate", "seeds": [0]},
        "space": space,
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
    ap.add_argument("--trial", choices=sorted(TRIALS), default="hermes", help="what every trial simulates")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the machine's own ceiling: N copies of a CPU-bound pure-Python loop (no Ray, no "
                         "numpy), whose per-copy slowdown bounds any parallel efficiency on this machine")
    ap.add_argument("--ceiling-s", type=float, default=0.3,
                    help="seconds each copy of the ceiling's loop runs (3 rounds below 2 s, else 1): "
                         "as long as a sweep round, it shows a sustained all-core load's clock limits")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the whole series of worker counts this many times, in turn, and keep each "
                         "count's best round (a shared machine's speed drifts between rounds)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default malloc settings in the workers (the reference for ndpsched's)")
    ap.add_argument("--ceiling-only", action="store_true",
                    help="only probe the machine: the ceiling for each worker count, with the machine's "
                         "busy/idle/steal shares during the probe (no Ray, no sweep)")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    ceiling_rounds = 3 if args.ceiling_s < 2 else 1
    if args.ceiling_only:
        before = cpu_times()
        ceiling = machine_ceiling(counts, args.ceiling_s, ceiling_rounds)
        shares = cpu_shares(before, cpu_times())
        print(f"{os.cpu_count()} CPUs, {args.ceiling_s:g} s per copy; "
              + ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items()))
        for w in counts:
            print(f"{w:3d} copies: {100 * ceiling[w]:.0f} % of the speed of one copy alone (timed just before)")
        return 0
    if args.default_malloc:            # the reference: glibc's default malloc settings in the workers
        os.environ["NDPSCHED_MALLOC"] = "default"
    worker_env = {k: v for k, v in WORKER_ENV.items() if not (args.default_malloc and k.startswith("MALLOC_"))}
    if args.default_malloc:
        worker_env["NDPSCHED_MALLOC"] = "default"
    for key, value in worker_env.items():
        os.environ[key] = value
    import ray

    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env})
    rows = []
    per_round: dict[tuple[int, int], float] = {}      # (round, workers) -> trials/min
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_sweep(spec_for(args.model, args.gen_len, 2 * max(counts), 99, args.trial), workers=max(counts),
                  out_dir=Path(tmp) / "warmup")
        print(f"warm-up ({2 * max(counts)} trials on {max(counts)} workers): {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        # odd rounds run the counts in reverse, so a drift of the machine's speed over the run
        # does not always favour the same end of the table
        for rnd, w in ((r, w) for r in range(args.rounds) for w in (counts if r % 2 == 0 else counts[::-1])):
            n = args.trials_per_worker * w
            out = Path(tmp) / f"r{rnd}w{w}"
            before = cpu_times()
            res = run_sweep(spec_for(args.model, args.gen_len, n, w + 100 * rnd, args.trial), workers=w, out_dir=out)
            shares = cpu_shares(before, cpu_times())
            import optuna

            study = optuna.load_study(study_name="scaling", storage=f"sqlite:///{out / 'study.db'}")
            trials = study.get_trials(deepcopy=False)
            start = min(t.datetime_start for t in trials)
            end = max(t.datetime_complete for t in trials)
            span_s = (end - start).total_seconds()
            trial_s = statistics.mean(trial_metrics(t).get("wall_s", float("nan")) for t in trials)
            rows.append((w, n, span_s, 60.0 * n / span_s, trial_s, res.n_failed, shares))
            per_round[rnd, w] = 60.0 * n / span_s
            print(f"round {rnd}, workers {w}: {n} trials in {span_s:.1f} s, {60.0 * n / span_s:.1f} trials/min"
                  + "".join(f", {k} {100 * v:.1f} %" for k, v in shares.items()), file=sys.stderr)
    ray.shutdown()
    rows = [max((r for r in rows if r[0] == w), key=lambda r: r[3]) for w in counts]   # best round per count
    if args.pool_baseline:
        pool_rows = pool_baseline(args, counts)
    ceiling = {} if args.no_ceiling else machine_ceiling(counts, args.ceiling_s, ceiling_rounds)
    base = rows[0][3] / rows[0][0]
    # each round's efficiency against that round's own baseline (minutes apart, not the best of
    # all rounds): the median over rounds is less at the mercy of one lucky or unlucky round
    paired = {w: statistics.median(per_round[r, w] / (w / counts[0] * per_round[r, counts[0]])
                                   for r in range(args.rounds)) for w in counts}
    print(f"trial {args.trial}, model {args.model}, gen_len {args.gen_len}, {args.trials_per_worker} trials per worker, "
          f"best of {args.rounds} round(s), {os.cpu_count()} CPUs, malloc {'glibc defaults' if args.default_malloc else 'ndpsched WORKER_ENV'}")
    extra = " machine ceiling |" if ceiling else ""
    print("| workers | trials | span (s) | trials/min | mean trial (s) | speed-up | efficiency | efficiency, "
          "median of rounds | failed | steal |" + extra)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ceiling else ""))
    for w, n, span, tpm, trial_s, failed, shares in rows:
        cell = f" {100 * ceiling[w]:.0f} % |" if ceiling else ""
        steal = f"{100 * shares['steal']:.1f} %" if shares else "n/a"
        print(f"| {w} | {n} | {span:.1f} | {tpm:.1f} | {trial_s:.2f} | {tpm / (base):.2f} | "
              f"{100 * tpm / (w * base):.0f} % | {100 * paired[w]:.0f} % | {failed} | {steal} |" + cell)
    print(f"\nefficiency: best round of N workers over N x the best round of {counts[0]}; median of rounds: "
          f"each round's N workers over N x that round's {counts[0]}, the median over the rounds")
    if ceiling:
        print(f"machine ceiling: speed of a CPU-bound pure-Python loop ({args.ceiling_s:g} s per copy) with N copies "
              "running at once over its speed alone: what this machine's cores keep of their speed "
              "when N are busy (clock boost, shared caches, the host), an upper bound of any efficiency")
    print("steal: share of the machine's CPU time during that round that the hypervisor gave to other guests")
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


def _spin(seconds: float) -> float:
    """Rate (loop passes per second) of a CPU-bound pure-Python loop run for ``seconds`` (no memory
    traffic, no numpy). Timed by duration, not by a fixed amount of work, so every copy of a batch
    runs the whole time and none finishes early and frees its core for the others."""
    t0 = time.perf_counter()
    passes, acc = 0, 0
    while time.perf_counter() - t0 < seconds:
        for i in range(10_000):
            acc += i * i
        passes += 1
    return passes / (time.perf_counter() - t0)


def machine_ceiling(counts: list[int], seconds: float = 0.3, rounds: int = 3) -> dict[int, float]:
    """Per worker count N: the loop's mean rate with N copies at once over its rate alone, the
    lone copy timed just before the N (a core's speed alone drifts by tens of % between minutes on
    a shared host, so a single lone figure for all N would carry its drift into every ratio). Each
    copy runs ``seconds``: long enough, a sustained all-core load shows clock limits that a short
    burst does not."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    ratio = {}
    with ctx.Pool(max(counts)) as pool:
        pool.map(_spin, [0.05] * max(counts), chunksize=1)          # warm the processes
        for w in counts:
            ratios = []
            for _ in range(rounds):
                alone = pool.apply(_spin, (seconds,))
                ratios.append(statistics.mean(pool.map(_spin, [seconds] * w, chunksize=1)) / alone)
            ratio[w] = statistics.median(ratios)
    return ratio


def cpu_times() -> list[int]:
    """Machine-wide CPU time counters from /proc/stat (user nice system idle iowait irq softirq
    steal), or [] where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def cpu_shares(before: list[int], after: list[int]) -> dict[str, float]:
    """Shares of the machine's CPU time between two :func:`cpu_times`: busy, idle and steal (time
    the hypervisor gave this VM's cores to others: a shared host)."""
    if not before or not after:
        return {}
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    return {"busy": (total - d[3] - d[4] - d[7]) / total, "idle": (d[3] + d[4]) / total, "steal": d[7] / total}


def _draw(space: dict[str, str], rng) -> dict[str, float]:
    """Parameters drawn uniformly from the trial's float ranges."""
    out = {}
    for key, text in space.items():
        lo, hi = (float(x) for x in text[len("float["):-1].split(","))
        out[key] = float(rng.uniform(lo, hi))
    return out


def pool_baseline(args, counts):
    """The same simulate trials in a multiprocessing pool of each size (no Ray, no Optuna; every
    process warmed first, trials handed out as processes free up): (workers, trials, trials/min,
    span, mean trial)."""
    import multiprocessing as mp

    import numpy as np

    rows = []
    spec = spec_for(args.model, args.gen_len, 1, 0, args.trial)
    space = TRIALS[args.trial][0]
    payload = spec.to_payload()
    rng = np.random.default_rng(0)
    ctx = mp.get_context("fork")
    for w in counts:
        with ctx.Pool(w) as pool:
            pool.map(_pool_trial, [(payload, _draw(space, rng)) for _ in range(2 * w)], chunksize=1)   # warm-up
            n = args.trials_per_worker * w
            jobs = [(payload, _draw(space, rng)) for _ in range(n)]
            t0 = time.perf_counter()
            times = list(pool.imap_unordered(_pool_trial, jobs, chunksize=1))
            span = time.perf_counter() - t0
        rows.append((w, n, 60.0 * n / span, span, statistics.mean(times)))
        print(f"pool {w}: {n} trials in {span:.1f} s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())

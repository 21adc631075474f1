"""Policy comparisons: replay one trace under several policies and request rates, on the real
engine or in the simulator, then print a table and draw the plots (`infercept replay`)."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import Callable, Sequence

from tqdm.auto import tqdm

from infercept_jax.config import ATTENTION_CHOICES, SWAP_TRANSFERS
from infercept_jax.engine import Engine
from infercept_jax.experiments.replay import replay, sample_arrivals
from infercept_jax.experiments.simulator import simulated_engine
from infercept_jax.experiments.workload import (DEFAULT_TOKENIZER, KINDS, ModelTokenizer, TraceRequest, generate_workload,
                                               load_trace, scale_tokens)
from scheduling.estimators import ESTIMATORS
from scheduling.lamps import LampsOptions
from scheduling.policies import HEURISTICS, POLICIES
from scheduling.profile import HardwareProfile, load_profile

DEFAULT_POLICIES = ("discard", "preserve", "swap", "infercept")
REAL_ENGINE_OPTIONS = ("dtype", "tensor_parallel_size", "attention", "swap_transfer", "async_scheduling")
SMALL_SCALE = 1 / 8   # builtin:*-small: token counts for a small model on a CPU


def builtin_trace(name: str) -> dict[str, TraceRequest]:
    """`mixed` or a kind of KINDS (400 generated requests, seed 0, contexts up to 2048 tokens, as
    the paper's trace); a `-onecall` suffix gives every request exactly one call (the single-API
    subset LAMPS is evaluated on), a `-small` suffix scales every token count by 1/8."""
    base = name.removesuffix("-small")
    kind = base.removesuffix("-onecall")
    if kind != "mixed" and kind not in KINDS:
        raise ValueError(f"unknown builtin trace {name!r}; known: mixed, {', '.join(KINDS)} "
                         "(each also -onecall, -small, -onecall-small)")
    trace = generate_workload(kind, 400, seed=0, single_call=base.endswith("-onecall"))
    return scale_tokens(trace, SMALL_SCALE) if name.endswith("-small") else trace


def resolve_trace(spec: str, tokenizer: str = DEFAULT_TOKENIZER) -> dict[str, TraceRequest]:
    """`builtin:NAME` or the path of a trace JSON file, whose text-form segments are measured with
    the tokenizer of the model `tokenizer` (a name or path; loaded only if the file has text)."""
    if spec.startswith("builtin:"):
        return builtin_trace(spec.removeprefix("builtin:"))
    return load_trace(spec, ModelTokenizer(tokenizer))


def real_engines(model: str, estimator: str = "oracle", **engine_options) -> Callable[[str], Engine]:
    """A factory of real engines for `run_replays`: the model is loaded once, each policy gets its
    own engine (pools, warm-up) around it."""
    from infercept_jax.llm import LLM, resolve_dtype
    from models.registry import load_model

    llama, tokenizer = load_model(model, dtype=resolve_dtype(engine_options.get("dtype", "auto")))

    def build(policy: str) -> Engine:
        return LLM.from_model(llama, tokenizer, policy=policy, estimator=estimator, **engine_options).engine
    return build


def measure_here(model: str, path: str, **engine_options) -> HardwareProfile:
    """A quick profile of this machine with the engine options a replay uses, written to `path`."""
    from infercept_jax.llm import LLM
    from infercept_jax.profiler import measure_profile

    llm = LLM(model, policy="swap", **engine_options)
    profile = measure_profile(llm, name=f"{model}-here", model=model, quick=True)
    profile.to_json(path)
    return profile


def simulated_engines(profile: HardwareProfile, **options) -> Callable[[str], Engine]:
    """A factory of fresh simulated engines, one per run, for `run_replays`; `options` go to
    `simulated_engine` (EngineConfig fields such as estimator or lamps, and pool sizes)."""
    def build(policy: str) -> Engine:
        return simulated_engine(profile, policy, **options)
    return build


def run_replays(trace: dict[str, TraceRequest], make_engine: Callable[[str], Engine], policies: Sequence[str],
                rates: Sequence[float], window: float, *, seed: int = 0, time_scale: float = 1.0,
                show_progress: bool = True) -> list[dict]:
    """One replay per (policy, rate), each on a fresh engine with the same arrivals."""
    results = []
    for qps in rates:
        arrivals = sample_arrivals(trace, qps, window, seed)
        for policy in policies:
            engine = make_engine(policy)
            with tqdm(total=len(arrivals), desc=f"{policy} @ {qps:g} req/s", disable=not show_progress,
                      leave=False) as bar:
                metrics = replay(engine, arrivals, window, time_scale=time_scale, progress=bar)
            results.append({"policy": policy, "qps": qps, "window_s": window, "seed": seed, **metrics})
    return results


def format_or_dash(x: float | None, spec: str) -> str:
    """A table cell: `x` formatted, or "–" when there is no value."""
    return "–" if x is None else format(x, spec)


def format_table(results: list[dict]) -> str:
    """A markdown table of the headline metrics of each run."""
    head = ("| policy | req/s | submitted | refused | finished | norm. latency mean s/tok | p99 | TTFT mean s | "
            "completed req/s | memory waste % | recompute tokens | swapped out blocks |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['policy']} | {r['qps']:g} | {r['num_submitted']} | {r['num_rejected']} | {r['num_finished']} | "
                     f"{format_or_dash(r['normalized_latency']['mean'], '.3f')} | "
                     f"{format_or_dash(r['normalized_latency']['p99'], '.3f')} | "
                     f"{format_or_dash(r['ttft']['mean'], '.2f')} | {r['completed_rps']:.3f} | "
                     f"{r['memory_waste_pct']:.1f} | "
                     f"{r['recompute_tokens']:,} | {r['swap_out_blocks']:,} |")
    return "\n".join(lines)


def write_results(results: list[dict], out_dir: str) -> list[str]:
    """results.json plus the two plots; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return [path] + plot_results(results, out_dir)


def plot_results(results: list[dict], out_dir: str) -> list[str]:
    """Normalized latency against request rate per policy (a bar per policy when there is one
    rate: a curve of one point says nothing); memory waste by cause per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in results))
    rates = sorted({r["qps"] for r in results})
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(rates) == 1:
        latencies = [next(r for r in results if r["policy"] == p)["normalized_latency"]["mean"] for p in policies]
        ax.bar(policies, [0.0 if v is None else v for v in latencies])
        ax.set_ylabel(f"mean normalized latency (s/token) at {rates[0]:g} req/s")
        latency_path = os.path.join(out_dir, "latency_by_policy.png")
    else:
        for policy in policies:
            runs = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["qps"])
            points = [(r["qps"], r["normalized_latency"]["mean"]) for r in runs
                      if r["normalized_latency"]["mean"] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=policy)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("mean normalized latency (s/token)")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        latency_path = os.path.join(out_dir, "latency_vs_rate.png")
    fig.tight_layout()
    fig.savefig(latency_path, dpi=120)
    plt.close(fig)

    top = max(r["qps"] for r in results)
    runs = [next(r for r in results if r["policy"] == p and r["qps"] == top) for p in policies]
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(runs)
    for cause, key in (("preserve", "waste_preserve_pct"), ("recompute", "waste_recompute_pct"),
                       ("swap stall", "waste_swap_stall_pct")):
        values = [r[key] for r in runs]
        ax.bar(policies, values, bottom=bottom, label=cause)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel(f"memory x time wasted (%) at {top:g} req/s")
    ax.legend()
    waste_path = os.path.join(out_dir, "memory_waste.png")
    fig.tight_layout()
    fig.savefig(waste_path, dpi=120)
    plt.close(fig)
    return [latency_path, waste_path]


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="trace JSON file, or builtin:mixed, builtin:qa, "
                        "builtin:mixed-onecall (one call per request), builtin:mixed-small (token counts / 8), ...")
    parser.add_argument("--policy", action="append", choices=POLICIES,
                        help=f"repeat for several (default: {' '.join(DEFAULT_POLICIES)})")
    parser.add_argument("--qps", action="append", type=float, help="request rate; repeat for several (default 1)")
    parser.add_argument("--window", type=float, default=1800.0, help="seconds of arrivals (default 1800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies every tool-call duration")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="oracle", help="call-duration estimator")
    parser.add_argument("--estimator-error", type=float, default=0.0,
                        help="noisy-oracle: each call's duration times uniform [1-e, 1+e]")
    parser.add_argument("--heuristic", choices=HEURISTICS, default="H-B", help="for --policy heuristic")
    add_lamps_arguments(parser)
    parser.add_argument("--simulate", action="store_true", help="the simulator instead of the real engine")
    parser.add_argument("--profile", help="hardware profile: a name (a100-gptj-6b, a100x2-vicuna-13b) or "
                        "a JSON file from `infercept profile`; required with --simulate; for the real engine "
                        "it is measured here (quick) when infercept or heuristic runs without one")
    parser.add_argument("--model", default="smollm2-135m", help="real engine: model name or path")
    add_tokenizer_argument(parser, default=None)
    parser.add_argument("--num-kv-blocks", type=int, help="device KV blocks (default: the profile's, or the "
                        "engine's default)")
    parser.add_argument("--device-memory-gb", type=float, help="--simulate: GiB of memory per GPU, the device pool "
                        "sized from it as the reference does (the papers capped it at 40 for 6B and 13B)")
    parser.add_argument("--num-host-blocks", type=int, help="host KV blocks for swap")
    parser.add_argument("--max-num-seqs", type=int, help="requests per step")
    parser.add_argument("--max-num-batched-tokens", type=int, help="the step budget S when there is no profile "
                        "(a profile's own S is used otherwise)")
    parser.add_argument("--max-model-len", type=int, help="longest context (default: the model's; 2048 simulated)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="real engine: weights "
                        "and KV dtype (default auto)")
    parser.add_argument("--tensor-parallel-size", type=int, help="real engine: devices the weights and the KV "
                        "cache are split over (default 1)")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, help="real engine: the paged attention kernel "
                        "(default auto: the Pallas kernel on a GPU, else the XLA path)")
    parser.add_argument("--swap-transfer", choices=SWAP_TRANSFERS, help="real engine: the host pool's memory "
                        "(default auto: pinned_host off the CPU, else numpy)")
    parser.add_argument("--async-scheduling", action="store_true", default=None,
                        help="real engine: launch each step while the one before runs")
    parser.add_argument("--out", required=True, help="folder for results.json and the plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_tokenizer_argument(parser: argparse.ArgumentParser, *aliases: str, default: str | None = DEFAULT_TOKENIZER) -> None:
    """`--tokenizer NAME_OR_PATH`: whose tokenizer measures a text-form trace file (None: the replay's --model)."""
    parser.add_argument("--tokenizer", *aliases, dest="tokenizer", default=default, metavar="NAME_OR_PATH",
                        help="model name or path whose tokenizer measures the text of a text-form trace file, as "
                        f"that model would serve it; loaded only for such a file (default: {default or '--model'})")


def add_lamps_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per LampsOptions field (`--prediction-error`, ...), with the field's default and help."""
    for option in fields(LampsOptions):
        flag, help_ = "--" + option.name.replace("_", "-"), "lamps: " + option.metadata["help"]
        if option.default is False:
            parser.add_argument(flag, action="store_true", help=help_)
            continue
        parse = option.metadata.get("parse", str if option.default is None else type(option.default))
        parser.add_argument(flag, type=parse, default=option.default, choices=option.metadata.get("choices"),
                            help=help_)


def lamps_options(args: argparse.Namespace) -> LampsOptions:
    """The LampsOptions that `add_lamps_arguments`' flags spell."""
    return LampsOptions(**{option.name: getattr(args, option.name) for option in fields(LampsOptions)})


def replay_command(args: argparse.Namespace) -> list[dict]:
    """Run `infercept replay` / scripts/replay_trace.py: replays, table, results.json, plots."""
    policies = args.policy or list(DEFAULT_POLICIES)
    rates = args.qps or [1.0]
    given = {name: getattr(args, name) for name in ("num_host_blocks", "max_num_seqs", "max_num_batched_tokens",
                                                     "max_model_len", *REAL_ENGINE_OPTIONS)}
    options = {name: value for name, value in given.items() if value is not None}
    decisions = {"heuristic": args.heuristic, "estimator_error": args.estimator_error, "lamps": lamps_options(args)}
    trace = resolve_trace(args.trace, args.tokenizer or args.model)
    if args.simulate:
        if args.profile is None:
            raise ValueError("--simulate needs --profile (a name such as a100-gptj-6b, or a JSON file)")
        for flag in REAL_ENGINE_OPTIONS:
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is for the real engine; the simulator runs no model")
        profile = load_profile(args.profile)
        if args.device_memory_gb is not None:
            if args.num_kv_blocks is not None:
                raise ValueError("give --device-memory-gb or --num-kv-blocks, not both: each sets the device pool")
            profile = profile.with_device_memory(args.device_memory_gb)
        if args.num_kv_blocks is not None:
            options["num_device_blocks"] = args.num_kv_blocks
        make_engine = simulated_engines(profile, estimator=args.estimator, **decisions, **options)
    else:
        if args.device_memory_gb is not None:
            raise ValueError("--device-memory-gb sizes the simulator's pool; the real engine takes --num-kv-blocks")
        if args.num_kv_blocks is not None:
            options["num_kv_blocks"] = args.num_kv_blocks
        if args.profile is None and {"infercept", "lamps"} & set(policies):
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "profile.json")
            profile = measure_here(args.model, path, **options)
            options.pop("max_num_batched_tokens", None)     # it capped the sweep: the profile's S is the budget now
            print(f"measured this machine's profile (S={profile.saturation_tokens}) into {path}")
            args.profile = path
        if args.profile is not None:
            options["profile"] = args.profile
        make_engine = real_engines(args.model, args.estimator, **decisions, **options)
    results = run_replays(trace, make_engine, policies, rates, args.window, seed=args.seed,
                          time_scale=args.time_scale, show_progress=not args.quiet)
    print(format_table(results))
    for path in write_results(results, args.out):
        print(f"wrote {path}")
    return results


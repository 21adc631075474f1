"""Policy comparisons: replay one trace under several policies and request rates, on the real
engine or in the simulator, then print a table and draw the plots (`infercept replay`)."""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from tqdm.auto import tqdm

from infercept_jax.engine import Engine
from infercept_jax.replay import replay, sample_arrivals
from infercept_jax.simulator import simulated_engine
from infercept_jax.workload import TraceRequest
from scheduling.estimators import make_estimator
from scheduling.policies import make_policy
from scheduling.profile import HardwareProfile


def simulated_engines(profile: HardwareProfile, estimator: str = "oracle", **engine_options) -> Callable[[str], Engine]:
    """A factory of fresh simulated engines, one per run, for `run_replays`."""
    def build(policy: str) -> Engine:
        est = make_estimator(estimator)
        return simulated_engine(profile, make_policy(policy, profile, est), est, **engine_options)
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


def format_table(results: list[dict]) -> str:
    """A markdown table of the headline metrics of each run."""
    head = ("| policy | req/s | submitted | finished | norm. latency mean s/tok | p99 | TTFT mean s | "
            "completed req/s | memory waste % | recompute tokens | swapped out blocks |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    for r in results:
        lines.append(f"| {r['policy']} | {r['qps']:g} | {r['num_submitted']} | {r['num_finished']} | "
                     f"{fmt(r['normalized_latency']['mean'], '.3f')} | {fmt(r['normalized_latency']['p99'], '.3f')} | "
                     f"{fmt(r['ttft']['mean'], '.2f')} | {r['completed_rps']:.3f} | {r['memory_waste_pct']:.1f} | "
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
    """Normalized latency against request rate per policy; memory waste by cause per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in results))
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in policies:
        runs = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["qps"])
        points = [(r["qps"], r["normalized_latency"]["mean"]) for r in runs if r["normalized_latency"]["mean"] is not None]
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

"""The same workload and policies across hardware profiles, in the simulator: the request rate each
policy sustains at a fixed normalized latency, and its gain over discard (vLLM), the paper's headline
measure (spec 5.2: InferCept sustains 1.6-2x the rate of vLLM).

    .venv/bin/python scripts/compare_hardware.py            # the paper profiles + this machine's (make demo)
    .venv/bin/python scripts/compare_hardware.py --profile a100-gptj-6b --per-kind

* Rates: each profile gets its own grid, FRACTIONS of its capacity (`capacity_rps`), so a slow
  machine (or a small KV pool) is swept at rates it can serve and a fast one at rates that load it.
* SLO: `--slo-factor` (2) x the lowest mean normalized latency of any policy at the lowest rate.
* Sustainable rate: the highest swept rate up to which a policy meets the SLO at every swept rate.
  Runs above a policy's first miss cannot change it, so the sweep stops there (once the policy has
  also reached discard's sustainable rate, where every policy is compared): the overloaded runs,
  the slowest to simulate, are skipped.

Writes OUT/compare.md (the table), OUT/results.json (every run, with its profile and trace) and
OUT/gain_over_discard.png; with --per-kind, the same for each augmentation kind on the first
profile, under OUT/per_kind/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

from infercept_jax.benchmark import resolve_trace, run_replays, simulated_engines
from infercept_jax.workload import KINDS, TraceRequest
from scheduling.policies import POLICIES
from scheduling.profile import PAPER_PROFILES, HardwareProfile, load_profile

BASELINE = "discard"
DEFAULT_POLICIES = ("discard", "improved-discard", "preserve", "swap", "infercept")
DEMO_PROFILE = "results/demo/profile.json"   # this machine's, measured by `make demo`, with its pool sizes
# Rates = capacity x FRACTIONS: each 1.5x the last, so a gain is resolved to about 1.5x.
FRACTIONS = (0.1, 0.15, 0.22, 0.34, 0.51, 0.76, 1.14)


def capacity_rps(profile: HardwareProfile, trace: dict[str, TraceRequest]) -> float:
    """Requests/s the machine computes at full load, a scale for the rate grid (not a prediction: it
    ignores recomputation and tool-call time). The device pool holds B = pool tokens / mean tokens
    of a request at once, each computing about a token per step, so a step computes x = min(S, B)
    tokens: x / T_fwd(x) tokens/s over the mean tokens of a request (prompt + generated + returned)."""
    if profile.num_device_blocks is None:
        raise ValueError(f"profile {profile.name!r} has no pool sizes (num_device_blocks, num_host_blocks)")
    mean_tokens = sum(r.final_context for r in trace.values()) / len(trace)
    pool_requests = profile.num_device_blocks * profile.block_size / mean_tokens
    step_tokens = min(profile.saturation_tokens, pool_requests)
    return step_tokens / profile.fwd_seconds(step_tokens) / mean_tokens


def latency_slo(results: list[dict], factor: float = 2.0) -> float:
    """`factor` x the lowest mean normalized latency of any policy at the lowest swept rate."""
    lowest = min(r["qps"] for r in results)
    latencies = [r["normalized_latency"]["mean"] for r in results if r["qps"] == lowest]
    latencies = [x for x in latencies if x is not None]
    if not latencies:
        raise ValueError(f"no run at the lowest rate ({lowest:g} req/s) generated a token: no SLO to set")
    return factor * min(latencies)


def sustainable_rate(results: list[dict], policy: str, slo: float) -> float:
    """The largest swept rate at which, and at every lower swept rate, the policy's mean normalized
    latency is <= slo; 0 if none (a run without a latency misses)."""
    best = 0.0
    for r in sorted((r for r in results if r["policy"] == policy), key=lambda r: r["qps"]):
        latency = r["normalized_latency"]["mean"]
        if latency is None or latency > slo:
            break
        best = r["qps"]
    return best


def gain(rate: float, baseline: float) -> float | None:
    """rate / baseline; inf when only the baseline sustains no swept rate, None when neither does."""
    if baseline > 0:
        return rate / baseline
    return math.inf if rate > 0 else None


def summarize(results: list[dict], label: str, slo: float) -> list[dict]:
    """Per policy: sustainable rate, gain over discard, and latency and waste at discard's rate."""
    baseline = sustainable_rate(results, BASELINE, slo)
    rows = []
    for policy in dict.fromkeys(r["policy"] for r in results):
        rate = sustainable_rate(results, policy, slo)
        at = next((r for r in results if r["policy"] == policy and r["qps"] == baseline), None)
        rows.append({"setup": label, "policy": policy, "sustainable_rps": rate, "gain": gain(rate, baseline),
                     "latency_at_baseline": None if at is None else at["normalized_latency"]["mean"],
                     "waste_at_baseline": None if at is None else at["memory_waste_pct"]})
    return rows


def sweep(trace, make_engine, policies: list[str], rates: list[float], window: float, *, seed: int = 0,
          slo_factor: float = 2.0) -> list[dict]:
    """Every policy at the lowest rate (which sets the SLO), then each policy upward, discard first,
    until it has missed the SLO and passed discard's sustainable rate."""
    def run(policy_list, qps):
        runs = run_replays(trace, make_engine, policy_list, [qps], window, seed=seed, show_progress=False)
        for r in runs:
            print(f"  {r['policy']:16} {qps:8.3g} req/s  norm. latency {_num(r['normalized_latency']['mean'], '.4f')} "
                  f"s/token  finished {r['num_finished']}/{r['num_submitted']}", flush=True)
        return runs

    results = run(policies, rates[0])
    slo = latency_slo(results, slo_factor)
    for policy in policies:
        for previous, qps in zip(rates, rates[1:]):
            if sustainable_rate(results, policy, slo) < previous and qps > sustainable_rate(results, BASELINE, slo):
                break
            results += run([policy], qps)
    return results


def format_compare(rows: list[dict], column: str) -> str:
    lines = [f"| {column} | policy | sustainable req/s | gain over discard | norm. latency s/token at discard's "
             "rate | memory waste % at discard's rate |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['policy']} | {r['sustainable_rps']:.3g} | {_gain(r['gain'])} | "
                     f"{_num(r['latency_at_baseline'], '.4f')} | {_num(r['waste_at_baseline'], '.1f')} |")
    lines.append("\n∞: discard sustains no swept rate, the policy does; –: neither does (or no run at that rate).")
    return "\n".join(lines)


def plot_gains(rows: list[dict], path: str, column: str) -> None:
    """Grouped bars: per setup, each policy's gain over discard (the dashed line at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(r["setup"] for r in rows))
    policies = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != BASELINE]
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(setups), 4))
    for i, policy in enumerate(policies):
        for j, setup in enumerate(setups):
            g = next(r["gain"] for r in rows if r["setup"] == setup and r["policy"] == policy)
            height = g if g is not None and math.isfinite(g) else 0.0
            x = j + (i - (len(policies) - 1) / 2) * width
            ax.bar(x, height, width, color=f"C{i}", label=policy if j == 0 else None)
            ax.text(x, height, _gain(g), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(setups)), setups, fontsize=8)
    ax.set_xlabel(column)
    ax.set_ylabel("sustainable request rate / discard's")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _gain(g: float | None) -> str:
    return "–" if g is None else "∞" if math.isinf(g) else f"{g:.2f}x"


def _num(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="append", help="a profile name or JSON file; repeat for several "
                        f"(default: {', '.join(PAPER_PROFILES)} and {DEMO_PROFILE} if it exists)")
    parser.add_argument("--trace", default="builtin:mixed", help="builtin:NAME or a trace file (default builtin:mixed)")
    parser.add_argument("--policy", action="append", choices=POLICIES,
                        help=f"repeat for several (default: {' '.join(DEFAULT_POLICIES)}); discard always runs")
    parser.add_argument("--window", type=float, default=1800.0, help="seconds of arrivals per run (default 1800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-factor", type=float, default=2.0, help="SLO = this x the best latency at the lowest rate")
    parser.add_argument("--per-kind", action="store_true", help="each augmentation kind (builtin:KIND, -small "
                        "if --trace is) on the first profile, instead of the profiles")
    parser.add_argument("--out", default="results/compare_hardware")
    args = parser.parse_args(argv)

    policies = [BASELINE] + [p for p in (args.policy or DEFAULT_POLICIES) if p != BASELINE]
    names = args.profile or [*PAPER_PROFILES, *([DEMO_PROFILE] if os.path.isfile(DEMO_PROFILE) else [])]
    profiles = [load_profile(name) for name in names]
    if args.per_kind:
        suffix = "-small" if args.trace.endswith("-small") else ""
        setups = [(kind, profiles[0], f"builtin:{kind}{suffix}") for kind in KINDS]
        column, out = "kind", os.path.join(args.out, "per_kind")
    else:
        setups = [(profile.name, profile, args.trace) for profile in profiles]
        column, out = "profile", args.out

    start = time.perf_counter()
    runs, rows, notes = [], [], []
    for label, profile, trace_spec in setups:
        trace = resolve_trace(trace_spec)
        capacity = capacity_rps(profile, trace)
        rates = [capacity * f for f in FRACTIONS]
        print(f"{label} ({trace_spec}): rates {', '.join(f'{r:.3g}' for r in rates)} req/s", flush=True)
        results = sweep(trace, simulated_engines(profile), policies, rates, args.window, seed=args.seed,
                        slo_factor=args.slo_factor)
        slo = latency_slo(results, args.slo_factor)
        rows += summarize(results, label, slo)
        runs += [{"profile": profile.name, "trace": trace_spec, **r} for r in results]
        notes.append(f"* {label}: {profile.device or profile.name}, capacity {capacity:.3g} req/s, "
                     f"SLO {slo:.4f} s/token, {len(results)} runs")
    wall = time.perf_counter() - start
    steps = sum(r["steps"] for r in runs)

    table = format_compare(rows, column)
    header = (f"{args.trace if not args.per_kind else 'builtin:KIND'} on the simulator, window {args.window:g} s, "
              f"seed {args.seed}, SLO {args.slo_factor:g}x the best latency at the lowest rate, "
              f"rates = capacity x {', '.join(map(str, FRACTIONS))}\n\n" + "\n".join(notes))
    print(f"\n{header}\n\n{table}\n")
    print(f"simulator: {steps:,} steps in {wall:.0f} s of real time = {steps / wall:,.0f} steps/s")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(f"{header}\n\n{table}\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(runs, f, indent=2)
    plot_gains(rows, os.path.join(out, "gain_over_discard.png"), column)
    print(f"wrote {out}/compare.md, results.json, gain_over_discard.png")
    return rows


if __name__ == "__main__":
    main()

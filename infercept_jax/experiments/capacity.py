"""The paper's headline measure (spec 5.2): the request rate a policy sustains at a fixed
normalized latency, and its gain over discard (vLLM). InferCept sustains 1.6-2x vLLM's rate.

* Rates: FRACTIONS of the machine's compute capacity for the workload (`capacity_rps`), so a slow
  machine (or a small KV pool) is swept at rates it can serve and a fast one at rates that load it.
* SLO: `slo_factor` (2) x the lowest mean normalized latency of any policy at the lowest rate.
* Sustainable rate: the highest swept rate up to which a policy meets the SLO at every swept rate.
  Runs above a policy's first miss cannot change it, so `sweep` stops there (once the policy has
  also reached discard's sustainable rate, where every policy is compared): the overloaded runs,
  the slowest to simulate, are skipped.
"""
from __future__ import annotations

import math

from infercept_jax.experiments.sweeps import format_or_dash, run_replays
from infercept_jax.experiments.workload import TraceRequest
from scheduling.profile import HardwareProfile

BASELINE = "discard"
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
          slo_factor: float = 2.0, refine: int = 0) -> list[dict]:
    """Every policy at the lowest rate (which sets the SLO), then each policy upward, discard first,
    until it has missed the SLO and passed discard's sustainable rate. With `refine` > 0, each
    policy's sustainable rate is then bisected (geometrically) `refine` times between it and the
    first rate it missed, discard first, and every policy is also run at discard's refined rate,
    where the table compares them: each step halves the uncertainty of a gain in log terms (the
    grid's 1.5x, then 1.22x, 1.11x, ...)."""
    def run(policy_list, qps):
        runs = run_replays(trace, make_engine, policy_list, [qps], window, seed=seed, show_progress=False)
        for r in runs:
            latency = format_or_dash(r['normalized_latency']['mean'], '.4f')
            print(f"  {r['policy']:16} {qps:8.3g} req/s  norm. latency {latency} "
                  f"s/token  finished {r['num_finished']}/{r['num_submitted']}", flush=True)
        return runs

    results = run(policies, rates[0])
    slo = latency_slo(results, slo_factor)
    for policy in policies:
        for previous, qps in zip(rates, rates[1:]):
            if sustainable_rate(results, policy, slo) < previous and qps > sustainable_rate(results, BASELINE, slo):
                break
            results += run([policy], qps)
    if refine:
        for policy in policies:
            results += _bisect(results, policy, slo, refine, run)
            if policy == BASELINE:
                baseline = sustainable_rate(results, BASELINE, slo)
                missing = [p for p in policies if p != BASELINE
                           and not any(r["policy"] == p and r["qps"] == baseline for r in results)]
                if baseline > 0 and missing:
                    results += run(missing, baseline)
    return results


def _bisect(results: list[dict], policy: str, slo: float, steps: int, run) -> list[dict]:
    """Runs at the geometric middle between the policy's sustainable rate and the lowest rate above
    it that it missed, `steps` times; none if it sustains no rate or never missed."""
    added: list[dict] = []
    for _ in range(steps):
        done = results + added
        low = sustainable_rate(done, policy, slo)
        above = [r["qps"] for r in done if r["policy"] == policy and r["qps"] > low]
        if low == 0 or not above:
            break
        added += run([policy], math.sqrt(low * min(above)))
    return added


def format_compare(rows: list[dict], column: str) -> str:
    lines = [f"| {column} | policy | sustainable req/s | gain over discard | norm. latency s/token at discard's "
             "rate | memory waste % at discard's rate |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['policy']} | {r['sustainable_rps']:.3g} | {_gain(r['gain'])} | "
                     f"{format_or_dash(r['latency_at_baseline'], '.4f')} | "
                     f"{format_or_dash(r['waste_at_baseline'], '.1f')} |")
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

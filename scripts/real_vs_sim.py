"""The same small workload on the real engine and in the simulator, to see how far the simulator's
numbers (which compare_hardware.py relies on) are from what the engine really does.

SmolLM2-135M on this machine replays builtin:mixed-small (tool-call durations x 0.1) on the small
KV pool of examples/demo.py, so that memory is contended; the simulator replays the same arrivals
with the profile measured here first, the same pools and the same step budget S. Per policy and
rate: mean normalized latency and completed requests of each, and the simulator's relative
difference. With several rates, also each policy's sustainable rate and its gain over discard
(capacity.py's measure: the SLO is twice the lowest latency at the lowest rate), on the real engine
and as the simulator predicts it. Each real run takes about 10 s of warm-up plus the window.

    .venv/bin/python scripts/real_vs_sim.py                      # 1 req/s, 30 s windows: a few minutes
    .venv/bin/python scripts/real_vs_sim.py --policy discard --policy infercept --qps 0.25 --qps 0.5 --qps 1 --qps 2
"""
from __future__ import annotations

import argparse
import json
import os
import time

from infercept_jax.experiments.capacity import format_compare, latency_slo, summarize
from infercept_jax.experiments.sweeps import measure_here, real_engines, resolve_trace, run_replays, simulated_engines
from scheduling.policies import POLICIES

MODEL = "smollm2-135m"
DEFAULT_POLICIES = ("discard", "preserve", "swap", "infercept")
# examples/demo.py's pools: 160 blocks of 16 = 2,560 device tokens for requests of up to ~270
POOLS = dict(max_model_len=2048, max_num_seqs=64, num_host_blocks=512)
DEVICE_BLOCKS = 160


def relative_difference(sim: float | None, real: float | None) -> float | None:
    """(sim - real) / real; None when either is missing or real is 0."""
    if sim is None or real is None or real == 0:
        return None
    return (sim - real) / real


def compare(real: list[dict], sim: list[dict]) -> list[dict]:
    """One row per (policy, rate): the real and simulated latency and completions, and their gaps."""
    rows = []
    for r, s in zip(real, sim):
        assert (r["policy"], r["qps"]) == (s["policy"], s["qps"])
        latency = (r["normalized_latency"]["mean"], s["normalized_latency"]["mean"])
        rows.append({"policy": r["policy"], "qps": r["qps"], "submitted": (r["num_submitted"], s["num_submitted"]),
                     "finished": (r["num_finished"], s["num_finished"]), "normalized_latency": latency,
                     "finished_diff": relative_difference(s["num_finished"], r["num_finished"]),
                     "latency_diff": relative_difference(latency[1], latency[0])})
    return rows


def format_rows(rows: list[dict]) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:+.0f}%"  # noqa: E731
    num = lambda x: "–" if x is None else f"{x:.3f}"          # noqa: E731
    lines = ["| policy | req/s | submitted real / sim | finished real | finished sim | diff | "
             "norm. latency real s/token | sim | diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['qps']:g} | {r['submitted'][0]} / {r['submitted'][1]} | "
                     f"{r['finished'][0]} | {r['finished'][1]} | {pct(r['finished_diff'])} | "
                     f"{num(r['normalized_latency'][0])} | {num(r['normalized_latency'][1])} | {pct(r['latency_diff'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qps", action="append", type=float, help="request rate; repeat for several (default 1)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of arrivals per run (default 30)")
    parser.add_argument("--policy", action="append", choices=POLICIES,
                        help=f"repeat for several (default: {' '.join(DEFAULT_POLICIES)})")
    parser.add_argument("--trace", default="builtin:mixed-small")
    parser.add_argument("--time-scale", type=float, default=0.1, help="multiplies every tool-call duration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/real_vs_sim")
    args = parser.parse_args(argv)
    policies, rates = args.policy or list(DEFAULT_POLICIES), args.qps or [1.0]
    trace = resolve_trace(args.trace, MODEL)      # a text-form file is measured as MODEL serves it
    os.makedirs(args.out, exist_ok=True)
    replay = dict(window=args.window, seed=args.seed, time_scale=args.time_scale)

    start = time.perf_counter()
    profile_path = os.path.join(args.out, "profile.json")
    profile = measure_here(MODEL, profile_path, num_kv_blocks=DEVICE_BLOCKS, **POOLS)
    print(f"this machine: T_fwd(x) = {profile.fwd_ms_per_token:.2f} x + {profile.fwd_base_ms:.0f} ms, "
          f"S = {profile.saturation_tokens} (measured in {time.perf_counter() - start:.0f} s)", flush=True)

    start = time.perf_counter()
    engines = real_engines(MODEL, profile=profile_path, num_kv_blocks=DEVICE_BLOCKS, **POOLS)
    real = run_replays(trace, engines, policies, rates, **replay)
    real_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sim = run_replays(trace, simulated_engines(profile, num_device_blocks=DEVICE_BLOCKS, **POOLS), policies, rates,
                      show_progress=False, **replay)
    sim_seconds = time.perf_counter() - start

    rows = compare(real, sim)
    print(f"\n{args.trace}, tool calls x {args.time_scale:g}, window {args.window:g} s, {DEVICE_BLOCKS} device "
          f"blocks; real engine {real_seconds:.0f} s, simulator {sim_seconds:.1f} s\n")
    print(format_rows(rows))
    capacity = []
    if len(rates) > 1:
        capacity = summarize(real, "real engine", latency_slo(real)) + summarize(sim, "simulator", latency_slo(sim))
        print("\nsustainable rates (SLO: 2x the lowest normalized latency at the lowest rate, per engine)\n")
        print(format_compare(capacity, "engine"))
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump({"profile": profile.to_dict(), "comparison": rows, "sustainable": capacity,
                   "runs": [{"engine": "real", **r} for r in real] + [{"engine": "sim", **s} for s in sim]}, f, indent=2)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()

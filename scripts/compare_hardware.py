"""The same workload and policies across hardware profiles, in the simulator: the request rate each
policy sustains at a fixed normalized latency, and its gain over discard (vLLM), the paper's headline
measure (spec 5.2: InferCept sustains 1.6-2x the rate of vLLM). The measure and the sweep are
`infercept_jax.experiments.capacity`; this script picks the setups and writes the results.

The machines: the paper's constants (A100, GPT-J-6B and Vicuna-13B), and measured ones, marked
"(measured)": an H200 (profiles/h200-smollm2-1.7b.json, SmolLM2-1.7B shape, measured by
scripts/bench_swap.py) and this machine's, if `make demo` measured it. Each GPU's memory is capped
at --device-memory-gb (40, as the papers ran 6B and 13B, spec 6.6) and the device pool sized from
it by the reference's rule; a profile that does not give its weights' size keeps its own pool.

    .venv/bin/python scripts/compare_hardware.py            # the profiles above, 40 GiB per GPU
    .venv/bin/python scripts/compare_hardware.py --device-memory-gb 80   # A100-80GB pools
    .venv/bin/python scripts/compare_hardware.py --profile a100-gptj-6b --per-kind [--kind chat]
    .venv/bin/python scripts/compare_hardware.py --profile a100-gptj-6b --policy infercept --estimator dynamic
    .venv/bin/python scripts/compare_hardware.py --trace merged_exp_uniform.json --per-kind --kind chat --refine 2

Writes OUT/compare.md (the table), OUT/results.json (every run, with its profile and trace) and
OUT/gain_over_discard.png; with --per-kind, the same for each augmentation kind on the first
profile, under OUT/per_kind/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from infercept_jax.experiments.capacity import (BASELINE, FRACTIONS, capacity_rps, format_compare, latency_slo,
                                                plot_gains, summarize, sweep)
from infercept_jax.experiments.sweeps import add_tokenizer_argument, resolve_trace, simulated_engines
from infercept_jax.experiments.workload import KINDS, Trace
from scheduling.estimators import ESTIMATORS
from scheduling.policies import POLICIES
from scheduling.profile import PAPER_PROFILES, PAPERS_DEVICE_MEMORY_GIB, HardwareProfile, capped, load_profile

DEFAULT_POLICIES = ("discard", "improved-discard", "preserve", "swap", "infercept")
DEMO_PROFILE = "results/demo/profile.json"   # this machine's, measured by `make demo`, with its pool sizes
MEASURED_PROFILES = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "profiles",
                                  "h200-smollm2-1.7b.json"),)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="append", help="a profile name or JSON file; repeat for several "
                        f"(default: {', '.join(PAPER_PROFILES)}, the measured H200 and {DEMO_PROFILE} if it exists)")
    parser.add_argument("--device-memory-gb", type=float, default=PAPERS_DEVICE_MEMORY_GIB,
                        help="GiB of memory per GPU, the device pool sized from it by the reference's rule "
                        f"(default {PAPERS_DEVICE_MEMORY_GIB:g}, as the papers ran; 0: each profile's own pool)")
    parser.add_argument("--trace", default="builtin:mixed", help="builtin:NAME or a trace file (default builtin:mixed)")
    add_tokenizer_argument(parser)
    parser.add_argument("--policy", action="append", choices=POLICIES,
                        help=f"repeat for several (default: {' '.join(DEFAULT_POLICIES)}); discard always runs")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="oracle",
                        help="call durations for the policies that weigh them (default oracle, as the released code)")
    parser.add_argument("--window", type=float, default=1800.0, help="seconds of arrivals per run (default 1800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-factor", type=float, default=2.0, help="SLO = this x the best latency at the lowest rate")
    parser.add_argument("--refine", type=int, default=0, help="bisect each sustainable rate this many times between "
                        "the grid's rates (each halves a gain's uncertainty: 1.5x, 1.22x, 1.11x; default 0)")
    parser.add_argument("--per-kind", action="store_true", help="each augmentation kind on the first profile, "
                        "instead of the profiles: builtin:KIND (-small if --trace is) for a builtin --trace, "
                        "else the file's requests of that kind")
    parser.add_argument("--kind", action="append", choices=KINDS, help="with --per-kind: this kind only; repeat "
                        "for several (default: all)")
    parser.add_argument("--out", default="results/compare_hardware")
    args = parser.parse_args(argv)
    if args.kind and not args.per_kind:
        parser.error("--kind selects kinds for --per-kind")

    policies = [BASELINE] + [p for p in (args.policy or DEFAULT_POLICIES) if p != BASELINE]
    if len(policies) == 1:
        parser.error(f"give a --policy besides {BASELINE}: the comparison is each policy's gain over it")
    names = args.profile or [*PAPER_PROFILES, *MEASURED_PROFILES, *([DEMO_PROFILE] if os.path.isfile(DEMO_PROFILE) else [])]
    profiles = [capped(load_profile(name), args.device_memory_gb) for name in names]
    if args.per_kind:
        setups = [(kind, *profiles[0], spec, trace) for kind, spec, trace in per_kind_traces(args.trace, args.kind,
                                                                                              args.tokenizer)]
        if not setups:
            parser.error(f"{args.trace} has no requests of kind {', '.join(args.kind or KINDS)}")
        column, out = "kind", os.path.join(args.out, "per_kind")
    else:
        trace = resolve_trace(args.trace, args.tokenizer)
        setups = [(label(profile), profile, pool, args.trace, trace) for profile, pool in profiles]
        column, out = "profile", args.out

    start = time.perf_counter()
    runs, rows, notes = [], [], []
    for setup, profile, pool, trace_spec, trace in setups:
        capacity = capacity_rps(profile, trace)
        rates = [capacity * f for f in FRACTIONS]
        print(f"{setup} ({trace_spec}): rates {', '.join(f'{r:.3g}' for r in rates)} req/s", flush=True)
        results = sweep(trace, simulated_engines(profile, estimator=args.estimator), policies, rates, args.window,
                        seed=args.seed, slo_factor=args.slo_factor, refine=args.refine)
        slo = latency_slo(results, args.slo_factor)
        rows += summarize(results, setup, slo)
        runs += [{"profile": profile.name, "trace": trace_spec, **r} for r in results]
        notes.append(f"* {setup}: {profile.device or profile.name}, {profile.num_device_blocks} device blocks of "
                     f"{profile.block_size} tokens ({pool}), "
                     f"capacity {capacity:.3g} req/s, SLO {slo:.4f} s/token, {len(results)} runs")
    wall = time.perf_counter() - start
    steps = sum(r["steps"] for r in runs)

    table = format_compare(rows, column)
    trace_name = "builtin:KIND" if args.per_kind and args.trace.startswith("builtin:") else args.trace
    header = (f"{trace_name} on the simulator, window {args.window:g} s, "
              f"seed {args.seed}, estimator {args.estimator}, SLO {args.slo_factor:g}x the best latency at the lowest rate, "
              f"rates = capacity x {', '.join(map(str, FRACTIONS))}"
              f"{f', each sustainable rate bisected {args.refine} times' if args.refine else ''}\n\n" + "\n".join(notes))
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


def per_kind_traces(spec: str, kinds: list[str] | None, tokenizer: str) -> list[tuple[str, str, Trace]]:
    """(kind, its trace's name, its trace) for each kind: a generated trace of that kind, with the
    builtin `spec`'s suffixes (-onecall, -small), else the requests of that kind in the file (by the
    kind each names, or the one the loader infers, `workload.infer_kind`)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        suffix = name[len(name.removesuffix("-small").removesuffix("-onecall")):]
        return [(kind, f"builtin:{kind}{suffix}", resolve_trace(f"builtin:{kind}{suffix}"))
                for kind in kinds or KINDS]
    trace = resolve_trace(spec, tokenizer)
    subsets = [(kind, f"{spec} ({kind})", {k: r for k, r in trace.items() if r.kind == kind}) for kind in kinds or KINDS]
    return [subset for subset in subsets if subset[2]]


def label(profile: HardwareProfile) -> str:
    """The profile's name, marked when its constants were measured rather than taken from a paper."""
    return profile.name if profile.name in PAPER_PROFILES else f"{profile.name} (measured)"


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:       # a missing or malformed trace, an unknown profile
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)

"""LAMPS against InferCept in the simulator (spec 6.6): mean and P99 end-to-end latency and TTFT on
the single-call and the mixed workloads, around and above InferCept's saturation, with oracle
predictions, with 20 % and 60 % Gaussian prediction error, with the learned length predictor and
without starvation prevention.

    .venv/bin/python scripts/lamps_study.py                      # 6B profile at 40 GB, 600 s windows
    .venv/bin/python scripts/lamps_study.py --window 1800 --fraction 2.0
    .venv/bin/python scripts/lamps_study.py --trace diverse_oneapi_merged_exp_uniform.json   # the authors' file

* Traces: the generated single-call and mixed workloads, or any trace file (`--trace`, its text
  measured with `--tokenizer`).
* Memory: the GPU capped at `--device-memory-gb` (40 GiB, as both papers ran the 6B and 13B models,
  spec 6.6), the device pool sized from it by the reference's rule.
* Rates: FRACTIONS of the profile's compute capacity for the trace
  (`infercept_jax.experiments.capacity.capacity_rps`, a scale that ignores tool-call time), chosen
  so both workloads are swept from below InferCept's knee to past it on the 6B profile.
* The learned variant trains `LengthModel` on a different generated trace (seed 1, 2000 requests)
  and predicts every segment's length from the request's shape; durations stay oracle. The
  tool-mean variant predicts each call's duration (and result size) as the running mean of the
  calls seen so far to the same tool; replay names the tool after the request's workload kind.
* Runs go to two worker processes; every variant of a (workload, rate) replays the same arrivals.
* "quanta" is how often LAMPS's starvation guard moved a request to the front of the queue.
* "host ms/step" is the simulator's wall time per step: the engine's Python (scheduler and
  bookkeeping) with the model replaced by the cost model, so it bounds the scheduling overhead.
  Do not run anything else meanwhile if you read it.

Writes OUT/lamps.md (the table, with each variant's change against InferCept) and OUT/results.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from infercept_jax.experiments.capacity import capacity_rps
from infercept_jax.experiments.length_training import fit_length_model, segment_examples
from infercept_jax.experiments.replay import replay, sample_arrivals
from infercept_jax.experiments.simulator import simulated_engine
from infercept_jax.experiments.sweeps import add_tokenizer_argument, resolve_trace
from infercept_jax.experiments.workload import generate_workload
from scheduling.lamps import LampsOptions
from scheduling.length_model import evaluate
from scheduling.profile import PAPERS_DEVICE_MEMORY_GIB, capped, load_profile

TRACES = ("builtin:mixed-onecall", "builtin:mixed")
FRACTIONS = (1.0, 1.5, 2.0, 2.5)
# (label, policy, LAMPS options); "learned" gets the trained length model's path at run time.
VARIANTS = (
    ("infercept", "infercept", None),
    ("lamps", "lamps", {}),
    ("lamps 20% error", "lamps", {"prediction_error": 0.2}),
    ("lamps 60% error", "lamps", {"prediction_error": 0.6}),
    ("lamps learned lengths", "lamps", {"length_predictor": "learned"}),
    ("lamps tool-mean durations", "lamps", {"duration_predictor": "tool-mean"}),
    ("lamps no starvation guard", "lamps", {"starvation_threshold": None}),
)


def workload_name(trace_spec: str) -> str:
    """A builtin's name, a file's name without its directory."""
    return trace_spec.removeprefix("builtin:") if trace_spec.startswith("builtin:") else os.path.basename(trace_spec)


@functools.lru_cache(maxsize=None)
def load_once(trace_spec: str, tokenizer: str) -> dict:
    """A worker loads (and tokenizes) each trace once, not once per run."""
    return resolve_trace(trace_spec, tokenizer)


def run_one(task: tuple) -> dict:
    profile_name, device_memory_gb, trace_spec, tokenizer, qps, window, seed, label, policy, options = task
    profile, pool = capped(load_profile(profile_name), device_memory_gb)
    trace = load_once(trace_spec, tokenizer)
    arrivals = sample_arrivals(trace, qps, window, seed)
    engine = simulated_engine(profile, policy, lamps=LampsOptions(**(options or {})))
    start = time.perf_counter()
    metrics = replay(engine, arrivals, window)
    return {"variant": label, "policy": policy, "workload": workload_name(trace_spec), "trace": trace_spec,
            "qps": qps, "profile": profile_name, "device_memory_gb": device_memory_gb or None, "device_pool": pool,
            "window_s": window, "seed": seed, "lamps_options": options,
            "sim_seconds": time.perf_counter() - start,
            "starvation_quanta": getattr(engine.scheduler.policy, "quanta_granted", None), **metrics}


def uses_learned_lengths(options: dict | None) -> bool:
    """The variant predicts lengths with the length model the study trains."""
    return (options or {}).get("length_predictor") == "learned"


def train_length_model(path: str) -> dict:
    """Fit the length model on a trace the study does not replay; returns its held-out accuracy."""
    model, _, held_out = fit_length_model(generate_workload("mixed", 2000, seed=1))
    model.save(path)
    return evaluate(model, *segment_examples(held_out))


def change(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "–"
    return f"{100 * (value - base) / base:+.0f}%"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def format_table(results: list[dict]) -> str:
    head = ("| workload | req/s | variant | finished | e2e mean s | vs infercept | e2e P99 s | vs infercept | "
            "TTFT mean s | vs infercept | TTFT P99 s | longest wait s | quanta | host ms/step |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        base = next(b for b in results if b["variant"] == "infercept" and b["workload"] == r["workload"]
                    and b["qps"] == r["qps"])
        e2e, ttft, be2e, bttft = r["e2e"], r["ttft"], base["e2e"], base["ttft"]
        lines.append(
            f"| {r['workload']} | {r['qps']:.2f} | {r['variant']} | {r['num_finished']}/{r['num_submitted']} | "
            f"{e2e['mean']:.1f} | {change(e2e['mean'], be2e['mean'])} | {e2e['p99']:.0f} | "
            f"{change(e2e['p99'], be2e['p99'])} | {ttft['mean']:.2f} | {change(ttft['mean'], bttft['mean'])} | "
            f"{ttft['p99']:.2f} | {r['longest_wait_s']:.0f} | {_count(r['starvation_quanta'])} | "
            f"{1000 * r['sim_seconds'] / max(r['steps'], 1):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="a100-gptj-6b", help="profile name or JSON file (default a100-gptj-6b)")
    parser.add_argument("--device-memory-gb", type=float, default=PAPERS_DEVICE_MEMORY_GIB,
                        help="GiB of memory per GPU, the device pool sized from it "
                        f"(default {PAPERS_DEVICE_MEMORY_GIB:g}, as the papers ran; 0: the profile's own pool)")
    parser.add_argument("--trace", action="append", help="builtin:NAME or a trace file; repeat for several "
                        f"(default: {', '.join(TRACES)})")
    add_tokenizer_argument(parser)
    parser.add_argument("--fraction", action="append", type=float,
                        help=f"rate as a fraction of capacity; repeat for several (default {FRACTIONS})")
    parser.add_argument("--window", type=float, default=600.0, help="seconds of arrivals per run (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rerank-interval", type=int, action="append", default=[],
                        help="also run LAMPS re-scoring only every K steps; repeat for several")
    parser.add_argument("--starvation-threshold", type=int, action="append", default=[],
                        help="also run LAMPS with this starvation threshold (steps); repeat for several")
    parser.add_argument("--swapped-first", action="store_true",
                        help="also run LAMPS serving swapped requests before waiting ones")
    parser.add_argument("--variant", action="append", choices=[label for label, _, _ in VARIANTS],
                        help="run only these of the standard variants; repeat for several (default all; "
                        "infercept is always run, as the baseline)")
    parser.add_argument("--workers", type=int, default=2, help="processes; 1 runs everything in this one")
    parser.add_argument("--out", default="results/lamps_study")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "length_model.json")
    chosen = [v for v in VARIANTS if not args.variant or v[0] in args.variant or v[0] == "infercept"]
    accuracy = None
    if any(uses_learned_lengths(options) for _, _, options in chosen):
        accuracy = train_length_model(model_path)
        print(f"length model (trained on generated mixed, seed 1): held-out MAE {accuracy['mae_tokens']:.1f} tokens "
              f"(constant mean: {accuracy['baseline_mae_tokens']:.1f}), exact bin {accuracy['bin_accuracy']:.0%}")
    profile, pool = capped(load_profile(args.profile), args.device_memory_gb)
    tasks = []
    for trace_spec in args.trace or TRACES:
        capacity = capacity_rps(profile, load_once(trace_spec, args.tokenizer))
        for fraction in args.fraction or FRACTIONS:
            qps = round(capacity * fraction, 2)
            extra = [(f"lamps rerank every {k}", "lamps", {"rerank_interval": k}) for k in args.rerank_interval]
            extra += [(f"lamps starvation threshold {k}", "lamps", {"starvation_threshold": k})
                      for k in args.starvation_threshold]
            extra += [("lamps swapped first", "lamps", {"swapped_first": True})] if args.swapped_first else []
            for label, policy, options in (*chosen, *extra):
                if uses_learned_lengths(options):
                    options = {**options, "length_predictor": model_path}
                tasks.append((args.profile, args.device_memory_gb, trace_spec, args.tokenizer, qps, args.window,
                              args.seed, label, policy, options))
    start = time.perf_counter()
    if args.workers == 1:
        results = [run_one(task) for task in tasks]
    else:
        with ProcessPoolExecutor(args.workers) as executor:
            results = list(executor.map(run_one, tasks))
    table = format_table(results)
    print(table)
    print(f"{len(results)} runs in {time.perf_counter() - start:.0f} s")
    with open(os.path.join(args.out, "lamps.md"), "w") as f:
        f.write(f"profile {args.profile} with {pool}, {args.window:g} s windows, seed {args.seed}\n\n{table}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"length_model_accuracy": accuracy, "runs": results}, f, indent=2)
    print(f"wrote {args.out}/lamps.md and {args.out}/results.json")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:       # a missing or malformed trace, an unknown profile
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)

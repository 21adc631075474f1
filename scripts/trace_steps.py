"""Trace a few decode steps of the engine with JAX's profiler and sum up where the device's time went.

A session lent a GPU has minutes of it; this leaves a timeline to study after the machine is gone:
the trace (`perfetto_trace.json.gz` under --out, for ui.perfetto.dev) and a summary read from it,
printed and written as JSON: each device lane's busy time inside the traced window (XLA's streams,
and its module and op lines), the kernels that took the most time, the wall time per step (also
of as many steps run just before without the profiler, whose Python tracing slows the host) and
the project's Python functions in the traced steps. B requests of ctx random tokens are
prefilled, a few decode steps compile and warm up, and then `--steps` decode steps of the whole
batch run, untraced and then under the profiler. The CPU backend has no device lanes: there only
the host's side means anything.

    python scripts/trace_steps.py --shape smollm2-1.7b --batch 64 --context 512     # on a GPU
    .venv/bin/python scripts/trace_steps.py --shape tiny --batch 2 --context 16 --steps 2
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np

from infercept_jax import LLM, SamplingParams
from infercept_jax.build import DEFAULT_TOKEN_BUDGET, DEFAULT_TOKEN_BUDGETS
from infercept_jax.experiments.records import machine_record, write_result
from infercept_jax.llm import resolve_dtype
from models.llama import Llama
from models.shapes import SHAPES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infercept_jax", "kvcache", "models", "scheduling")   # whose functions the host summary lists
WARM_STEPS = 3   # decode steps before the traced ones: the decode shape compiles in the first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-1.7b", choices=list(SHAPES), help="random weights of this shape")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on GPU/TPU (as the engine's dtype=auto)")
    p.add_argument("--batch", type=int, default=64, help="B: requests decoding together")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=5, help="decode steps traced")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"])
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--top", type=int, default=15, help="kernels, and host functions, listed")
    p.add_argument("--out", default="results/trace", help="folder for the trace and summary.json")
    return p.parse_args(argv)


def decode_ready_llm(args: argparse.Namespace) -> LLM:
    """An engine whose B requests are all past their prefill and warmed up on the decode shape.

    The first requests decode while the last ones prefill, so each may generate a token per step
    of the prefill (at most B*ctx / (S - B) + 1 steps: the decodes take their tokens of the budget
    S first) before the traced steps: it is allowed that many, so none finishes before the trace.
    Only the shapes the run uses compile (no warm-up of every shape: minutes of device time)."""
    spec = SHAPES[args.shape]
    budget = DEFAULT_TOKEN_BUDGETS.get(jax.default_backend(), DEFAULT_TOKEN_BUDGET)
    if budget <= args.batch:
        raise SystemExit(f"--batch must be below the step budget S = {budget}")
    prefill_steps = -(-args.batch * args.context // (budget - args.batch)) + 1
    max_tokens = prefill_steps + WARM_STEPS + 2 * args.steps + 2   # the steps run untraced, then traced
    max_len, block_size = args.context + max_tokens, 16
    llm = LLM.from_model(Llama(spec, dtype=resolve_dtype(args.dtype)), None, policy="preserve",
                         max_num_seqs=args.batch, max_num_batched_tokens=budget, max_model_len=max_len,
                         block_size=block_size, num_kv_blocks=args.batch * -(-max_len // block_size) + 1,
                         attention=args.attention, async_scheduling=args.async_scheduling,
                         warmup=False, strict_compile=False)   # + 1: the reserved block 0
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [llm.engine.add_request(rng.integers(3, spec.vocab_size, args.context).tolist(), params)
           for _ in range(args.batch)]
    generated = dict.fromkeys(ids, 0)
    while min(generated.values()) < 1:
        for out in llm.engine.step():
            generated[out.request_id] = out.num_generated_tokens
    for _ in range(WARM_STEPS):
        llm.engine.step()
    return llm


def timed_steps(llm: LLM, steps: int) -> tuple[list[float], list[int]]:
    """Run `steps` engine steps; returns their wall seconds and the number of requests each advanced."""
    seconds, advanced = [], []
    for _ in range(steps):
        start = time.perf_counter()
        advanced.append(len(llm.engine.step()))
        seconds.append(time.perf_counter() - start)
    return seconds, advanced


def trace_decode_steps(llm: LLM, steps: int, out_dir: str) -> tuple[list[float], list[int], str]:
    """`timed_steps` under the profiler; also returns the trace file."""
    trace_dir = os.path.join(out_dir, "profile")
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        seconds, advanced = timed_steps(llm, steps)
        jax.block_until_ready((llm.runner.k_pool, llm.runner.v_pool))
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    return seconds, advanced, path


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def host_functions(events: list[dict], top: int) -> list[dict]:
    """The project's Python functions, by inclusive time: the host side of a step. JAX's profiler
    names a Python call "$file.py:line name", the file by its base name alone, so a call is ours
    where one of our files of that name defines a function so named (JAX has a profiler.py too).
    The "$" alone marks them: the thread they run on is named after the interpreter's executable
    ("python" from the venv, "python3" on the GPU machine)."""
    ours = {(path.name, name) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
            for name in re.findall(r"def (\w+)", path.read_text())}
    calls: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or not e["name"].startswith("$"):
            continue
        where, _, function = e["name"][1:].partition(" ")
        if (where.split(":")[0], function) in ours:
            calls[e["name"][1:]].append(e["dur"])
    ranked = sorted(calls.items(), key=lambda item: -sum(item[1]))[:top]
    return [{"function": name, "calls": len(durations), "total_ms": sum(durations) / 1e3} for name, durations in ranked]


def summarize(trace_path: str, top: int) -> dict:
    """A perfetto trace's device lanes (each lane's event count and busy time, the traced window,
    and the `top` kernels of the stream lanes, XLA:GPU's "Stream #..." lines, by total time) and
    the project's `top` host functions."""
    with gzip.open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    host = host_functions(events, top)
    device = {pid for pid, name in processes.items() if name.startswith("/device:")}
    lanes: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e["pid"] in device:
            lanes[processes[e["pid"]], threads.get((e["pid"], e.get("tid")), str(e.get("tid")))].append(e)
    if not lanes:
        return {"window_ms": None, "lanes": [], "top": [], "host": host}
    spans = [(e["ts"], e["ts"] + e["dur"]) for lane in lanes.values() for e in lane]
    window = max(end for _, end in spans) - min(start for start, _ in spans)
    kernels: dict[str, list[float]] = defaultdict(list)
    for (_, lane), lane_events in lanes.items():
        if lane.startswith("Stream"):
            for e in lane_events:
                kernels[e["name"]].append(e["dur"])
    stream_busy = busy_us([(e["ts"], e["ts"] + e["dur"]) for (_, lane), lane_events in lanes.items()
                           if lane.startswith("Stream") for e in lane_events])
    ranked = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "window_ms": window / 1e3,
        "lanes": [{"process": process, "lane": lane, "events": len(lane_events),
                   "busy_ms": busy_us([(e["ts"], e["ts"] + e["dur"]) for e in lane_events]) / 1e3}
                  for (process, lane), lane_events in sorted(lanes.items())],
        "top": [{"kernel": name, "count": len(durations), "total_ms": sum(durations) / 1e3,
                 "share_of_streams": sum(durations) / stream_busy if stream_busy else None}
                for name, durations in ranked],
        "host": host,
    }


def print_summary(untraced: list[float], traced: list[float], summary: dict, steps: int) -> None:
    for label, seconds in (("untraced", untraced), ("traced (Python tracing slows the host)", traced)):
        print(f"wall per step, {label}: median {1e3 * float(np.median(seconds)):.2f} ms "
              f"({', '.join(f'{1e3 * s:.2f}' for s in seconds)})")
    print("| host function (this project's, inclusive) | calls | ms per step |\n|---|---:|---:|")
    for f in summary["host"]:
        print(f"| {f['function']} | {f['calls']} | {f['total_ms'] / steps:.3f} |")
    if summary["window_ms"] is None:
        print("no device lanes in the trace (the CPU backend has none)")
        return
    print(f"device window: {summary['window_ms']:.2f} ms for {steps} steps")
    print("| process | lane | events | busy ms | busy per step ms |\n|---|---|---:|---:|---:|")
    for lane in summary["lanes"]:
        print(f"| {lane['process']} | {lane['lane']} | {lane['events']} | {lane['busy_ms']:.2f} | "
              f"{lane['busy_ms'] / steps:.3f} |")
    if not summary["top"]:
        print("no lane named Stream... among the device lanes, so no kernels ranked: the trace has them")
        return
    print("| kernel | count | total ms | share of stream time |\n|---|---:|---:|---:|")
    for k in summary["top"]:
        share = f"{100 * k['share_of_streams']:.1f} %" if k["share_of_streams"] is not None else "-"
        print(f"| {k['kernel'][:80]} | {k['count']} | {k['total_ms']:.3f} | {share} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_record()
    llm = decode_ready_llm(args)
    print(f"engine ready: B={args.batch}, ctx={args.context}, attention: {llm.config.attention}, "
          f"async scheduling: {llm.config.async_scheduling}", flush=True)
    untraced, _ = timed_steps(llm, args.steps)   # the profiler's Python tracing slows the host's side
    step_seconds, advanced, trace_path = trace_decode_steps(llm, args.steps, args.out)
    summary = summarize(trace_path, args.top)
    print_summary(untraced, step_seconds, summary, args.steps)
    write_result(os.path.join(args.out, "summary.json"), {
        **machine, "args": vars(args), "attention": llm.config.attention, "trace": trace_path,
        "untraced_step_ms": [1e3 * s for s in untraced],
        "step_ms": [1e3 * s for s in step_seconds], "requests_per_step": advanced, **summary}, started)
    print(f"trace: {trace_path}")


if __name__ == "__main__":
    main()

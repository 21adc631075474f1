"""Trace replay: the reference benchmark loop (spec 1.3) and its metrics (spec 5.1).

Requests are sampled with replacement from the trace (`4 * qps * window` of them), arrive as a
Poisson process (the first `int(qps) + 1` at t = 0), and follow their segments: generate N tokens,
pause T seconds, receive R tokens, repeat. A call on the last segment is made too, as the
reference makes it, and one token is sampled after its result. Prompts and results are token 0,
as the reference's `[0] * n`. Tool calls are timers. The loop runs until the window closes
(unfinished requests are not drained) or until every arrival has finished.

The same loop drives the real engine (wall clock; it sleeps while only timers are pending) and the
simulator (virtual clock; it jumps to the next event).
"""
from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass

import numpy as np

from infercept_jax.config import SamplingParams
from infercept_jax.engine import Engine
from infercept_jax.experiments.simulator import VirtualClock
from infercept_jax.experiments.workload import Segment, TraceRequest
from scheduling.request import Request, SegmentHint


def sample_arrivals(trace: dict[str, TraceRequest], qps: float, window: float,
                    seed: int = 0) -> list[tuple[float, TraceRequest]]:
    """(arrival time, request) pairs inside the window, as the reference benchmark draws them: the
    same seed picks the same requests, so the keys are drawn in the trace's (the file's) order, and
    every request draws its gap, so request k arrives at the sum of gaps 0..k, the first
    `int(qps) + 1` of them at t = 0 all the same."""
    if qps <= 0 or window <= 0:
        raise ValueError(f"qps and window must be > 0, got {qps} and {window}")
    if not trace:
        raise ValueError("the trace has no requests to sample")
    keys = random.Random(seed).choices(list(trace), k=max(1, int(4 * qps * window)))
    rng = np.random.default_rng(seed)
    arrivals, t = [], 0.0
    for i, key in enumerate(keys):
        t += rng.exponential(1.0 / qps)
        arrival = 0.0 if i <= int(qps) else t
        if arrival >= window:
            break
        arrivals.append((arrival, trace[key]))
    return arrivals


def replayed_segments(request: TraceRequest) -> tuple[Segment, ...]:
    """The request's segments, with at least one token to sample after its last call: the
    reference makes that call (its `max_tokens` counts the call's result, so the request has not
    reached it), then samples once more before it stops at `max_tokens`. Here results do not
    count against `max_tokens`, so a call on the last segment gets a one-token segment after it,
    and a last segment of 0 tokens becomes one of a token (after a call, the call's trigger token
    would otherwise reach `max_tokens` first; alone, it is the one token a request samples)."""
    segments = request.segments
    if segments[-1].has_call:
        return segments + (Segment(1),)
    if segments[-1].completion_tokens == 0:
        return segments[:-1] + (Segment(1),)
    return segments


def generated_tokens(request: TraceRequest) -> int:
    """Tokens the request samples in all (a call segment samples at least the one that calls)."""
    return sum(max(1, s.completion_tokens) for s in replayed_segments(request))


def segment_params(request: TraceRequest, index: int) -> SamplingParams:
    """The trigger of segment `index`: pause after its completion tokens if it ends in a call."""
    segment = replayed_segments(request)[index]
    return SamplingParams(max_tokens=generated_tokens(request), temperature=0.0, ignore_eos=True,
                          intercept_after=max(1, segment.completion_tokens) if segment.has_call else None)


def segment_hint(request: TraceRequest, index: int, time_scale: float = 1.0) -> SegmentHint:
    """What the trace knows of segment `index`'s call (the oracle): its duration, its result's
    length, and its tool, named after the request's workload kind; empty if it ends without one."""
    segment = replayed_segments(request)[index]
    if not segment.has_call:
        return SegmentHint()
    return SegmentHint(call_duration=segment.api_time * time_scale, result_tokens=segment.api_token_length,
                       tool=request.kind)


@dataclass
class _Live:
    trace_request: TraceRequest
    request: Request
    segment: int = 0


def replay(engine: Engine, arrivals: list[tuple[float, TraceRequest]], window: float, *,
           time_scale: float = 1.0, token_id: int = 0, progress=None) -> dict:
    """Run the arrivals through `engine` for `window` seconds of its clock; returns the metrics."""
    clock = engine.clock
    virtual = isinstance(clock, VirtualClock)
    t0 = clock()
    pending = list(arrivals)
    pending.reverse()
    timers: list[tuple[float, int, str]] = []      # (due, tie-break, request id)
    live: dict[str, _Live] = {}
    submitted: list[Request] = []
    rejected = 0
    while True:
        now = clock() - t0
        if now >= window:
            break
        while pending and pending[-1][0] <= now:
            _, trace_request = pending.pop()
            prompt = [token_id] * max(1, trace_request.prompt_tokens)
            try:
                rid = engine.add_request(prompt, segment_params(trace_request, 0),
                                         hint=segment_hint(trace_request, 0, time_scale))
            except ValueError:          # a prompt this engine cannot hold (context or pool too small)
                rejected += 1
                if progress is not None:
                    progress.update(1)
                continue
            live[rid] = _Live(trace_request, engine.requests[rid])
            submitted.append(live[rid].request)
        while timers and timers[0][0] <= now:
            _, _, rid = heapq.heappop(timers)
            entry = live[rid]
            segment = replayed_segments(entry.trace_request)[entry.segment]
            entry.segment += 1      # a next one exists: a call is never the last replayed segment
            out = engine.resume(rid, [token_id] * (segment.api_token_length or 0),
                                segment_params(entry.trace_request, entry.segment),
                                segment_hint(entry.trace_request, entry.segment, time_scale))
            if out.finished:
                _retire(engine, live, rid, progress)
        steps = engine.num_steps
        if engine.has_work():
            for out in engine.step():
                if out.paused:
                    call = out.interception
                    heapq.heappush(timers, (call.start_time - t0 + (call.expected_duration or 0.0),
                                            len(submitted) + len(timers), out.request_id))
                elif out.finished:
                    _retire(engine, live, out.request_id, progress)
        if engine.num_steps == steps:       # nothing could run: wait for the next arrival or result
            upcoming = [t for t in (pending[-1][0] if pending else None, timers[0][0] if timers else None)
                        if t is not None]
            if not upcoming:
                break
            wake = min(min(upcoming), window)
            if virtual:
                clock.now = max(clock.now, t0 + wake)
            else:
                time.sleep(max(0.0, min(wake - (clock() - t0), 0.05)))
    return {**replay_metrics(submitted, t0, clock() - t0, engine), "num_rejected": rejected}


def _retire(engine: Engine, live: dict[str, _Live], rid: str, progress) -> None:
    del live[rid]
    engine.pop_finished(rid)
    if progress is not None:
        progress.update(1)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def replay_metrics(requests: list[Request], t0: float, elapsed: float, engine: Engine) -> dict:
    """Spec 5.1, with API-returned tokens left out of the generated-token denominators.

    A request unfinished when the run ends counts with end = run end (normalized latency) and is
    left out of the end-to-end latency; time in tool calls is clipped to [arrival, end].
    `longest_wait_s` is the longest any request waited for its first token, counting those still
    waiting at the end (a starved request has no TTFT to show in the percentiles).
    """
    normalized, ttft, e2e, time_per_token = [], [], [], []
    finished = tokens = 0
    longest_wait = 0.0      # arrival to first token, or to the run's end for a request still without one
    for r in requests:
        start = r.arrival_time - t0
        end = (r.finish_time - t0) if r.finish_time is not None else elapsed
        api = sum(max(0.0, min(c.end_time - t0 if c.end_time is not None else elapsed, end) - max(c.start_time - t0, start))
                  for c in r.interceptions)
        tokens += r.num_tokens
        if r.num_generated_tokens:
            normalized.append((end - start - api) / r.num_generated_tokens)
        longest_wait = max(longest_wait, (r.first_token_time - t0 if r.first_token_time is not None else elapsed) - start)
        if r.first_token_time is not None:
            first = r.first_token_time - t0
            ttft.append(first - start)
            if r.num_generated_tokens:
                time_per_token.append((end - first - api) / r.num_generated_tokens)
        if r.finish_time is not None:
            finished += 1
            e2e.append(end - start)
    waste = engine.waste.summary()
    return {
        "num_submitted": len(requests), "num_finished": finished, "elapsed_s": elapsed,
        "normalized_latency": _stats(normalized), "ttft": _stats(ttft), "e2e": _stats(e2e),
        "tpot": _stats(time_per_token), "longest_wait_s": longest_wait,
        "completed_rps": finished / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "memory_waste_pct": waste["waste_total_pct"],
        "waste_preserve_pct": waste["waste_preserve_pct"], "waste_preserve_short_pct": waste["waste_preserve_short_pct"],
        "waste_recompute_pct": waste["waste_recompute_pct"],
        "waste_swap_stall_pct": waste["waste_swap_stall_pct"],
        "recompute_tokens": waste["recompute_tokens"], "swap_out_blocks": waste["swap_out_blocks"],
        "swap_in_blocks": waste["swap_in_blocks"], "steps": engine.num_steps,
    }

"""Trace replay in the simulator: metrics on a hand-made run, determinism, no lost request, the CLI."""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import FakeRunner, engine_with, requires_smollm2
from infercept_jax import SamplingParams
from infercept_jax.cli import build_parser, main
from infercept_jax.experiments import replay as replay_module
from infercept_jax.experiments import sweeps as sweeps_module
from infercept_jax.experiments.replay import (_stats, generated_tokens, replay, sample_arrivals, segment_hint,
                                              segment_params)
from infercept_jax.experiments.simulator import simulated_engine
from infercept_jax.experiments.sweeps import builtin_trace, format_table, lamps_options, run_replays, simulated_engines
from infercept_jax.experiments.workload import Segment, TraceRequest, generate_workload, load_trace
from scheduling.lamps import LampsOptions
from scheduling.profile import PAPER_PROFILES, HardwareProfile
from scheduling.request import SegmentHint

# Every step takes 0.1 s whatever its size; plenty of memory.
REPO = Path(__file__).resolve().parent.parent
FLAT = HardwareProfile(name="flat", fwd_ms_per_token=0.0, fwd_base_ms=100.0, saturation_tokens=64,
                       swap_limit_tokens=64.0, kv_bytes_per_token=1, block_size=4,
                       num_device_blocks=64, num_host_blocks=64)


def engine_at(t0: float, policy: str = "preserve", profile: HardwareProfile = FLAT, **options):
    """A simulated engine whose clock reads `t0` when the replay starts: the metrics are relative to it."""
    engine = simulated_engine(profile, policy, **options)
    engine.clock.now = t0
    return engine


@pytest.mark.parametrize("t0", [0.0, 50.0])
def test_metrics_of_a_hand_made_two_request_run(t0):
    a = TraceRequest("a", 4, (Segment(2, api_time=1.0, api_token_length=3), Segment(2)))
    b = TraceRequest("b", 4, (Segment(3),))
    engine = engine_at(t0)
    m = replay(engine, [(0.0, a), (0.0, b)], window=100.0)
    # step 1 (0 -> 0.1): both prompts, first tokens; step 2 (-> 0.2): a pauses after 2 tokens;
    # step 3 (-> 0.3): b's third token, b finishes; the clock jumps to a's result at 1.2;
    # steps 4-5 (-> 1.4): a computes 1 + 3 in-flight tokens, then its 4th token, a finishes.
    # a: (1.4 - 0 - 1.0 in the call) / 4 generated = 0.1; b: 0.3 / 3 = 0.1
    assert m["num_submitted"] == m["num_finished"] == 2
    assert m["normalized_latency"]["mean"] == pytest.approx(0.1)
    assert m["ttft"]["mean"] == pytest.approx(0.1)
    assert m["e2e"]["mean"] == pytest.approx((1.4 + 0.3) / 2)
    assert m["elapsed_s"] == pytest.approx(1.4)
    assert m["completed_rps"] == pytest.approx(2 / 1.4)
    # a holds 4 + 2 + 3 + 2 tokens at the end (the 3 returned are not generated), b 4 + 3
    assert m["tokens_per_s"] == pytest.approx(18 / 1.4)
    assert m["steps"] == 5
    assert m["longest_wait_s"] == pytest.approx(0.1)


@pytest.mark.parametrize("t0", [0.0, 50.0])
def test_longest_wait_counts_requests_that_never_got_a_token(t0):
    big = TraceRequest("big", 200, (Segment(2),))        # 50 steps of prefill at 4 tokens per step
    engine = engine_at(t0, profile=dataclasses.replace(FLAT, saturation_tokens=4))
    m = replay(engine, [(0.0, big), (0.5, big)], window=2.0)
    assert m["ttft"]["mean"] is None                     # nobody got a first token in 2 s ...
    assert m["longest_wait_s"] == pytest.approx(2.0)     # ... and the first waited the whole run


def test_arrivals_follow_the_reference_sampler():
    trace = generate_workload("qa", 10, seed=0)
    arrivals = sample_arrivals(trace, qps=2.0, window=30.0, seed=1)
    times = [t for t, _ in arrivals]
    assert times[:3] == [0.0, 0.0, 0.0] and times[3] > 0     # the first int(qps) + 1 at t = 0
    assert times == sorted(times) and times[-1] < 30.0
    assert 30 < len(arrivals) < 100                            # about qps * window
    assert sample_arrivals(trace, 2.0, 30.0, seed=1) == arrivals
    assert sample_arrivals(trace, 2.0, 30.0, seed=2) != arrivals


def test_simulated_replay_is_deterministic_and_loses_no_request():
    trace = builtin_trace("mixed")
    profile = PAPER_PROFILES["a100-gptj-6b"]
    runs = [run_replays(trace, simulated_engines(profile), ["discard", "infercept"], [3.0], window=40.0,
                        show_progress=False) for _ in range(2)]
    assert runs[0] == runs[1]
    engine = simulated_engines(profile)("infercept")
    arrivals = sample_arrivals(trace, 3.0, 40.0, seed=0)
    m = replay(engine, arrivals, window=40.0)
    assert m["num_submitted"] == len(arrivals)
    assert m["num_finished"] < m["num_submitted"]                 # the window cut some off ...
    assert m["num_finished"] + len(engine.requests) == m["num_submitted"]   # ... and they are still there
    assert all(not r.status.finished for r in engine.requests.values())
    engine.blocks.check_invariants()
    assert "| infercept | 3 |" in format_table(runs[0])


def test_replay_cli_writes_results_and_plots(tmp_path):
    trace = tmp_path / "trace.json"
    assert main(["workload", "--kind", "math", "--n", "30", "-o", str(trace)]) == 0
    out = tmp_path / "out"
    assert main(["replay", "--trace", str(trace), "--simulate", "--profile", "a100-gptj-6b", "--policy", "discard",
                 "--policy", "infercept", "--qps", "1", "--qps", "2", "--window", "20", "--out", str(out),
                 "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["policy"], r["qps"]) for r in results] == [("discard", 1.0), ("infercept", 1.0),
                                                          ("discard", 2.0), ("infercept", 2.0)]
    for key in ("num_submitted", "num_finished", "completed_rps", "tokens_per_s", "memory_waste_pct",
                "recompute_tokens", "swap_out_blocks", "swap_in_blocks"):
        assert key in results[0]
    for key in ("normalized_latency", "ttft", "e2e"):
        assert set(results[0][key]) == {"mean", "p50", "p90", "p99"}
    assert (out / "latency_vs_rate.png").stat().st_size > 0 and (out / "memory_waste.png").stat().st_size > 0
    assert main(["replay", "--trace", str(trace), "--simulate", "--out", str(out)]) == 2    # no profile


def test_prompts_the_engine_cannot_hold_are_counted_not_fatal():
    big = TraceRequest("big", 500, (Segment(2),))        # 500 tokens: more than the 64 blocks of 4
    small = TraceRequest("small", 4, (Segment(2),))
    engine = simulated_engine(FLAT, "preserve")
    m = replay(engine, [(0.0, big), (0.0, small)], window=10.0)
    assert m["num_rejected"] == 1 and m["num_submitted"] == m["num_finished"] == 1


def test_a_budget_without_a_profile_caps_the_measured_one_and_then_gives_way_to_it(tmp_path, monkeypatch):
    """On the real engine, --max-num-batched-tokens with no --profile: the profile measured first
    sweeps up to that budget and its S (the knee, here 256) runs the engines; passing both to the
    engines was refused, since they disagree."""
    measured, built = [], []

    def measure(model, path, **options):
        measured.append(options)
        return dataclasses.replace(FLAT, saturation_tokens=256)

    def engines(model, estimator, **options):
        built.append(options)
        return lambda policy: engine_at(0.0, policy)
    monkeypatch.setattr(sweeps_module, "measure_here", measure)
    monkeypatch.setattr(sweeps_module, "real_engines", engines)
    assert main(["replay", "--trace", "builtin:math-small", "--policy", "infercept", "--qps", "1", "--window", "2",
                 "--max-num-batched-tokens", "384", "--out", str(tmp_path), "--quiet"]) == 0
    assert measured[0]["max_num_batched_tokens"] == 384
    assert "max_num_batched_tokens" not in built[0] and built[0]["profile"] == str(tmp_path / "profile.json")


def test_lamps_replay_options_reach_the_policy(tmp_path):
    """The robustness study is one command: --prediction-error changes LAMPS's decisions, and the
    same command gives the same numbers again."""
    def run(*extra):
        out = tmp_path / "_".join(extra or ("oracle",))
        assert main(["replay", "--trace", "builtin:mixed-onecall", "--simulate", "--profile", "a100-gptj-6b",
                     "--policy", "lamps", "--qps", "8", "--window", "30", "--out", str(out), "--quiet", *extra]) == 0
        return json.loads((out / "results.json").read_text())[0]

    oracle, noisy = run(), run("--prediction-error", "0.6")
    assert oracle["policy"] == "lamps" and oracle["num_finished"] > 0
    assert noisy["ttft"] != oracle["ttft"]
    assert run("--prediction-error", "0.6")["ttft"] == noisy["ttft"]
    assert main(["replay", "--trace", "builtin:mixed", "--simulate", "--profile", "a100-gptj-6b", "--policy", "lamps",
                 "--prediction-error", "-1", "--out", str(tmp_path / "bad"), "--quiet"]) == 2


def test_onecall_builtin_traces_have_exactly_one_call_per_request():
    trace = builtin_trace("mixed-onecall")
    assert len(trace) == 400 and all(r.num_calls == 1 and len(r.segments) == 2 for r in trace.values())
    with pytest.raises(ValueError, match="onecall"):
        builtin_trace("nonsense-onecall")


def test_every_lamps_option_is_a_replay_flag_with_its_default():
    parser = build_parser()
    base = ["replay", "--trace", "builtin:mixed", "--out", "x"]
    assert lamps_options(parser.parse_args(base)) == LampsOptions()
    args = parser.parse_args([*base, "--length-predictor", "m.json", "--duration-predictor", "tool-mean",
                              "--prediction-error", "0.2", "--starvation-threshold", "0", "--starvation-quantum", "5",
                              "--rerank-interval", "3", "--swapped-first"])
    assert lamps_options(args) == LampsOptions(length_predictor="m.json", duration_predictor="tool-mean",
                                               prediction_error=0.2, starvation_threshold=None, starvation_quantum=5,
                                               rerank_interval=3, swapped_first=True)
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--duration-predictor", "psychic"])


@pytest.mark.parametrize("t0", [0.0, 50.0])
def test_tpot_counts_from_the_first_token_without_the_call_time(t0):
    """Spec 5.1: TPOT = (end - first token - time in calls) / generated tokens."""
    a = TraceRequest("a", 4, (Segment(2, api_time=1.0, api_token_length=3), Segment(2)))
    b = TraceRequest("b", 4, (Segment(3),))
    m = replay(engine_at(t0), [(0.0, a), (0.0, b)], window=100.0)
    # the run of test_metrics_of_a_hand_made_two_request_run: both first tokens at 0.1;
    # a ends at 1.4 after 1.0 s in its call, 4 generated: (1.4 - 0.1 - 1.0) / 4 = 0.075
    # b ends at 0.3, 3 generated: (0.3 - 0.1) / 3
    assert m["tpot"]["mean"] == pytest.approx((0.075 + 0.2 / 3) / 2)
    assert m["tpot"]["p50"] == pytest.approx((0.075 + 0.2 / 3) / 2)


@pytest.mark.parametrize("qps, window", [(1.0, 10.0), (0.1, 20.0)])
@pytest.mark.parametrize("seed", range(10))
def test_the_sample_covers_the_window(seed, qps, window):
    """4 * qps * window keys (spec 1.3) outlast the window: the same draw over a longer window adds
    arrivals only after the first window's end (had the keys run out, it would add some inside).
    At 0.1 qps for 20 s, 8 keys for about 3 arrivals: half as many keys run out for some seeds."""
    trace = generate_workload("qa", 10, seed=0)
    short = sample_arrivals(trace, qps=qps, window=window, seed=seed)
    longer = sample_arrivals(trace, qps=qps, window=100 * window, seed=seed)
    assert short == [(t, r) for t, r in longer if t < window]
    assert len(longer) > len(short)


# ------------------------------------------------------------------ the trace's requests, one segment at a time
TWO_CALLS = TraceRequest("r", 4, (Segment(0, api_time=3.0, api_token_length=7), Segment(5, api_time=0.5, api_token_length=2),
                                  Segment(0)), kind="math")


def test_generated_tokens_count_one_for_a_call_right_after_the_prompt_and_one_after_the_last_call():
    assert generated_tokens(TWO_CALLS) == 1 + 5 + 1
    assert generated_tokens(TraceRequest("r", 4, (Segment(2, api_time=1.0, api_token_length=1), Segment(0)))) == 3
    assert generated_tokens(TraceRequest("empty", 4, (Segment(0),))) == 1     # a request samples something


def test_segment_params_greedy_no_eos_and_pause_after_the_segments_tokens():
    """Spec 1.3 item 2: temperature 0, ignore_eos; the pause comes after the segment's completion
    tokens (at least the one token that makes the call)."""
    assert segment_params(TWO_CALLS, 0) == SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True,
                                                          intercept_after=1)
    assert segment_params(TWO_CALLS, 1).intercept_after == 5
    assert segment_params(TWO_CALLS, 2) == SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)


def test_segment_hint_is_the_traces_call_scaled_in_time():
    assert segment_hint(TWO_CALLS, 0) == SegmentHint(call_duration=3.0, result_tokens=7, tool="math")
    assert segment_hint(TWO_CALLS, 1, time_scale=4.0) == SegmentHint(call_duration=2.0, result_tokens=2, tool="math")
    assert segment_hint(TWO_CALLS, 2) == SegmentHint()      # no call after the last segment


# ------------------------------------------------------------------ the arrival sampler (spec 1.3 items 1 and 3)
def test_sample_arrivals_defaults_to_seed_0_and_refuses_a_zero_rate_or_window():
    trace = generate_workload("qa", 10, seed=0)
    assert sample_arrivals(trace, 2.0, 30.0) == sample_arrivals(trace, 2.0, 30.0, seed=0)
    assert sample_arrivals(trace, 0.5, 0.5)          # rates and windows below 1 are fine
    for qps, window in [(0.0, 10.0), (1.0, 0.0), (-1.0, 10.0), (1.0, -1.0)]:
        with pytest.raises(ValueError):
            sample_arrivals(trace, qps, window)


def test_sample_arrivals_draws_the_requests_the_reference_draws_from_the_files_order(tmp_path):
    keys = ["7_2", "25", "13_2", "100", "3", "16_2", "b", "a"]          # deliberately not sorted
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({key: [{"prompt_tokens": 4, "completion_tokens": 2}] for key in keys}))
    qps, window, seed = 2.0, 3.0, 5
    # The reference (spec 1.3): random.seed(seed); random.choices(keys, k=4 * qps * window), keys as json.load gives them.
    state = random.getstate()
    random.seed(seed)
    with open(path) as f:
        expected = random.choices(list(json.load(f)), k=int(4 * qps * window))
    random.setstate(state)
    drawn = [request.key for _, request in sample_arrivals(load_trace(path), qps, window, seed)]
    assert drawn == expected[:len(drawn)] and len(drawn) >= 3


def test_sample_arrivals_refuses_an_empty_trace():
    with pytest.raises(ValueError, match="the trace has no requests to sample"):
        sample_arrivals({}, 1.0, 10.0)


@pytest.mark.parametrize("script, extra", [("replay_trace.py", ["--simulate", "--profile", "a100-gptj-6b"]),
                                           ("compare_hardware.py", ["--profile", "a100-gptj-6b"]),
                                           ("lamps_study.py", [])])
def test_the_study_scripts_answer_a_missing_trace_with_a_message_not_a_traceback(tmp_path, script, extra):
    missing = str(tmp_path / "missing.json")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--trace", missing, *extra,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"No such file or directory: '{missing}'" in done.stderr


def test_replay_and_predictor_cli_refuse_an_empty_trace_file(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text("{}")
    assert main(["replay", "--trace", str(path), "--simulate", "--profile", "a100-gptj-6b",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "error: the trace has no requests" in capsys.readouterr().err
    assert main(["predictor", "--trace", str(path), "-o", str(tmp_path / "model.json")]) == 2
    assert "the trace has no requests" in capsys.readouterr().err


def test_sample_arrivals_draws_4_qps_window_keys_and_at_least_one():
    """At 100 req/s the first 101 arrive at t = 0, so every drawn key is an arrival."""
    trace = generate_workload("qa", 10, seed=0)
    assert [t for t, _ in sample_arrivals(trace, qps=100.0, window=0.01)] == [0.0] * 4
    assert [t for t, _ in sample_arrivals(trace, qps=100.0, window=0.002)] == [0.0]


def test_every_request_draws_its_gap_the_first_ones_too():
    """The reference draws a gap for every request and adds the first int(qps) + 1 at t = 0 all
    the same: request k arrives at the sum of gaps 0..k, so the fourth at qps 2 waits four gaps."""
    trace = generate_workload("qa", 10, seed=0)
    gaps = np.random.default_rng(3).exponential(1 / 2.0, 20)
    times = [t for t, _ in sample_arrivals(trace, qps=2.0, window=1000.0, seed=3)][:20]
    assert times[:3] == [0.0] * 3
    assert times[3:] == pytest.approx(np.cumsum(gaps)[3:].tolist())


def test_sample_arrivals_gaps_average_one_over_the_rate():
    trace = generate_workload("qa", 10, seed=0)
    times = [t for t, _ in sample_arrivals(trace, qps=2.0, window=500.0)]
    gaps = [b - a for a, b in zip(times[2:], times[3:])]          # after the three at t = 0
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.1)


# ------------------------------------------------------------------ the replay loop
class Progress:
    """Stands in for a tqdm bar: counts the requests that are done with (finished or rejected)."""

    def __init__(self):
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


def spy_on_resumes(engine) -> list[tuple]:
    """Record each resume the loop makes: (request id, result tokens, the next trigger, the next hint)."""
    resumes, resume = [], engine.resume

    def recording(rid, result, params=None, hint=None):
        resumes.append((rid, len(result), params.intercept_after, hint))
        return resume(rid, result, params, hint)

    engine.resume = recording
    return resumes


def test_replay_resumes_each_call_with_its_result_and_the_next_segment():
    """Three segments, the calls' durations doubled: the first, a 0 s call, comes back at once with
    3 tokens and installs segment 1's trigger (3 tokens) and oracle; the second returns nothing
    and installs the last segment's (no trigger, no hint)."""
    r = TraceRequest("r", 4, (Segment(2, api_time=0.0, api_token_length=3), Segment(3, api_time=0.5, api_token_length=0),
                              Segment(4)), kind="qa")
    engine = engine_at(10.0)
    resumes = spy_on_resumes(engine)
    progress = Progress()
    m = replay(engine, [(0.0, r)], window=100.0, time_scale=2.0, progress=progress)
    assert resumes == [("req-0", 3, 3, SegmentHint(call_duration=1.0, result_tokens=0, tool="qa")),
                       ("req-0", 0, None, SegmentHint())]
    # steps of 0.1 s: 2 tokens (0.2), the 0 s call, 3 tokens (0.5), the 1 s call (1.5), 4 tokens (1.9)
    assert m["num_finished"] == progress.n == 1
    assert m["steps"] == 9 and m["elapsed_s"] == pytest.approx(1.9)
    assert m["normalized_latency"]["mean"] == pytest.approx((1.9 - 1.0) / 9)     # the calls' time left out


def test_a_call_on_the_last_segment_is_made_and_one_token_follows_its_result():
    """Every text-form request of the released trace ends with a call, which the reference makes
    (its max_tokens counts the result) and then samples once more. Steps of 0.1 s: 2 tokens (0.2),
    the 1 s call (1.2), 3 tokens (1.5), the 2 s call (3.5), the result and one token (3.6)."""
    r = TraceRequest("r", 4, (Segment(2, api_time=1.0, api_token_length=3), Segment(3, api_time=2.0, api_token_length=5)),
                     kind="chat")
    assert generated_tokens(r) == 2 + 3 + 1
    engine = engine_at(10.0)
    resumes = spy_on_resumes(engine)
    m = replay(engine, [(0.0, r)], window=100.0)
    assert resumes == [("req-0", 3, 3, SegmentHint(call_duration=2.0, result_tokens=5, tool="chat")),
                       ("req-0", 5, None, SegmentHint())]
    assert m["num_finished"] == 1 and m["elapsed_s"] == pytest.approx(3.6)


def test_a_last_segment_of_no_tokens_still_gets_its_call_and_one_token_after_it():
    """The reference's max_tokens counts the results, so a request whose last segment generates
    nothing still makes the call before it and samples once after its result. Steps of 0.1 s:
    1 token (0.1), the 3 s call (3.1), 5 tokens (3.6), the 0.5 s call (4.1), the result and one
    token (4.2)."""
    engine = engine_at(10.0)
    resumes = spy_on_resumes(engine)
    m = replay(engine, [(0.0, TWO_CALLS)], window=100.0)
    assert [(rid, n) for rid, n, *_ in resumes] == [("req-0", 7), ("req-0", 2)]
    assert m["num_finished"] == 1 and m["elapsed_s"] == pytest.approx(4.2)


def test_a_result_that_overflows_the_context_finishes_the_request_at_the_resume():
    r = TraceRequest("r", 4, (Segment(2, api_time=1.0, api_token_length=100), Segment(2)))
    engine = engine_at(10.0, max_model_len=32)
    progress = Progress()
    m = replay(engine, [(0.0, r)], window=100.0, progress=progress)
    assert m["num_finished"] == progress.n == 1 and not engine.requests
    assert m["steps"] == 2 and m["elapsed_s"] == pytest.approx(1.2)


def test_time_scale_stretches_the_first_call_too():
    """Pause after 1 token (0.1), a 1 s call stretched to 3 s, the last token: 3.2 s."""
    r = TraceRequest("r", 4, (Segment(1, api_time=1.0, api_token_length=1), Segment(1)))
    assert replay(engine_at(10.0), [(0.0, r)], window=100.0, time_scale=3.0)["elapsed_s"] == pytest.approx(3.2)


def test_replay_admits_every_arrival_due_before_the_step_and_counts_rejections():
    """Two prompts too big for the pool are rejected between two that fit, all arriving at t = 0:
    the two that fit share the first step."""
    small, big = TraceRequest("small", 4, (Segment(1),)), TraceRequest("big", 500, (Segment(1),))
    progress = Progress()
    m = replay(engine_at(10.0), [(0.0, small), (0.0, big), (0.0, big), (0.0, small)], window=100.0, progress=progress)
    assert m["num_rejected"] == 2 and m["num_finished"] == 2 and progress.n == 4
    assert m["steps"] == 1 and m["elapsed_s"] == pytest.approx(0.1)
    assert m["completed_rps"] == pytest.approx(2 / 0.1) and m["tokens_per_s"] == pytest.approx(2 * 5 / 0.1)


def test_replay_results_due_at_the_same_time_resume_in_the_order_the_calls_started():
    r = TraceRequest("r", 4, (Segment(1, api_time=1.0, api_token_length=1), Segment(1)))
    engine = engine_at(10.0)
    resumes = spy_on_resumes(engine)
    replay(engine, [(0.0, r), (0.0, r), (0.0, r)], window=100.0)
    assert [rid for rid, *_ in resumes] == ["req-0", "req-1", "req-2"]


def test_replay_waits_for_the_next_arrival_and_stops_when_the_window_closes():
    """Idle after the first request, the clock jumps to the next arrival; one arriving exactly when
    the window closes is not served."""
    r = TraceRequest("r", 4, (Segment(1),))
    m = replay(engine_at(10.0), [(0.0, r), (1.0, r), (2.0, r)], window=2.0)
    assert m["num_submitted"] == m["num_finished"] == 2
    assert m["elapsed_s"] == pytest.approx(2.0)
    assert m["ttft"]["mean"] == m["e2e"]["mean"] == pytest.approx(0.1)     # each from its own arrival


def test_a_call_still_running_when_the_window_closes_counts_until_the_end():
    """Arrives at 1, pauses at 1.2 on a 100 s call, the window closes at 5: 0.2 s for 2 tokens
    outside the call."""
    r = TraceRequest("r", 4, (Segment(2, api_time=100.0, api_token_length=1), Segment(1)))
    m = replay(engine_at(10.0), [(1.0, r)], window=5.0)
    assert m["num_finished"] == 0 and m["e2e"]["mean"] is None
    assert m["normalized_latency"]["mean"] == pytest.approx(0.1) and m["ttft"]["mean"] == pytest.approx(0.1)


def test_a_replay_with_nothing_to_do_reports_zero_rates():
    m = replay(engine_at(10.0), [], window=10.0)
    assert m["num_submitted"] == m["num_finished"] == m["num_rejected"] == 0
    assert m["elapsed_s"] == m["completed_rps"] == m["tokens_per_s"] == 0.0


def test_an_empty_prompt_is_replayed_as_one_token():
    m = replay(engine_at(10.0), [(0.0, TraceRequest("r", 0, (Segment(2),)))], window=10.0)
    assert m["tokens_per_s"] * m["elapsed_s"] == pytest.approx(1 + 2)


def test_prompts_and_results_are_token_0_which_every_vocabulary_has():
    """As the reference's [0] * n: a model of 64 tokens takes the replay's prompts (the simulator's
    sampled token, 31548, was used and every request was refused)."""
    engine = engine_with(FakeRunner(), num_kv_blocks=16, vocab_size=64)
    added, add = [], engine.add_request
    engine.add_request = lambda prompt, *args, **kwargs: added.append(prompt) or add(prompt, *args, **kwargs)
    results, resume = [], engine.resume
    engine.resume = lambda rid, result, *args, **kwargs: results.append(result) or resume(rid, result, *args, **kwargs)
    r = TraceRequest("r", 3, (Segment(1, api_time=0.0, api_token_length=2), Segment(2)))
    m = replay(engine, [(0.0, r)], window=10.0)
    assert added == [[0, 0, 0]] and results == [[0, 0]]
    assert m["num_rejected"] == 0 and m["num_finished"] == 1
    assert "| 1 | 0 | 1 |" in format_table([{**m, "policy": "preserve", "qps": 1.0}])   # submitted, refused, finished


def test_the_metrics_names():
    """The keys results.json, the tables and the plots read."""
    m = replay(engine_at(10.0), [], window=1.0)
    assert set(m) == {"num_submitted", "num_finished", "num_rejected", "elapsed_s", "normalized_latency", "ttft",
                      "e2e", "tpot", "longest_wait_s", "completed_rps", "tokens_per_s", "memory_waste_pct",
                      "waste_preserve_pct", "waste_preserve_short_pct", "waste_recompute_pct", "waste_swap_stall_pct", "recompute_tokens",
                      "swap_out_blocks", "swap_in_blocks", "steps"}


class ManualClock:
    """A wall clock that moves only when the replay sleeps (not a VirtualClock: the loop sleeps)."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_on_a_wall_clock_replay_sleeps_in_short_naps_until_the_next_arrival(monkeypatch):
    clock = ManualClock(100.0)
    naps = []

    def sleep(seconds):
        assert 0 < seconds and len(naps) < 100, "the loop waits without time passing"
        naps.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(replay_module, "time", SimpleNamespace(sleep=sleep))
    engine = engine_with(FakeRunner(), num_kv_blocks=16, clock=clock)
    r = TraceRequest("r", 4, (Segment(1),))
    m = replay(engine, [(0.0, r), (1.03, r)], window=10.0, token_id=5)
    assert max(naps) <= 0.05 and sum(naps) == pytest.approx(1.03)
    assert m["num_finished"] == 2 and m["elapsed_s"] == pytest.approx(1.03)


def test_stats_of_no_values_and_of_four():
    assert _stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert _stats([4.0, 1.0, 3.0, 2.0]) == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})


TEXT_TRACE = {
    "95_2": [{"prompt": "Write a poem about the sea.", "completion": "The waves roll in, the gulls cry out.",
              "api_token": "Generate an image about this. ", "api_time": 2.5},
             {"prompt": "ignored", "completion": "Here is a generated image. "}],
    "31": [{"prompt": "Hello there!", "completion": "Hi! How can I help you today?",
            "api_token": "Tell me a joke.", "api_time": 4.0},
           {"prompt": "ignored", "completion": "Why did the chicken cross the road?"}],
}


def served_length(text: str) -> int:
    """Tokens of `text` as the default model's engine encodes it."""
    from models.registry import load_tokenizer

    return len(load_tokenizer("smollm2-135m").encode(text))


@requires_smollm2
def test_a_text_form_trace_replays_in_the_simulator_counted_by_the_models_tokenizer(tmp_path, monkeypatch):
    path = tmp_path / "text.json"
    path.write_text(json.dumps(TEXT_TRACE))
    replayed = {}

    def recording(trace, *args, **kwargs):
        replayed.update(trace)
        return run_replays(trace, *args, **kwargs)
    monkeypatch.setattr(sweeps_module, "run_replays", recording)
    assert main(["replay", "--trace", str(path), "--simulate", "--profile", "a100-gptj-6b", "--policy", "preserve",
                 "--qps", "1", "--window", "20", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    request = replayed["95_2"]
    assert request.prompt_tokens == served_length("Write a poem about the sea.")
    assert request.segments == (Segment(served_length("The waves roll in, the gulls cry out."), 2.5,
                                        served_length("Generate an image about this. ")),
                                Segment(served_length("Here is a generated image. ")))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results[0]["num_submitted"] >= 2


def test_replay_tokenizer_option_is_loaded_only_for_a_text_form_trace(tmp_path, capsys):
    args = ["--simulate", "--profile", "a100-gptj-6b", "--policy", "preserve", "--window", "5", "--quiet",
            "--out", str(tmp_path / "out"), "--tokenizer", "no-such-model"]
    text, counts = tmp_path / "text.json", tmp_path / "counts.json"
    text.write_text(json.dumps(TEXT_TRACE))
    counts.write_text(json.dumps({"a": [{"prompt_tokens": 4, "completion_tokens": 2}]}))
    assert main(["replay", "--trace", str(counts), *args]) == 0
    assert main(["replay", "--trace", str(text), *args]) == 2
    assert "cannot load model 'no-such-model'" in capsys.readouterr().err


@requires_smollm2
def test_workload_describe_prints_the_token_counts_the_load_produced(tmp_path, capsys):
    path = tmp_path / "text.json"
    path.write_text(json.dumps(TEXT_TRACE))
    assert main(["workload", "--describe", str(path)]) == 0
    prompts = [served_length("Write a poem about the sea."), served_length("Hello there!")]
    returned = [served_length("Generate an image about this. "), served_length("Tell me a joke.")]
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("all:"))
    assert "requests 2," in line and "calls 1," in line
    assert f"prompt {sum(prompts) / 2:.3g}," in line and f"returned_tokens {sum(returned) / 2:.3g}," in line
    assert not (tmp_path / "trace.json").exists()
    assert main(["workload", "--describe", str(path), "--tokenizer", "no-such-model"]) == 2
    assert "cannot load model 'no-such-model'" in capsys.readouterr().err


def test_workload_needs_an_output_or_a_file_to_describe(capsys):
    assert main(["workload", "--kind", "qa", "--n", "3"]) == 2
    assert "give -o/--out" in capsys.readouterr().err


@requires_smollm2
@pytest.mark.parametrize("option", [[], ["--model", "smollm2-135m"], ["--tokenizer", "smollm2-135m"]])
def test_predictor_measures_a_text_form_trace_with_the_default_or_named_tokenizer(tmp_path, option):
    path = tmp_path / "text.json"
    path.write_text(json.dumps(TEXT_TRACE))
    assert main(["predictor", "--trace", str(path), "-o", str(tmp_path / "model.json"), "--test-fraction", "0.5",
                 *option]) == 0


def test_predictor_model_option_names_the_tokenizer(tmp_path, capsys):
    path = tmp_path / "text.json"
    path.write_text(json.dumps(TEXT_TRACE))
    assert main(["predictor", "--trace", str(path), "-o", str(tmp_path / "model.json"), "--model", "no-such-model"]) == 2
    assert "cannot load model 'no-such-model'" in capsys.readouterr().err

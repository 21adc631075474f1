"""Trace replay in the simulator: metrics on a hand-made run, determinism, no lost request, the CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest

from infercept_jax.cli import build_parser, main
from infercept_jax.experiments.replay import replay, sample_arrivals
from infercept_jax.experiments.simulator import simulated_engine
from infercept_jax.experiments.sweeps import builtin_trace, format_table, lamps_options, run_replays, simulated_engines
from infercept_jax.experiments.workload import Segment, TraceRequest, generate_workload
from scheduling.lamps import LampsOptions
from scheduling.profile import PAPER_PROFILES, HardwareProfile

# Every step takes 0.1 s whatever its size; plenty of memory.
FLAT = HardwareProfile(name="flat", fwd_ms_per_token=0.0, fwd_base_ms=100.0, saturation_tokens=64,
                       swap_limit_tokens=64.0, kv_bytes_per_token=1, block_size=4,
                       num_device_blocks=64, num_host_blocks=64)


def test_metrics_of_a_hand_made_two_request_run():
    a = TraceRequest("a", 4, (Segment(2, api_time=1.0, api_token_length=3), Segment(2)))
    b = TraceRequest("b", 4, (Segment(3),))
    engine = simulated_engine(FLAT, "preserve")
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


def test_longest_wait_counts_requests_that_never_got_a_token():
    big = TraceRequest("big", 200, (Segment(2),))        # 50 steps of prefill at 4 tokens per step
    four_per_step = dataclasses.replace(FLAT, saturation_tokens=4)
    engine = simulated_engine(four_per_step, "preserve")
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


def test_tpot_counts_from_the_first_token_without_the_call_time():
    """Spec 5.1: TPOT = (end - first token - time in calls) / generated tokens."""
    a = TraceRequest("a", 4, (Segment(2, api_time=1.0, api_token_length=3), Segment(2)))
    b = TraceRequest("b", 4, (Segment(3),))
    m = replay(simulated_engine(FLAT, "preserve"), [(0.0, a), (0.0, b)], window=100.0)
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

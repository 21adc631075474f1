"""The sustainable-rate measure (`infercept_jax.experiments.capacity`): its rules on hand-made runs,
the sweep's early stop, and one tiny end-to-end run of scripts/compare_hardware.py."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from infercept_jax.experiments import capacity as ch
from infercept_jax.experiments.workload import Segment, TraceRequest, generate_workload, save_trace
from scheduling.profile import HardwareProfile

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "compare_hardware.py"
_SPEC = importlib.util.spec_from_file_location("compare_hardware", _PATH)
compare_hardware = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_hardware)


def run(policy: str, qps: float, latency: float | None, waste: float = 0.0) -> dict:
    return {"policy": policy, "qps": qps, "normalized_latency": {"mean": latency}, "memory_waste_pct": waste}


# Best latency at the lowest rate 1.0 is 0.010 (preserve): with factor 2 the SLO is 0.020.
RESULTS = [
    run("discard", 1.0, 0.015), run("discard", 2.0, 0.019, 10.0), run("discard", 3.0, 0.050),
    run("preserve", 1.0, 0.010), run("preserve", 2.0, 0.012, 30.0), run("preserve", 3.0, 0.013),
    run("preserve", 4.0, 0.030),
    run("swap", 1.0, 0.012), run("swap", 2.0, 0.025), run("swap", 3.0, 0.015),   # a miss, then a pass
    run("infercept", 2.0, None), run("infercept", 1.0, 0.011),                    # unsorted; no latency at 2
]


def test_slo_is_the_factor_times_the_best_latency_at_the_lowest_rate():
    assert ch.latency_slo(RESULTS) == pytest.approx(0.020)
    assert ch.latency_slo(RESULTS, factor=3.0) == pytest.approx(0.030)
    with pytest.raises(ValueError, match="no SLO"):
        ch.latency_slo([run("discard", 1.0, None), run("discard", 2.0, 0.01)])


def test_sustainable_rate_needs_the_slo_at_every_lower_rate():
    slo = 0.020
    assert ch.sustainable_rate(RESULTS, "discard", slo) == 2.0
    assert ch.sustainable_rate(RESULTS, "preserve", slo) == 3.0
    assert ch.sustainable_rate(RESULTS, "swap", slo) == 1.0         # passing again at 3 does not count
    assert ch.sustainable_rate(RESULTS, "infercept", slo) == 1.0    # a run without a latency misses
    assert ch.sustainable_rate(RESULTS, "discard", 0.001) == 0.0    # misses at the lowest rate
    assert ch.sustainable_rate(RESULTS, "heuristic", slo) == 0.0    # never ran


def test_gain_over_a_baseline_that_sustains_nothing():
    assert ch.gain(3.0, 2.0) == 1.5
    assert ch.gain(3.0, 0.0) == math.inf
    assert ch.gain(0.0, 0.0) is None


def test_summary_compares_every_policy_at_discards_sustainable_rate():
    rows = {r["policy"]: r for r in ch.summarize(RESULTS, "hw", 0.020)}
    assert list(rows) == ["discard", "preserve", "swap", "infercept"]
    assert rows["preserve"] == {"setup": "hw", "policy": "preserve", "sustainable_rps": 3.0, "gain": 1.5,
                                "latency_at_baseline": 0.012, "waste_at_baseline": 30.0}
    assert rows["swap"]["gain"] == 0.5 and rows["swap"]["latency_at_baseline"] == 0.025
    assert rows["infercept"]["latency_at_baseline"] is None                  # ran at 2.0 without a latency
    nothing = {r["policy"]: r for r in ch.summarize(RESULTS, "hw", 0.0105)}  # discard sustains nothing
    assert nothing["preserve"]["gain"] == math.inf and nothing["discard"]["gain"] is None
    assert nothing["preserve"]["latency_at_baseline"] is None
    table = ch.format_compare(list(nothing.values()), "profile")
    assert "| hw | preserve | 1 | ∞ | – | – |" in table and "| hw | discard | 0 | – |" in table


def test_capacity_is_the_step_throughput_over_mean_tokens_per_request():
    trace = {"a": TraceRequest("a", 10, (Segment(5, 1.0, 5), Segment(10))),      # 30 tokens
             "b": TraceRequest("b", 50, (Segment(20),))}                          # 70 tokens: mean 50
    profile = HardwareProfile(name="p", fwd_ms_per_token=1.0, fwd_base_ms=100.0, saturation_tokens=100,
                              swap_limit_tokens=100.0, kv_bytes_per_token=1, block_size=4,
                              num_device_blocks=10_000, num_host_blocks=0)        # 800 requests fit: S binds
    assert ch.capacity_rps(profile, trace) == pytest.approx(100 / 0.2 / 50)
    small = dataclasses.replace(profile, num_device_blocks=100)                   # 8 requests fit: 8 tokens a step
    assert ch.capacity_rps(small, trace) == pytest.approx(8 / 0.108 / 50)
    with pytest.raises(ValueError, match="no pool sizes"):
        ch.capacity_rps(dataclasses.replace(profile, num_device_blocks=None), trace)


def test_sweep_stops_a_policy_after_its_first_miss_past_discards_rate(monkeypatch):
    # SLO 0.02; discard sustains 3: swap, missing from 2, still runs at 3; infercept stops after 4
    latency = {"discard": {1: 0.01, 2: 0.01, 3: 0.01, 4: 0.05}, "swap": {1: 0.01, 2: 0.05, 3: 0.05},
               "infercept": {1: 0.01, 2: 0.01, 3: 0.01, 4: 0.05}}
    calls = []

    def fake_run_replays(trace, make_engine, policies, rates, window, seed, show_progress):
        calls.extend((p, rates[0]) for p in policies)
        return [{**run(p, rates[0], latency[p][rates[0]]), "num_finished": 1, "num_submitted": 1} for p in policies]

    monkeypatch.setattr(ch, "run_replays", fake_run_replays)
    results = ch.sweep({}, None, ["discard", "swap", "infercept"], [1, 2, 3, 4, 5], window=1.0)
    assert calls == [("discard", 1), ("swap", 1), ("infercept", 1), ("discard", 2), ("discard", 3), ("discard", 4),
                     ("swap", 2), ("swap", 3), ("infercept", 2), ("infercept", 3), ("infercept", 4)]
    assert len(results) == len(calls)


def test_refine_bisects_each_sustainable_rate_and_compares_at_discards(monkeypatch):
    """SLO 0.02; discard meets it up to 2.5 req/s, infercept up to 4.2: the grid says 2 and 4, two
    bisections say 2.449 (sqrt(2 x 3)) and 4 (4.472 and 4.229 both miss); infercept is also run at
    discard's refined rate, so the table has its latency there."""
    limit = {"discard": 2.5, "infercept": 4.2}
    calls = []

    def fake_run_replays(trace, make_engine, policies, rates, window, seed, show_progress):
        calls.extend((p, round(rates[0], 3)) for p in policies)
        return [{**run(p, rates[0], 0.01 if rates[0] <= limit[p] else 0.05), "num_finished": 1, "num_submitted": 1,
                 "memory_waste_pct": 1.0} for p in policies]

    monkeypatch.setattr(ch, "run_replays", fake_run_replays)
    results = ch.sweep({}, None, ["discard", "infercept"], [1, 2, 3, 4, 5], window=1.0, refine=2)
    assert calls[-5:] == [("discard", 2.449), ("discard", 2.711), ("infercept", 2.449),
                          ("infercept", 4.472), ("infercept", 4.229)]
    rows = {r["policy"]: r for r in ch.summarize(results, "x", 0.02)}
    assert rows["discard"]["sustainable_rps"] == pytest.approx(6 ** 0.5)
    assert rows["infercept"]["sustainable_rps"] == 4
    assert rows["infercept"]["gain"] == pytest.approx(4 / 6 ** 0.5)
    assert rows["infercept"]["latency_at_baseline"] == 0.01
    unrefined = ch.sweep({}, None, ["discard", "infercept"], [1, 2, 3, 4, 5], window=1.0)
    assert {r["qps"] for r in unrefined} == {1, 2, 3, 4, 5}


def test_refine_leaves_a_rate_with_no_miss_above_or_no_pass_below(monkeypatch):
    """Sustaining the top rate gives nothing to bisect towards; missing the lowest, nothing from."""
    limit = {"discard": 0.5, "infercept": 9.0}
    calls = []

    def fake_run_replays(trace, make_engine, policies, rates, window, seed, show_progress):
        calls.extend((p, rates[0]) for p in policies)
        return [{**run(p, rates[0], 0.01 if rates[0] <= limit[p] else 0.05), "num_finished": 1, "num_submitted": 1}
                for p in policies]

    monkeypatch.setattr(ch, "run_replays", fake_run_replays)
    results = ch.sweep({}, None, ["discard", "infercept"], [1, 2, 3], window=1.0, refine=3)
    assert [ch.sustainable_rate(results, p, 0.02) for p in ("discard", "infercept")] == [0, 3]
    assert all(qps in (1, 2, 3) for _, qps in calls)


def test_compare_hardware_writes_the_table_results_and_plot(tmp_path):
    rows = compare_hardware.main(["--profile", "a100-gptj-6b", "--profile", "a100x2-vicuna-13b", "--policy", "infercept",
                    "--window", "4", "--out", str(tmp_path)])
    assert [(r["setup"], r["policy"]) for r in rows] == [
        ("a100-gptj-6b", "discard"), ("a100-gptj-6b", "infercept"),
        ("a100x2-vicuna-13b", "discard"), ("a100x2-vicuna-13b", "infercept")]
    runs = json.loads((tmp_path / "results.json").read_text())
    assert {r["profile"] for r in runs} == {"a100-gptj-6b", "a100x2-vicuna-13b"}
    assert all(r["trace"] == "builtin:mixed" and r["steps"] > 0 for r in runs)
    assert "| a100-gptj-6b | infercept |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "gain_over_discard.png").stat().st_size > 0


def test_compare_hardware_gives_the_policies_the_estimator_asked_for(tmp_path, monkeypatch):
    built, original = [], compare_hardware.simulated_engines

    def recording(profile, **options):
        make = original(profile, **options)

        def build(policy):
            engine = make(policy)
            built.append((policy, type(engine.scheduler.policy.estimator).__name__))
            return engine
        return build

    monkeypatch.setattr(compare_hardware, "simulated_engines", recording)
    compare_hardware.main(["--profile", "a100-gptj-6b", "--policy", "infercept", "--estimator", "dynamic",
                           "--window", "4", "--out", str(tmp_path)])
    assert ("infercept", "DynamicEstimator") in built
    assert "estimator dynamic" in (tmp_path / "compare.md").read_text()


def test_compare_hardware_caps_each_gpu_as_the_papers_did_and_marks_measured_profiles(tmp_path):
    """Spec 6.6: 40 GiB per GPU by default (6B: 836 blocks, the H200: 10565), the profile's own pool
    with 0; the measured H200 is in the default list, its rows marked as measured."""
    h200 = compare_hardware.MEASURED_PROFILES[0]
    rows = compare_hardware.main(["--profile", "a100-gptj-6b", "--profile", h200, "--policy", "infercept",
                                  "--window", "4", "--out", str(tmp_path)])
    assert [r["setup"] for r in rows] == ["a100-gptj-6b", "a100-gptj-6b",
                                          "h200-smollm2-1.7b-bf16 (measured)", "h200-smollm2-1.7b-bf16 (measured)"]
    text = (tmp_path / "compare.md").read_text()
    assert "836 device blocks of 64 tokens (40 GiB per GPU)" in text
    assert "10565 device blocks of 16 tokens (40 GiB per GPU)" in text
    compare_hardware.main(["--profile", "a100-gptj-6b", "--policy", "infercept", "--device-memory-gb", "0",
                           "--window", "4", "--out", str(tmp_path)])
    assert "2152 device blocks of 64 tokens (the profile's own pool)" in (tmp_path / "compare.md").read_text()


def test_compare_hardware_per_kind_runs_the_kinds_asked_for(tmp_path):
    rows = compare_hardware.main(["--profile", "a100-gptj-6b", "--per-kind", "--kind", "chat", "--policy", "infercept",
                                  "--window", "4", "--out", str(tmp_path)])
    assert [(r["setup"], r["policy"]) for r in rows] == [("chat", "discard"), ("chat", "infercept")]
    assert (tmp_path / "per_kind" / "compare.md").is_file()
    with pytest.raises(SystemExit):
        compare_hardware.main(["--kind", "chat", "--out", str(tmp_path)])      # --kind is for --per-kind


def test_per_kind_keeps_the_builtin_traces_suffixes():
    """-onecall is LAMPS's single-call study: per kind it must stay one call a request."""
    for spec in ("builtin:mixed-onecall", "builtin:mixed-onecall-small", "builtin:mixed-small", "builtin:mixed"):
        suffix = spec.removeprefix("builtin:mixed")
        ((kind, name, trace),) = compare_hardware.per_kind_traces(spec, ["chat"], "unused")
        assert (kind, name) == ("chat", f"builtin:chat{suffix}")
        assert {r.num_calls for r in trace.values()} == {1} if "onecall" in spec else max(r.num_calls for r in trace.values()) > 1


def test_compare_hardware_refuses_a_comparison_with_nothing_to_compare(tmp_path, capsys):
    """Before any sweep: discard alone (the gains' plot divided by zero after the whole sweep), and
    a kind the file has none of."""
    with pytest.raises(SystemExit):
        compare_hardware.main(["--profile", "a100-gptj-6b", "--policy", "discard", "--out", str(tmp_path)])
    assert "besides discard" in capsys.readouterr().err
    path = tmp_path / "trace.json"
    save_trace(generate_workload("qa", 5, seed=2), path)
    with pytest.raises(SystemExit):
        compare_hardware.main(["--profile", "a100-gptj-6b", "--trace", str(path), "--per-kind", "--kind", "chat",
                               "--policy", "infercept", "--out", str(tmp_path)])
    assert "no requests of kind chat" in capsys.readouterr().err


def test_compare_hardware_per_kind_splits_a_trace_file_by_kind(tmp_path):
    """A file's requests of each kind, not a generated trace of it; a kind the file lacks is left out."""
    trace = generate_workload("mixed", 60, seed=2)
    path = tmp_path / "trace.json"
    save_trace(trace, path)
    rows = compare_hardware.main(["--profile", "a100-gptj-6b", "--trace", str(path), "--per-kind", "--kind", "qa",
                                  "--kind", "ve", "--policy", "infercept", "--window", "4", "--out", str(tmp_path)])
    assert [(r["setup"], r["policy"]) for r in rows] == [("qa", "discard"), ("qa", "infercept"),
                                                         ("ve", "discard"), ("ve", "infercept")]
    runs = json.loads((tmp_path / "per_kind" / "results.json").read_text())
    assert {r["trace"] for r in runs} == {f"{path} (qa)", f"{path} (ve)"}
    subsets = compare_hardware.per_kind_traces(str(path), ["qa", "ve"], "unused")
    assert [(kind, set(sub)) for kind, _, sub in subsets] == [
        (kind, {k for k, r in trace.items() if r.kind == kind}) for kind in ("qa", "ve")]
    assert compare_hardware.per_kind_traces(str(path), ["qa", "nope"], "unused")[1:] == []

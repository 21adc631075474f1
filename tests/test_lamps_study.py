"""scripts/lamps_study.py: one tiny end-to-end run of every variant, and the table's arithmetic."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from infercept_jax.experiments.workload import generate_workload, load_trace, save_trace

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "lamps_study.py"
_SPEC = importlib.util.spec_from_file_location("lamps_study", _PATH)
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)


def test_change_against_the_baseline():
    assert study.change(50.0, 200.0) == "-75%"
    assert study.change(3.0, 2.0) == "+50%"
    assert study.change(None, 2.0) == study.change(1.0, 0.0) == "–"


def test_a_tiny_study_runs_every_variant_on_the_same_arrivals(tmp_path):
    results = study.main(["--trace", "builtin:mixed-onecall", "--fraction", "0.5", "--window", "8", "--workers", "1",
                          "--starvation-threshold", "5", "--out", str(tmp_path)])
    labels = [r["variant"] for r in results]
    assert labels == [label for label, _, _ in study.VARIANTS] + ["lamps starvation threshold 5"]
    assert len({r["num_submitted"] for r in results}) == 1          # the same arrivals for every variant
    assert [r["starvation_quanta"] is None for r in results] == [r["policy"] == "infercept" for r in results]
    learned = next(r for r in results if r["variant"] == "lamps learned lengths")
    assert learned["lamps_options"]["length_predictor"] == str(tmp_path / "length_model.json")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["length_model_accuracy"]["mae_tokens"] < saved["length_model_accuracy"]["baseline_mae_tokens"]
    table = (tmp_path / "lamps.md").read_text()
    assert table.count("| mixed-onecall |") == len(results) and "| infercept | " in table
    assert "with 40 GiB per GPU" in table and {r["device_memory_gb"] for r in results} == {40.0}


def test_the_study_replays_a_trace_file_on_the_profiles_own_pool(tmp_path):
    path = tmp_path / "calls.json"
    save_trace(generate_workload("mixed", 20, seed=3, single_call=True), path)
    results = study.main(["--trace", str(path), "--fraction", "0.5", "--window", "8", "--workers", "1",
                          "--device-memory-gb", "0", "--out", str(tmp_path)])
    assert {r["workload"] for r in results} == {"calls.json"} and {r["trace"] for r in results} == {str(path)}
    assert {r["device_memory_gb"] for r in results} == {None}
    # the profile's own 80 GB pool holds more than the 40 GB one: the rate grid scales with it
    assert results[0]["qps"] == round(0.5 * study.capacity_rps(study.load_profile("a100-gptj-6b"),
                                                               load_trace(path)), 2)


def test_worker_processes_give_the_runs_of_one_process(tmp_path):
    argv = ["--trace", "builtin:mixed-onecall", "--fraction", "0.5", "--window", "4", "--variant", "lamps"]
    alone = study.main([*argv, "--workers", "1", "--out", str(tmp_path / "one")])
    subprocess.run([sys.executable, str(_PATH), *argv, "--workers", "2", "--out", str(tmp_path / "two")],
                   check=True, capture_output=True, cwd=_PATH.parent.parent)
    pooled = json.loads((tmp_path / "two" / "results.json").read_text())["runs"]
    drop = ("sim_seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in pooled] == \
        [{k: v for k, v in r.items() if k not in drop} for r in alone]
    assert "with 40 GiB per GPU" in (tmp_path / "two" / "lamps.md").read_text()


def test_variant_picks_the_standard_variants_and_keeps_the_baseline(tmp_path):
    results = study.main(["--trace", "builtin:mixed-onecall", "--fraction", "0.5", "--window", "4", "--workers", "1",
                          "--variant", "lamps no starvation guard", "--out", str(tmp_path)])
    assert [r["variant"] for r in results] == ["infercept", "lamps no starvation guard"]
    assert not (tmp_path / "length_model.json").exists()      # no learned variant, no model trained
    assert json.loads((tmp_path / "results.json").read_text())["length_model_accuracy"] is None

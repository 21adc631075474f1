"""scripts/trace_steps.py: the summary it reads from a perfetto trace (on a trace shaped like an
XLA:GPU one), and a traced run of the tiny shape on CPU."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "trace_steps.py"
_SPEC = importlib.util.spec_from_file_location("trace_steps", _PATH)
trace_steps = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(trace_steps)


def write_trace(path: Path, events: list[dict], python_thread: str = "python") -> str:
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "XLA Modules"}},
            {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": python_thread}}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events + [{}]}, f)
    return str(path)


def span(pid, tid, ts, dur, name):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_busy_time_is_the_union_of_the_intervals():
    assert trace_steps.busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert trace_steps.busy_us([]) == 0


@pytest.mark.parametrize("python_thread", ["python", "python3"])   # the venv's interpreter, the GPU machine's
def test_the_summary_counts_device_lanes_only_and_ranks_kernels_by_total_time(tmp_path, python_thread):
    events = [span(7, 1, 100, 30, "gemm"), span(7, 1, 140, 10, "attention"), span(7, 1, 160, 30, "gemm"),
              span(7, 1, 200, 60, "attention"), span(7, 2, 100, 150, "jit_step"),
              span(1, 5, 0, 1000, "$engine.py:224 step"), span(1, 5, 10, 300, "$model_runner.py:244 prepare"),
              span(1, 5, 500, 400, "$model_runner.py:244 prepare"), span(1, 5, 20, 900, "$numpy asarray"),
              span(1, 5, 0, 2000, "$profiler.py:307 trace")]     # JAX's profiler.py, not ours
    summary = trace_steps.summarize(write_trace(tmp_path / "t.json.gz", events, python_thread), top=5)
    assert summary["window_ms"] == pytest.approx(0.160)          # the device's first start to its last end
    lanes = {lane["lane"]: lane for lane in summary["lanes"]}
    assert set(lanes) == {"Stream #13(Compute)", "XLA Modules"}
    assert lanes["Stream #13(Compute)"]["busy_ms"] == pytest.approx(0.130)
    assert lanes["XLA Modules"]["events"] == 1
    assert [(k["kernel"], k["count"]) for k in summary["top"]] == [("attention", 2), ("gemm", 2)]
    assert summary["top"][0]["share_of_streams"] == pytest.approx(70 / 130)
    assert trace_steps.summarize(write_trace(tmp_path / "t.json.gz", events), top=1)["top"][0]["kernel"] == "attention"
    assert [(f["function"], f["calls"], f["total_ms"]) for f in summary["host"]] == [     # not numpy's
        ("engine.py:224 step", 1, 1.0), ("model_runner.py:244 prepare", 2, 0.7)]


def test_a_traced_run_on_cpu_writes_the_trace_and_the_step_times(tmp_path, capsys):
    """Prompts that take several steps to prefill (8 x 400 tokens, S = 384 on CPU): the first
    requests decode meanwhile, and still every traced step decodes the whole batch."""
    trace_steps.main(["--shape", "tiny", "--batch", "8", "--context", "400", "--steps", "2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["step_ms"]) == len(summary["untraced_step_ms"]) == 2
    assert all(ms > 0 for ms in summary["step_ms"] + summary["untraced_step_ms"])
    assert summary["requests_per_step"] == [8, 8]
    assert Path(summary["trace"]).is_file() and summary["lanes"] == []     # the CPU backend has no device lanes
    assert "no device lanes" in capsys.readouterr().out
    host = {f["function"].split(" ")[-1]: f for f in summary["host"]}
    assert host["step"]["calls"] == 2 and host["step"]["function"].startswith("engine.py:")
    assert host["prepare"]["total_ms"] < host["step"]["total_ms"]           # inside the step

"""What a benchmark writes beside its numbers: the machine it ran on, and its JSON record."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def machine_record() -> dict:
    """Where a benchmark runs, printed and returned for its JSON: backend, devices, CPUs, and the
    1-minute load average, read before the benchmark does any work (other processes' share)."""
    import jax

    record = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    print(f"JAX backend: {record['backend']}; devices: {record['devices']}; cpu_count: {record['cpu_count']}; "
          f"1-minute load average at start: {record['load_average_at_start']:.2f}", flush=True)
    return record


def write_result(path: str | Path, result: dict, started: float) -> None:
    """Write a benchmark's JSON with its total time since `started` (a perf_counter value)."""
    result["total_s"] = time.perf_counter() - started
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (total {result['total_s']:.0f} s)")

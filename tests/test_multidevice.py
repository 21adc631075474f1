"""Runs tests/multidevice/ in a process of its own with four CPU devices: XLA reads the device
count when JAX starts, and this process started with one. The devices are CPUs on any machine (a
GPU run too): they are what the tests split over."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_tensor_parallel_on_four_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "multidevice")],
                         cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "skipped" not in run.stdout, run.stdout[-3000:]     # a skip in there would hide from the outer count

"""The layering DESIGN.md draws: the scheduler and the simulator import neither JAX nor a model."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "flax", "models.llama", "infercept_jax.model_runner", "kvcache.paged")


def loaded_after(code: str) -> list[str]:
    """The heavy modules that are in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return [m for m in result.stdout.strip().split(",") if m]


def test_scheduling_loads_no_jax():
    assert loaded_after("import scheduling, scheduling.lamps, scheduling.infercept, scheduling.policies") == []


def test_the_simulator_runs_a_replay_without_jax_or_a_model():
    code = """
from infercept_jax.experiments.replay import replay, sample_arrivals
from infercept_jax.experiments.simulator import simulated_engine
from infercept_jax.experiments.sweeps import builtin_trace
from scheduling.profile import load_profile
engine = simulated_engine(load_profile("a100-gptj-6b"), "infercept")
metrics = replay(engine, sample_arrivals(builtin_trace("mixed-onecall"), 2.0, 5.0), 5.0)
assert metrics["num_submitted"] > 0 and metrics["steps"] > 0, metrics
"""
    assert loaded_after(code) == []


def test_the_public_names_load_on_first_use():
    assert loaded_after("import infercept_jax; infercept_jax.SamplingParams, infercept_jax.Engine") == []
    assert "jax" in loaded_after("import infercept_jax; infercept_jax.LLM")

"""The replay's plots: a latency curve over rates, or a bar per policy when there is one rate."""
from __future__ import annotations

import pytest

from infercept_jax.experiments.sweeps import plot_results


def run(policy: str, qps: float, latency: float | None) -> dict:
    return {"policy": policy, "qps": qps, "normalized_latency": {"mean": latency},
            "waste_preserve_pct": 1.0, "waste_recompute_pct": 2.0, "waste_swap_stall_pct": 0.5}


@pytest.mark.parametrize("rates, latency_plot", [([1.0], "latency_by_policy.png"),
                                                 ([1.0, 2.0], "latency_vs_rate.png")])
def test_one_rate_gets_a_bar_per_policy_and_several_a_curve(tmp_path, rates, latency_plot):
    results = [run(p, q, None if (p, q) == ("discard", 1.0) else 0.1 * q) for q in rates for p in ("discard", "infercept")]
    paths = plot_results(results, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == [latency_plot, "memory_waste.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in (latency_plot, "memory_waste.png"))
    assert len(list(tmp_path.iterdir())) == 2

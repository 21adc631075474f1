"""`GET /metrics` in the Prometheus text format (version 0.0.4)."""
from __future__ import annotations

from collections.abc import Mapping


def prometheus_text(stats: Mapping, counters: Mapping[str, int], paused_turns: int) -> str:
    """The engine's snapshot (`AsyncLLM.stats`) and the server's counters as metric families."""
    families = [
        ("infercept_requests", "gauge", "requests in the engine, by state",
         [({"state": s}, stats[s]) for s in ("waiting", "running", "swapped", "paused")]),
        ("infercept_paused_requests_on_host", "gauge", "paused requests with KV in the host pool",
         [({}, stats["paused_on_host"])]),
        ("infercept_paused_turns", "gauge", "paused requests this server holds for their next turn",
         [({}, paused_turns)]),
        ("infercept_kv_blocks", "gauge", "KV blocks in each pool",
         [({"pool": "device"}, stats["device_blocks"]), ({"pool": "host"}, stats["host_blocks"])]),
        ("infercept_kv_blocks_used", "gauge", "KV blocks in use in each pool",
         [({"pool": "device"}, stats["device_blocks_used"]), ({"pool": "host"}, stats["host_blocks_used"])]),
        ("infercept_memory_waste_percent", "gauge",
         "share of device KV memory x time wasted since start, by cause (InferCept's waste)",
         [({"cause": c}, stats[f"waste_{c}_pct"]) for c in ("preserve", "recompute", "swap_stall", "total")]),
        ("infercept_recompute_tokens_total", "counter", "context tokens recomputed after a discard or preemption",
         [({}, stats["recompute_tokens"])]),
        ("infercept_swapped_blocks_total", "counter", "KV blocks copied between the pools",
         [({"direction": "out"}, stats["swap_out_blocks"]), ({"direction": "in"}, stats["swap_in_blocks"])]),
        ("infercept_preemptions_total", "counter", "running requests preempted for memory",
         [({}, stats["preemptions"])]),
        ("infercept_step_seconds", "summary", "time of the engine's steps",
         [({}, stats["seconds"], "_sum"), ({}, stats["steps"], "_count")]),
        ("infercept_turns_total", "counter", "turns served, by whether they resumed a paused request",
         [({"kind": "new"}, counters.get("turns_new", 0)), ({"kind": "resumed"}, counters.get("turns_resumed", 0))]),
        ("infercept_cached_prompt_tokens_total", "counter", "prompt tokens of resumed turns whose KV was kept",
         [({}, counters.get("cached_prompt_tokens", 0))]),
        ("infercept_pause_timeouts_total", "counter", "paused requests aborted because no turn resumed them",
         [({}, counters.get("pause_timeouts", 0))]),
    ]
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value, *suffix in samples:
            label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"{name}{''.join(suffix)}{label_text} {float(value)!r}")
    return "\n".join(lines) + "\n"

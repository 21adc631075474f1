"""infercept-jax: LLM serving for models that pause for tool calls, in JAX/Flax.

The names below load on first use, so that the pure-Python parts (`infercept_jax.engine`, the
simulator in `infercept_jax.experiments`) import without JAX or a model.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "infercept_jax.llm", "AsyncLLM": "infercept_jax.async_llm", "Engine": "infercept_jax.engine",
    "build_engine": "infercept_jax.build",
    "EngineConfig": "infercept_jax.config", "SamplingParams": "infercept_jax.config",
    "RequestOutput": "infercept_jax.outputs", "Tool": "infercept_jax.tools",
    "ToolCallRecord": "infercept_jax.tools", "ToolFormat": "infercept_jax.tools",
    "LampsOptions": "scheduling.lamps", "SegmentHint": "scheduling.request",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'infercept_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)

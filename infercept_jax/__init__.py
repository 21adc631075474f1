"""infercept-jax: LLM serving for models that pause for tool calls, in JAX/Flax."""
from infercept_jax.config import EngineConfig, SamplingParams
from infercept_jax.engine import Engine
from infercept_jax.llm import LLM
from infercept_jax.outputs import RequestOutput
from infercept_jax.tools import Tool, ToolCallRecord, ToolFormat

__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams", "RequestOutput", "Tool", "ToolCallRecord",
           "ToolFormat"]

"""What the engine hands back to callers."""
from __future__ import annotations

from dataclasses import dataclass, field

from infercept_jax.tools import ToolCallRecord
from scheduling.request import Interception


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]          # after the prompt: generated tokens and tool results
    text: str                     # the text of token_ids (stop string removed)
    finished: bool
    finish_reason: str | None     # "stop", "length", "abort"
    new_token_ids: list[int]      # tokens this step added
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    paused: bool = False                      # waiting for a tool result (see `interception`)
    interception: Interception | None = None  # the call it paused on, while paused
    num_generated_tokens: int = 0             # sampled tokens (tool results not counted)
    num_interceptions: int = 0
    num_cached_tokens: int = 0    # on Engine.resume's output: context tokens whose KV the pause kept
    tool_calls: list[ToolCallRecord] = field(default_factory=list)   # the calls LLM.generate answered

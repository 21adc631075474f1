"""What the engine hands back to callers."""
from __future__ import annotations

from dataclasses import dataclass, field

from infercept_jax.tools import ToolCallRecord
from scheduling.request import Interception


@dataclass(slots=True, eq=False)
class RequestOutput:
    """A request's state after a step (or an add, resume or abort). Compared by identity."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str                     # the text of token_ids (stop string removed; while running, an end
                                  #   that may begin a stop string is held back)
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
    # The request's own token list and the span of it that is this output's `token_ids`. Shared,
    # not copied: the engine makes an output for every request at every step, most are never
    # read, and a copy costs the output's length. The engine only appends past a span's end, or
    # sets a placeholder there, so the span never changes once the output is made.
    _tokens: list[int] = field(default_factory=list, repr=False)
    _span: tuple[int, int] = (0, 0)

    @property
    def token_ids(self) -> list[int]:
        """After the prompt: generated tokens and tool results (a new list at each access)."""
        start, end = self._span
        return self._tokens[start:end]

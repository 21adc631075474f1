"""What the engine hands back to callers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]          # generated so far
    text: str                     # generated text so far (stop string removed)
    finished: bool
    finish_reason: str | None     # "stop", "length", "abort"
    new_token_ids: list[int]      # tokens this step added
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None

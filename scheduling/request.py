"""The one request object the scheduler, the engine and the runner share."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"          # in the queue: no KV, or its KV was freed (preempted)
    RUNNING = "running"          # holds device blocks and gets query tokens each step
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True)
class Request:
    """A sequence being served.

    `token_ids` is everything the sequence holds (prompt, then generated tokens);
    `num_computed_tokens` of them have KV in the pool. The scheduler gives a request
    `min(num_inflight_tokens, budget left)` query tokens; when a step computes its last
    in-flight token, the runner samples the next one. A prefill chunk and a decode are the same.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: Any
    arrival_time: float
    seed: int = 0
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    output_text: str = ""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_inflight_tokens(self) -> int:
        """Tokens that have no KV yet: the prompt, a resumed result, a discarded context."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

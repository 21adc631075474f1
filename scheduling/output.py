"""What one step does: the scheduler's plan for the runner (tokens per request and swap copies)."""
from __future__ import annotations

from dataclasses import dataclass, field

from scheduling.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_query_tokens: int

    @property
    def samples(self) -> bool:
        """The step computes the request's last in-flight token, so the runner samples its next."""
        return self.request.num_computed_tokens + self.num_query_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)     # requests sent back to wait (KV freed)
    swap_out: list[tuple[int, int]] = field(default_factory=list)   # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)    # (host block, device block)
    host_freed: list[int] = field(default_factory=list)   # host blocks freed since the last step, still free
    memory_short: bool = False      # some request needed device blocks that were not free

    @property
    def num_tokens(self) -> int:
        return sum(s.num_query_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.swap_out or self.swap_in)

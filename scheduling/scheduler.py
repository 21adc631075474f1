"""The iteration scheduler: fill a per-step token budget, decodes first, then chunks of prompts.

There is no prefill or decode mode. Each scheduled request gets
`min(tokens without KV, budget left)` query tokens (Sarathi-style chunking with a dynamic chunk
size), so a long prompt is prefilled over several steps while the running requests keep decoding.
When the device pool runs out, the newest running request is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvcache.block_manager import BlockManager
from scheduling.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 384   # S, the token budget of one step
    max_num_seqs: int = 64              # requests holding KV at once


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_query_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_query_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()

        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_inflight_tokens, budget)
            if n == 0:
                continue
            if not self._make_room(request, request.num_computed_tokens + n, scheduled_ids, out):
                continue
            self.blocks.ensure(request.request_id, request.num_computed_tokens + n)
            out.scheduled.append(ScheduledRequest(request, n))
            scheduled_ids.add(request.request_id)
            budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = min(request.num_inflight_tokens, budget)
            if not self.blocks.can_ensure(request.request_id, request.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.blocks.ensure(request.request_id, request.num_computed_tokens + n)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, n))
            budget -= n
        return out

    def _make_room(self, request: Request, num_tokens: int, scheduled_ids: set[str],
                   out: SchedulerOutput) -> bool:
        """Preempt the newest unscheduled running requests until `request` fits; False if it
        had to preempt itself."""
        while not self.blocks.can_ensure(request.request_id, num_tokens):
            candidates = [r for r in self.running if r.request_id not in scheduled_ids]
            victim = max(candidates, key=lambda r: (r.arrival_time, r.request_id))
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks (finished or aborted)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.request_id)
        request.status = status

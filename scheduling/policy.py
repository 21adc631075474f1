"""The seam between the scheduler and the interception policies (spec 3, 6).

A policy answers, for the scheduler:
  * at a pause: PRESERVE, SWAP or DISCARD (`on_pause`);
  * at a resume: whether the request keeps its arrival priority (`requeue_at_back`); and it learns
    from the call that returned (`on_resume`: its duration estimator, LAMPS's predictors);
  * every step: the swap budget in blocks (`swap_budget`) and any change of mind about paused
    requests (`plan`); only InferCept re-decides per step;
  * which paused requests give up device memory when a running or waiting request needs it
    (`victims`), first victim first;
  * in which order the swapped and waiting requests are served (`queue_order`): first come, first
    served for all but LAMPS, which ranks them. A ranking policy updates its counters and scores
    in `on_running_scheduled`, once per step, after the running requests got their tokens and
    before the queues are served; `queue_order` itself only reads.

A policy sees the scheduler through a `SchedulerView`: the queues, the blocks each request holds,
and three moves on paused and swapped requests. The scheduler attaches the view when it is built,
so one policy object serves one scheduler.
"""
from __future__ import annotations

import sys
from typing import Collection, Sequence

from scheduling.estimators import DurationEstimator
from scheduling.request import PauseMode, Request

UNLIMITED = sys.maxsize


class SchedulerView:
    """What a policy may read of the scheduler, and the moves it may make during a step's plan."""

    def __init__(self, scheduler) -> None:   # the Scheduler (scheduler.py imports this module)
        self._scheduler = scheduler
        self._blocks = scheduler.blocks

    # ----------------------------------------------------------------- reading
    @property
    def block_size(self) -> int:
        return self._blocks.block_size

    @property
    def token_budget(self) -> int:
        """S: the query tokens one step computes."""
        return self._scheduler.config.max_num_batched_tokens

    @property
    def free_device_blocks(self) -> int:
        return self._blocks.device.num_free

    @property
    def free_host_blocks(self) -> int:
        return self._blocks.host.num_free

    def device_blocks(self, request: Request) -> int:
        """Blocks of the request's KV in the device pool."""
        return self._blocks.num_blocks_of(request.request_id)

    def host_blocks(self, request: Request) -> int:
        """Blocks of the request's KV in the host pool."""
        return self._blocks.num_host_blocks_of(request.request_id)

    @property
    def running(self) -> Sequence[Request]:
        return self._scheduler.running

    @property
    def swapped(self) -> Sequence[Request]:
        return self._scheduler.swapped

    @property
    def waiting(self) -> Sequence[Request]:
        return self._scheduler.waiting

    @property
    def paused(self) -> Collection[Request]:
        return self._scheduler.paused.values()

    def running_tokens(self) -> tuple[int, int]:
        """(query tokens, context tokens) of the running batch."""
        return self._scheduler.running_tokens()

    @property
    def swap_out_blocks_left(self) -> int:
        """Blocks this step may still swap out within its budget."""
        return self._scheduler.swap_out_blocks_left

    # ----------------------------------------------------------------- moving KV (within a step)
    def swap_out(self, request: Request, num_blocks: int, partial: bool = False) -> bool:
        """Move `num_blocks` of a paused request's device blocks (from the back) to the host pool
        within this step's swap-out budget; with `partial`, as many as fit (at least one).
        False if nothing moved."""
        return self._scheduler.swap_out(request, num_blocks, partial)

    def discard(self, request: Request) -> None:
        """Free a paused request's KV in both pools; it is recomputed in chunks after the resume."""
        self._scheduler.discard_paused(request)

    def recompute(self, request: Request) -> None:
        """Turn a swapped (resumed) request into a waiting one that recomputes its context."""
        self._scheduler.recompute_swapped(request)


class Policy:
    """The defaults every policy starts from: keep the KV on the device at a pause, never swap,
    serve the queues first come, first served."""

    name: str
    requeue_at_back = False     # a resumed request queues as if it had just arrived (vLLM's discard)
    uses_host_pool = False
    ranks_queues = False        # False: a request that cannot get room blocks those behind it (FCFS)
    estimator: DurationEstimator | None = None   # call durations, for the policies that weigh them
    view: SchedulerView

    def attach(self, view: SchedulerView) -> None:
        """Called once by the scheduler this policy serves."""
        self.view = view

    def on_arrival(self, request: Request, now: float) -> None:
        """A request was added to the waiting queue."""

    def on_pause(self, request: Request, now: float) -> PauseMode:
        return PauseMode.PRESERVE

    def on_resume(self, request: Request, now: float) -> None:
        """A paused request got its result (its call's end time and result size are set) and was
        queued again: the estimator learns the call's duration."""
        if self.estimator is not None:
            self.estimator.observe(request.interceptions[-1])

    def on_finish(self, request: Request) -> None:
        """A request finished or was aborted."""

    def swap_budget(self) -> tuple[int, int]:
        """(swap-in blocks, swap-out blocks) this step may move."""
        return (UNLIMITED, UNLIMITED) if self.uses_host_pool else (0, 0)

    def plan(self, now: float) -> None:
        """Per-step moves on paused (and swapped) requests, before any tokens are scheduled."""

    def victims(self, now: float) -> list[Request]:
        """Paused requests that may lose device blocks to make room, first victim first."""
        return []

    def on_running_scheduled(self) -> None:
        """The running requests have their tokens for this step; the queues are served next."""

    def queue_order(self) -> list[Request]:
        """The queued requests in serving order: swapped, then waiting, each by arrival (spec 2.3)."""
        by_priority = lambda r: r.priority_time  # noqa: E731
        return sorted(self.view.swapped, key=by_priority) + sorted(self.view.waiting, key=by_priority)

    def is_starving(self, request: Request) -> bool:
        """Under a ranking policy: whether a blocked `request` stops the requests behind it."""
        return False

"""The iteration scheduler: fill a per-step token budget S; move paused requests' KV per policy.

There is no prefill or decode mode. Each scheduled request gets `min(tokens without KV, budget
left)` query tokens (Sarathi-style chunking with a dynamic chunk size), so prompts, tool results
and recomputed contexts are prefilled in chunks while the running requests keep decoding.

Queues, each first-come first-served by `priority_time` (the original arrival time) unless the
policy ranks them (LAMPS: swapped and waiting as one list by predicted memory over time):
  * running: holds its KV on the device and computes every step;
  * swapped: resumed, with part of its KV in the host pool; swapped in from the front within the
    step's swap-in budget, and it computes in the step its swap-in completes;
  * waiting: no KV (new, preempted or discarded); prefilled in chunks into the budget left;
  * paused: intercepted, waiting for a tool result; the policy decides where its KV stays.

A step serves running, then swapped, then waiting (spec 2.3); under FCFS a queued request that
cannot get room stops the ones behind it, under a ranking the next one is tried (unless the blocked
one is starving). When the device pool is short, the policy's paused victims give up blocks first
(swapped out within the budget, else discarded); then the newest running request is preempted and
recomputed later. With nothing running, a swapped request that cannot come back takes the blocks
of the newest other swapped request (recomputed later) and swaps in at least one block per step,
so swapped requests never wait on each other forever; and a running request that would have to
preempt itself takes the device blocks of a swapped one instead, so a running request and a
resumed one half on the host never wait on each other forever either.

The policy sees the scheduler through a `SchedulerView` (`scheduling/policy.py`); its moves
(swap out, discard, recompute) land in the output of the step being scheduled.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from kvcache.block_manager import BlockManager
from scheduling.output import ScheduledRequest, SchedulerOutput
from scheduling.policy import Policy, SchedulerView
from scheduling.request import Interception, PauseMode, Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 384   # S, the token budget of one step
    max_num_seqs: int = 64              # requests computing in one step


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: Policy):
        self.config = config
        self.blocks = block_manager
        self.policy = policy
        if policy.uses_host_pool and block_manager.host.capacity == 0:
            raise ValueError(f"the {policy.name} policy swaps KV to host memory, but the host pool is "
                             "empty; give the engine swap space (swap_space_gb or num_host_blocks)")
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.paused: dict[str, Request] = {}
        self.num_discards = 0               # paused requests whose KV was freed, at the pause or later
        self._out = SchedulerOutput()       # the step being scheduled
        self._swap_in_left = 0
        self._swap_out_left = 0
        policy.attach(SchedulerView(self))

    def add(self, request: Request, now: float = 0.0) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.policy.on_arrival(request, now)

    def has_work(self) -> bool:
        """Anything a step can do (paused requests wait for their results and are not work)."""
        return bool(self.waiting or self.running or self.swapped)

    def running_tokens(self) -> tuple[int, int]:
        """(query tokens, context tokens) of the running batch: what the chunk size left for a
        recompute and the cost of stalling the batch depend on."""
        return (sum(r.num_inflight_tokens for r in self.running),
                sum(r.num_computed_tokens for r in self.running))

    @property
    def swap_out_blocks_left(self) -> int:
        """Blocks the step being scheduled may still swap out within its budget."""
        return self._swap_out_left

    # ----------------------------------------------------------------- the step
    def schedule(self, now: float = 0.0) -> SchedulerOutput:
        out = self._out = SchedulerOutput()
        self._swap_in_left, self._swap_out_left = self.policy.swap_budget()
        if not self.running and self.swapped:
            # No batch to hide the copy behind and none to free memory: a budget of 0 (little free
            # device memory, N(S) < S) would leave the swapped requests waiting forever.
            self._swap_in_left = max(self._swap_in_left, 1)
        self.policy.plan(now)
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        by_priority = lambda r: r.priority_time  # noqa: E731

        for request in sorted(self.running, key=by_priority):
            if budget == 0 or len(scheduled) == self.config.max_num_seqs:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_inflight_tokens, budget)
            if n and self._make_room(request, request.num_computed_tokens + n, scheduled, now):
                budget -= self._schedule(request, n, scheduled)

        self.policy.on_running_scheduled()
        swaps_blocked = waiting_blocked = False
        smallest_refused = sys.maxsize      # device blocks of the smallest waiting request refused room
        for request in self.policy.queue_order():
            if request.status is RequestStatus.SWAPPED and not swaps_blocked:
                if self._swap_in_left == 0 or not self._swap_in(request, now):
                    swaps_blocked = True
                    continue
                if request.status is RequestStatus.RUNNING and budget and len(scheduled) < self.config.max_num_seqs:
                    n = min(request.num_inflight_tokens, budget)
                    if self._make_room(request, request.num_computed_tokens + n, scheduled, now,
                                       preempt_running=False):
                        budget -= self._schedule(request, n, scheduled)
            elif request.status is RequestStatus.WAITING and not waiting_blocked:
                # every scheduled request is running, so this also bounds the requests computing
                if not budget or len(self.running) >= self.config.max_num_seqs:
                    waiting_blocked = True
                    continue
                n = min(request.num_inflight_tokens, budget)
                need = self.blocks.blocks_needed(request.request_id, request.num_computed_tokens + n)
                if need >= smallest_refused:
                    continue    # ranked queue: a request as big as one refused this step cannot fit
                if not self._make_room(request, request.num_computed_tokens + n, scheduled, now,
                                       preempt_running=False):
                    waiting_blocked = not self.policy.ranks_queues or self.policy.is_starving(request)
                    smallest_refused = need
                    continue
                self.waiting.remove(request)
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                budget -= self._schedule(request, n, scheduled)
            if swaps_blocked and waiting_blocked:
                break
        if not out.is_empty:   # an empty step reaches no runner: its frees go with the next step
            out.host_freed = self.blocks.take_freed_host_blocks()
        return out

    def _schedule(self, request: Request, n: int, scheduled: set[str]) -> int:
        self.blocks.ensure(request.request_id, request.num_computed_tokens + n)
        self._out.scheduled.append(ScheduledRequest(request, n))
        scheduled.add(request.request_id)
        return n

    def _swap_in(self, request: Request, now: float) -> bool:
        """Swap in as much of `request` as the budget allows; False if the device has no room."""
        rid = request.request_id
        n = min(self.blocks.num_host_blocks_of(rid), self._swap_in_left)
        while self.blocks.device.num_free < n:
            self._out.memory_short = True
            if self._evict_paused(n - self.blocks.device.num_free, now):
                continue
            if self.running or not self._preempt_swapped(request):
                return False
        self._out.swap_in.extend(self.blocks.swap_in(rid, n))
        self._swap_in_left -= n
        if self.blocks.num_host_blocks_of(rid) == 0:
            self.swapped.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        return True

    def _preempt_swapped(self, request: Request) -> bool:
        """Recompute the newest swapped request other than `request` that holds device blocks (a
        budgeted swap-out leaves part of a request's context on the device), so that `request` gets
        room: a swapped request that cannot come back while nothing runs, or a running request that
        would otherwise preempt itself. False if there is none."""
        holders = [r for r in self.swapped if r is not request and self.blocks.num_blocks_of(r.request_id)]
        if not holders:
            return False
        victim = max(holders, key=lambda r: (r.priority_time, r.request_id))
        self.recompute_swapped(victim)
        victim.num_preemptions += 1
        self._out.preempted.append(victim)
        return True

    def _make_room(self, request: Request, num_tokens: int, scheduled: set[str], now: float,
                   preempt_running: bool = True) -> bool:
        """Free device blocks until `request` can hold `num_tokens`: paused victims first, then
        (if allowed) the newest unscheduled running request. False if `request` cannot run now
        (it may have preempted itself)."""
        rid = request.request_id
        while not self.blocks.can_ensure(rid, num_tokens):
            self._out.memory_short = True
            if self._evict_paused(self.blocks.blocks_needed(rid, num_tokens) - self.blocks.num_free, now):
                continue
            if not preempt_running:
                return False
            candidates = [r for r in self.running if r.request_id not in scheduled]
            victim = max(candidates, key=lambda r: (r.priority_time, r.request_id))
            if victim is request and self._preempt_swapped(request):
                # Rather than give up its own room, which a resumed request half on the host holds
                # while it waits for room to swap in (each would wait on the other forever), take
                # that request's device blocks: it recomputes later.
                continue
            self._preempt(victim)
            self._out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _evict_paused(self, blocks_wanted: int, now: float) -> bool:
        """Take device blocks from the policy's first paused victim: swap out up to
        `blocks_wanted` within the budget, or discard it. False if there is no victim."""
        victims = self.policy.victims(now)
        if not victims:
            return False
        victim = victims[0]
        wanted = min(blocks_wanted, self.blocks.num_blocks_of(victim.request_id))
        if self.swap_out(victim, wanted, partial=True):
            victim.pause_mode = PauseMode.SWAP
        else:
            self.discard_paused(victim)
        return True

    # ----------------------------------------------------------------- KV moves (the policy's too)
    def swap_out(self, request: Request, num_blocks: int, partial: bool) -> bool:
        """Move `num_blocks` of a paused request's device blocks (from the back) to the host pool,
        charged to the step's swap-out budget. With `partial`, move as many as the budget and the
        host room allow (at least one); without, all or none. False if nothing moved."""
        n = min(num_blocks, self._swap_out_left, self.blocks.host.num_free)
        if n == 0 or (n < num_blocks and not partial):
            return False
        self._out.swap_out.extend(self.blocks.swap_out(request.request_id, n))
        self._swap_out_left -= n
        return True

    def discard_paused(self, request: Request) -> None:
        """Free a paused request's KV in both pools; it is recomputed in chunks after the resume."""
        self._drop_kv(request)
        request.pause_mode = PauseMode.DISCARD
        self.num_discards += 1

    def recompute_swapped(self, request: Request) -> None:
        """Turn a swapped (resumed) request into a waiting one that recomputes its context."""
        self.swapped.remove(request)
        self._drop_kv(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._drop_kv(request)
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def _drop_kv(self, request: Request) -> None:
        self.blocks.free(request.request_id)
        request.recompute_until = max(request.recompute_until, request.num_computed_tokens)
        request.num_computed_tokens = 0

    # ----------------------------------------------------------------- pause, resume, finish
    def pause(self, request: Request, call: Interception, now: float) -> None:
        """A running request hit a tool call: it leaves the running queue and the policy decides
        where its KV goes (a swap happens in the next steps, within their budgets). Under async
        scheduling the step that sampled the call's last token was launched before the one being
        collected now, so the request may have been preempted to the waiting queue since."""
        (self.running if request in self.running else self.waiting).remove(request)
        if request.num_computed_tokens == 0:
            # Preempted since, and given its first chunk again by the step launched meanwhile, which
            # the engine took back: the blocks that chunk got hold nothing. A request resumed with
            # no KV waits in the waiting queue, whose requests hold no blocks.
            self.blocks.free(request.request_id)
        request.status = RequestStatus.PAUSED
        request.interceptions.append(call)
        mode = self.policy.on_pause(request, now)
        if mode is PauseMode.DISCARD:
            self.discard_paused(request)
        else:
            request.pause_mode = mode
        self.paused[request.request_id] = request

    def resume(self, request: Request, now: float) -> None:
        """The tool result was appended: queue the request by where its KV is."""
        del self.paused[request.request_id]
        request.pause_mode = None
        request.tokens_since_resume = 0
        if self.policy.requeue_at_back:
            request.priority_time = now
        if self.blocks.num_host_blocks_of(request.request_id):
            request.status = RequestStatus.SWAPPED
            self.swapped.append(request)
        elif request.num_computed_tokens == 0:
            request.status = RequestStatus.WAITING
            self.waiting.append(request)
        else:
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        self.policy.on_resume(request, now)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of every queue and free its blocks (finished or aborted)."""
        for queue in (self.running, self.waiting, self.swapped):
            if request in queue:
                queue.remove(request)
        self.paused.pop(request.request_id, None)
        self.blocks.free(request.request_id)
        request.pause_mode = None
        request.status = status
        self.policy.on_finish(request)

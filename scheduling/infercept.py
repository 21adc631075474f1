"""InferCept's min-waste interception policy (spec 3.5), re-decided every step."""
from __future__ import annotations

from typing import Callable

from scheduling.estimators import DurationEstimator, OracleEstimator
from scheduling.policy import Policy, SchedulerView
from scheduling.profile import HardwareProfile
from scheduling.request import PauseMode, Request
from scheduling.waste import chunked_discard_waste, preserve_waste, swap_budget


def step_swap_budget(view: SchedulerView, profile: HardwareProfile) -> tuple[int, int]:
    """(swap-in, swap-out) blocks this step may copy behind its compute (spec 3.5.1 item 2), from
    the free device and host memory now and the step's expected forward: InferCept's budget,
    which LAMPS uses too."""
    bs = view.block_size
    budget = swap_budget(view.free_device_blocks * bs, view.free_host_blocks * bs, profile, bs,
                         expected_step_tokens(view))
    return budget.in_blocks, budget.out_blocks


def expected_step_tokens(view: SchedulerView) -> int:
    """The query tokens of the step being planned, as far as the plan can tell: the whole budget S
    when requests wait (their chunks fill it), else the running batch's."""
    if view.waiting:
        return view.token_budget
    return min(view.running_tokens()[0], view.token_budget)


def scored_paused(view: SchedulerView, profile: HardwareProfile,
                  remaining: Callable[[Request], float]) -> list[tuple[float, float, Request]]:
    """(preserve waste, discard waste, request) of the paused requests holding device blocks, where
    `remaining(request)` is the seconds left of its call."""
    running_query, running_context = view.running_tokens()
    scored = []
    for request in view.paused:
        held = view.device_blocks(request)
        if held == 0:
            continue
        on_device = min(held * view.block_size, request.num_computed_tokens)
        w_preserve = preserve_waste(remaining(request), on_device)
        w_discard = chunked_discard_waste(request.num_computed_tokens, running_query, running_context, profile)
        scored.append((w_preserve, w_discard, request))
    return scored


def eviction_order(scored: list[tuple[float, float, Request]]) -> list[Request]:
    """The eviction that saves the most waste first, `w_p - w_d` (the discard waste is what giving
    the memory up costs), ties by priority time."""
    return [request for _, _, request in sorted(scored, key=lambda s: (s[1] - s[0], s[2].priority_time))]


class InferCeptPolicy(Policy):
    """Every paused request that holds device memory is scored by `min(preserve waste, chunked
    discard waste)` (eq. 5), where held memory is waste only when someone needs it (spec 8.1):
    discarding a paused request while the device has room for all the queued work frees memory
    that nobody takes, and costs a recompute. So a paused request keeps its KV until memory is
    short, which shows in two ways:

    * the step's swap-out budget opens (it solves `in + out <= N(x)`, `in - out = F - S`, so it
      is 0 while free memory F exceeds S + N(x)): the most wasteful are swapped out (from the
      back, block by block) while it lasts; swaps within the budget overlap the step, free;
    * a running, swapped or waiting request needs blocks that are not free: the scheduler takes
      them from `victims` (swapped out within the budget, else discarded), first the one whose
      eviction saves the most, `w_p - w_d`: the discard waste is what giving memory up costs.

    The released code also discarded at once every paused request whose chunked recompute wastes
    less than keeping it, room or not; on long human-paced calls (chat) that recomputed the context
    after every turn for memory nobody used (docs/policies.md, "the chat gap"). When nothing waits
    and the step has spare compute, the oldest swapped request is recomputed instead of swapped in
    when the link's backlog costs the swapped requests more waiting than the recompute costs the
    batch (`_active_discard`).
    """

    name = "infercept"
    uses_host_pool = True

    def __init__(self, profile: HardwareProfile, estimator: DurationEstimator | None = None):
        self.profile = profile
        self.estimator = estimator or OracleEstimator()

    def swap_budget(self) -> tuple[int, int]:
        return step_swap_budget(self.view, self.profile)

    def plan(self, now: float) -> None:
        self._active_discard()
        if self.view.swap_out_blocks_left == 0:
            return      # room for the queued work: no paused memory is wasted (the common case)
        scored = sorted(self._scored(now), key=lambda s: (-min(s[0], s[1]), s[2].priority_time))
        for w_preserve, w_discard, request in scored:
            if min(w_preserve, w_discard) == 0 or not self.view.swap_out(request, self.view.device_blocks(request),
                                                                         partial=True):
                return
            request.pause_mode = PauseMode.SWAP

    def victims(self, now: float) -> list[Request]:
        return eviction_order(self._scored(now))

    def _scored(self, now: float) -> list[tuple[float, float, Request]]:
        return scored_paused(self.view, self.profile,
                             lambda request: self.estimator.remaining(request.interceptions[-1], now))

    def _active_discard(self) -> None:
        """Nothing waits and compute is idle: recompute the oldest swapped request rather than
        swap it in, when the swapped requests' wait for the link costs more than the recompute
        costs the batch.

        The released code always recomputes here, as if idle compute were free. It is not: the
        chunks lengthen the steps by a_f per token, and the running requests and the request
        itself wait that long (`recompute_s * (running + 1)`, in request-seconds). A swap-in costs
        the waiting it causes instead: its copy runs beside the step, and the swapped requests
        wait for the link's backlog, all their host blocks, beyond what this step's forward hides
        (`wait_s * swapped`). So a short backlog is swapped in, and a link that falls behind hands
        its oldest request to the compute (spec 8.1: "_active_discard generalized", and the
        queueing delay of resumed requests). On the paper's 6B profile, where a token costs about
        the same either way, comparing a_f * C with the request's whole copy time recomputed about
        half the swapped chat contexts, and comparing it with the request's own stall let the
        link fall behind on image (docs/policies.md, "the chat gap on the authors' trace").
        """
        view = self.view
        if view.waiting or not view.swapped:
            return
        running_query = view.running_tokens()[0]
        if running_query >= view.token_budget:
            return
        oldest = min(view.swapped, key=lambda r: r.priority_time)
        backlog = sum(view.host_blocks(r) for r in view.swapped) * view.block_size
        recompute_s = self.profile.fwd_ms_per_token * oldest.num_computed_tokens / 1000
        wait_s = self.profile.swap_seconds(backlog) - self.profile.fwd_seconds(running_query)
        if recompute_s * (len(view.running) + 1) < wait_s * len(view.swapped):
            view.recompute(oldest)

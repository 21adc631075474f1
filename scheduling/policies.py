"""Interception policies: what happens to a paused request's KV (spec section 3).

A policy answers, for the scheduler:
  * at a pause, PRESERVE, SWAP or DISCARD (`on_pause`);
  * at a resume, whether the request keeps its arrival priority (`requeue_at_back`);
  * every step, the swap budget in blocks (`swap_budget`) and any change of mind about paused
    requests (`plan`); only InferCept re-decides per step;
  * which paused requests may give up device memory when a running or waiting request needs it
    (`victims`), most wasteful first;
  * in which order the swapped and waiting requests are served (`queue_order`): first come, first
    served for all but LAMPS (`scheduling/lamps.py`), which ranks them and sees every arrival,
    resume and finish (`on_arrival`, `on_resume`, `on_finish`).

The baselines: `discard` (vLLM: free at pause, resume at the back of the queue), `improved-discard`
(free at pause, keep arrival priority), `preserve`, `swap` (whole context out at pause, unbudgeted),
`heuristic` (H-S / H-D / H-B duration thresholds, decided once at pause). All run on the same
chunked scheduler as InferCept, so the comparison is fair (spec 8.1).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from scheduling.estimators import DurationEstimator, OracleEstimator
from scheduling.profile import HardwareProfile
from scheduling.request import PauseMode, Request
from scheduling.waste import chunked_discard_waste, preserve_waste, swap_budget

if TYPE_CHECKING:
    from scheduling.lamps import LampsOptions
    from scheduling.scheduler import Scheduler, SchedulerOutput

UNLIMITED = sys.maxsize
POLICIES = ("discard", "improved-discard", "preserve", "swap", "heuristic", "infercept", "lamps")
HEURISTICS = {"H-S": (4.0, None), "H-D": (None, 7.0), "H-B": (4.0, 7.0)}  # (swap from, discard from) seconds


class Policy:
    name = "preserve"
    requeue_at_back = False
    uses_host_pool = False
    ranks_queues = False    # False: a request that cannot get room blocks those behind it (FCFS)

    def on_arrival(self, sched: Scheduler, request: Request, now: float) -> None:
        """A request was added to the waiting queue."""

    def on_resume(self, sched: Scheduler, request: Request, now: float) -> None:
        """A paused request got its result and was queued again."""

    def on_finish(self, request: Request) -> None:
        """A request finished or was aborted."""

    def on_pause(self, request: Request, now: float) -> PauseMode:
        return PauseMode.PRESERVE

    def swap_budget(self, sched: Scheduler) -> tuple[int, int]:
        """(swap-in blocks, swap-out blocks) this step may move."""
        return (UNLIMITED, UNLIMITED) if self.uses_host_pool else (0, 0)

    def plan(self, sched: Scheduler, out: SchedulerOutput, now: float) -> None:
        """Per-step actions on paused requests, before any tokens are scheduled."""

    def victims(self, sched: Scheduler, now: float) -> list[Request]:
        """Paused requests that may lose device blocks to make room, first victim first."""
        return []

    def queue_order(self, sched: Scheduler) -> list[Request]:
        """The queued requests in serving order, called once per step: swapped, then waiting,
        each by arrival (spec 2.3)."""
        by_priority = lambda r: r.priority_time  # noqa: E731
        return sorted(sched.swapped, key=by_priority) + sorted(sched.waiting, key=by_priority)

    def is_starving(self, request: Request) -> bool:
        """Under a ranking policy: whether a blocked `request` stops the requests behind it."""
        return False


class DiscardPolicy(Policy):
    name = "discard"
    requeue_at_back = True

    def on_pause(self, request: Request, now: float) -> PauseMode:
        return PauseMode.DISCARD


class ImprovedDiscardPolicy(DiscardPolicy):
    name = "improved-discard"
    requeue_at_back = False


class SwapPolicy(Policy):
    """Swap the whole context out at pause (in the next step) and back in whole at resume.

    The copies are not budgeted, so a big swap stalls the step (the naive baseline). Without host
    room the request stays preserved, as the reference's chunk-fill scheduler does.
    """

    name = "swap"
    uses_host_pool = True

    def on_pause(self, request: Request, now: float) -> PauseMode:
        return PauseMode.SWAP

    def plan(self, sched: Scheduler, out: SchedulerOutput, now: float) -> None:
        for request in list(sched.paused.values()):
            if request.pause_mode is not PauseMode.SWAP:
                continue
            held = sched.blocks.num_blocks_of(request.request_id)
            if held == 0:
                continue
            if not sched.swap_out(request, held, out):
                request.pause_mode = PauseMode.PRESERVE


class HeuristicPolicy(SwapPolicy):
    """Spec 3.4: decide once at pause from the estimated call duration.

    H-S swaps calls of 4 s or more, H-D discards calls of 7 s or more, H-B preserves below 4 s,
    swaps below 7 s and discards beyond; everything else is preserved. The estimate is taken at
    the pause, so use an estimator that knows something then (oracle, tool-mean).
    """

    name = "heuristic"

    def __init__(self, estimator: DurationEstimator, variant: str = "H-B"):
        if variant not in HEURISTICS:
            raise ValueError(f"heuristic must be one of {sorted(HEURISTICS)}, got {variant!r}")
        self.estimator = estimator
        self.variant = variant
        self.swap_from, self.discard_from = HEURISTICS[variant]

    def on_pause(self, request: Request, now: float) -> PauseMode:
        duration = self.estimator.remaining(request.interceptions[-1], now)
        if self.discard_from is not None and duration >= self.discard_from:
            return PauseMode.DISCARD
        if self.swap_from is not None and duration >= self.swap_from:
            return PauseMode.SWAP
        return PauseMode.PRESERVE


class InferCeptPolicy(Policy):
    """Min-waste interception (spec 3.5), re-decided every step.

    Every paused request that holds device memory is scored by `min(preserve waste, chunked
    discard waste)`. The most wasteful are swapped out (from the back, block by block) while this
    step's swap-out budget lasts: swaps within the budget overlap the step and cost nothing. Each
    of the rest is discarded when recomputing it in chunks wastes less than keeping it, and
    preserved otherwise. The budget solves `in + out <= N(S)`, `in - out = F - S` with the host
    room enforced. When nothing waits and the step has spare compute, the oldest swapped request is
    recomputed instead of swapped in if that costs less time (`_active_discard`).
    """

    name = "infercept"
    uses_host_pool = True

    def __init__(self, profile: HardwareProfile, estimator: DurationEstimator | None = None):
        self.profile = profile
        self.estimator = estimator or OracleEstimator()

    def swap_budget(self, sched: Scheduler) -> tuple[int, int]:
        bs = sched.blocks.block_size
        budget = swap_budget(sched.blocks.device.num_free * bs, sched.blocks.host.num_free * bs,
                             self.profile, bs)
        return budget.in_blocks, budget.out_blocks

    def plan(self, sched: Scheduler, out: SchedulerOutput, now: float) -> None:
        self._active_discard(sched)
        for waste, w_preserve, w_discard, request in self._scored(sched, now):
            held = sched.blocks.num_blocks_of(request.request_id)
            if waste > 0 and sched.swap_out(request, held, out, partial=True):
                request.pause_mode = PauseMode.SWAP
            elif w_discard < w_preserve:
                sched.discard_paused(request, out)

    def victims(self, sched: Scheduler, now: float) -> list[Request]:
        return [request for _, _, _, request in self._scored(sched, now)]

    def _scored(self, sched: Scheduler, now: float) -> list[tuple[float, float, float, Request]]:
        """(waste, preserve waste, discard waste, request) of paused requests holding device
        blocks, most wasteful first."""
        bs = sched.blocks.block_size
        running_query, running_context = sched.running_tokens()
        scored = []
        for request in sched.paused.values():
            held = sched.blocks.num_blocks_of(request.request_id)
            if held == 0:
                continue
            on_device = min(held * bs, request.num_computed_tokens)
            remaining = self.estimator.remaining(request.interceptions[-1], now)
            w_preserve = preserve_waste(remaining, on_device)
            w_discard = chunked_discard_waste(request.num_computed_tokens, running_query, running_context,
                                              self.profile)
            scored.append((min(w_preserve, w_discard), w_preserve, w_discard, request))
        scored.sort(key=lambda item: (-item[0], item[3].priority_time))
        return scored

    def _active_discard(self, sched: Scheduler) -> None:
        """Nothing waits and compute is idle: recompute the oldest swapped request rather than
        spend the swap budget on it, if that is cheaper.

        The released code always recomputes here, as if idle compute were free. It is not: the
        chunks lengthen the steps by a_f per token. So the recompute (the whole context) is chosen
        only when that extra compute time is below the swap-in time of the host part (spec 8.1,
        "_active_discard generalized"). On the paper's A100 profiles the two are close; on a CPU,
        where compute is dear and copies are cheap, it never recomputes.
        """
        if sched.waiting or not sched.swapped:
            return
        if sched.running_tokens()[0] >= sched.config.max_num_batched_tokens:
            return
        oldest = min(sched.swapped, key=lambda r: r.priority_time)
        on_host = sched.blocks.num_host_blocks_of(oldest.request_id) * sched.blocks.block_size
        recompute_s = self.profile.fwd_ms_per_token * oldest.num_computed_tokens / 1000
        if recompute_s < self.profile.swap_seconds(on_host):
            sched.recompute_swapped(oldest)


def make_policy(name: str, profile: HardwareProfile | None = None,
                estimator: DurationEstimator | None = None, heuristic: str = "H-B",
                lamps: LampsOptions | None = None, seed: int = 0) -> Policy:
    """A policy by its name; `lamps` are LAMPS's options (default: oracle predictions, the paper's
    starvation threshold and quantum), `seed` its prediction noise."""
    if name == "discard":
        return DiscardPolicy()
    if name == "improved-discard":
        return ImprovedDiscardPolicy()
    if name == "preserve":
        return Policy()
    if name == "swap":
        return SwapPolicy()
    if name == "heuristic":
        return HeuristicPolicy(estimator or OracleEstimator(), heuristic)
    if name in ("infercept", "lamps"):
        if profile is None:
            raise ValueError(f"the {name} policy needs a HardwareProfile")
        if name == "infercept":
            return InferCeptPolicy(profile, estimator)
        from scheduling.lamps import LampsPolicy   # lamps.py builds on this module
        return LampsPolicy(profile, estimator, lamps, seed=seed)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")

"""InferCept's min-waste interception policy (spec 3.5), re-decided every step."""
from __future__ import annotations

from scheduling.estimators import DurationEstimator, OracleEstimator
from scheduling.policy import Policy, SchedulerView
from scheduling.profile import HardwareProfile
from scheduling.request import PauseMode, Request
from scheduling.waste import chunked_discard_waste, preserve_waste, swap_budget


def step_swap_budget(view: SchedulerView, profile: HardwareProfile) -> tuple[int, int]:
    """(swap-in, swap-out) blocks this step may copy behind its compute (spec 3.5.1 item 2), from
    the free device and host memory now: InferCept's budget, which LAMPS uses too."""
    bs = view.block_size
    budget = swap_budget(view.free_device_blocks * bs, view.free_host_blocks * bs, profile, bs)
    return budget.in_blocks, budget.out_blocks


class InferCeptPolicy(Policy):
    """Every paused request that holds device memory is scored by `min(preserve waste, chunked
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

    def swap_budget(self) -> tuple[int, int]:
        return step_swap_budget(self.view, self.profile)

    def plan(self, now: float) -> None:
        self._active_discard()
        for waste, w_preserve, w_discard, request in self._scored(now):
            if waste > 0 and self.view.swap_out(request, self.view.device_blocks(request), partial=True):
                request.pause_mode = PauseMode.SWAP
            elif w_discard < w_preserve:
                self.view.discard(request)

    def victims(self, now: float) -> list[Request]:
        return [request for _, _, _, request in self._scored(now)]

    def _scored(self, now: float) -> list[tuple[float, float, float, Request]]:
        """(waste, preserve waste, discard waste, request) of paused requests holding device
        blocks, most wasteful first."""
        view = self.view
        running_query, running_context = view.running_tokens()
        scored = []
        for request in view.paused:
            held = view.device_blocks(request)
            if held == 0:
                continue
            on_device = min(held * view.block_size, request.num_computed_tokens)
            remaining = self.estimator.remaining(request.interceptions[-1], now)
            w_preserve = preserve_waste(remaining, on_device)
            w_discard = chunked_discard_waste(request.num_computed_tokens, running_query, running_context,
                                              self.profile)
            scored.append((min(w_preserve, w_discard), w_preserve, w_discard, request))
        scored.sort(key=lambda item: (-item[0], item[3].priority_time))
        return scored

    def _active_discard(self) -> None:
        """Nothing waits and compute is idle: recompute the oldest swapped request rather than
        spend the swap budget on it, if that is cheaper.

        The released code always recomputes here, as if idle compute were free. It is not: the
        chunks lengthen the steps by a_f per token. So the recompute (the whole context) is chosen
        only when that extra compute time is below the swap-in time of the host part (spec 8.1,
        "_active_discard generalized"). On the paper's A100 profiles the two are close; on a CPU,
        where compute is dear and copies are cheap, it never recomputes.
        """
        view = self.view
        if view.waiting or not view.swapped:
            return
        if view.running_tokens()[0] >= view.token_budget:
            return
        oldest = min(view.swapped, key=lambda r: r.priority_time)
        on_host = view.host_blocks(oldest) * view.block_size
        recompute_s = self.profile.fwd_ms_per_token * oldest.num_computed_tokens / 1000
        if recompute_s < self.profile.swap_seconds(on_host):
            view.recompute(oldest)

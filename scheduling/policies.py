"""The baseline interception policies, and `make_policy`, which builds any policy by its name.

The baselines (spec 3): `discard` (vLLM: free at pause, resume at the back of the queue),
`improved-discard` (free at pause, keep arrival priority), `preserve`, `swap` (whole context out
at pause, unbudgeted), `heuristic` (H-S / H-D / H-B duration thresholds, decided once at pause).
All run on the same chunked scheduler as InferCept (`scheduling/infercept.py`) and LAMPS
(`scheduling/lamps.py`), so the comparison is fair (spec 8.1).
"""
from __future__ import annotations

from scheduling.estimators import DurationEstimator, OracleEstimator
from scheduling.infercept import InferCeptPolicy
from scheduling.lamps import LampsOptions, LampsPolicy
from scheduling.policy import Policy
from scheduling.profile import HardwareProfile
from scheduling.request import PauseMode, Request

POLICIES = ("discard", "improved-discard", "preserve", "swap", "heuristic", "infercept", "lamps")
HEURISTICS = {"H-S": (4.0, None), "H-D": (None, 7.0), "H-B": (4.0, 7.0)}  # (swap from, discard from) seconds


class PreservePolicy(Policy):
    """Keep every paused request's KV on the device until its result comes back."""

    name = "preserve"


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

    def plan(self, now: float) -> None:
        for request in list(self.view.paused):
            if request.pause_mode is not PauseMode.SWAP:
                continue
            held = self.view.device_blocks(request)
            if held == 0:
                continue
            if not self.view.swap_out(request, held):
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
        self.swap_from, self.discard_from = HEURISTICS[variant]

    def on_pause(self, request: Request, now: float) -> PauseMode:
        duration = self.estimator.remaining(request.interceptions[-1], now)
        if self.discard_from is not None and duration >= self.discard_from:
            return PauseMode.DISCARD
        if self.swap_from is not None and duration >= self.swap_from:
            return PauseMode.SWAP
        return PauseMode.PRESERVE


def make_policy(name: str, profile: HardwareProfile | None = None, estimator: DurationEstimator | None = None,
                heuristic: str = "H-B", lamps: LampsOptions | None = None, seed: int = 0) -> Policy:
    """A policy by its name. `estimator` gives call durations to the policies that weigh them
    (heuristic, infercept; default: the oracle); `lamps` are LAMPS's options (default: oracle
    predictions, the paper's starvation threshold and quantum), `seed` its prediction noise."""
    if name == "discard":
        return DiscardPolicy()
    if name == "improved-discard":
        return ImprovedDiscardPolicy()
    if name == "preserve":
        return PreservePolicy()
    if name == "swap":
        return SwapPolicy()
    if name == "heuristic":
        return HeuristicPolicy(estimator or OracleEstimator(), heuristic)
    if name in ("infercept", "lamps"):
        if profile is None:
            raise ValueError(f"the {name} policy needs a HardwareProfile")
        if name == "infercept":
            return InferCeptPolicy(profile, estimator)
        return LampsPolicy(profile, lamps, seed=seed)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")

"""LAMPS / MARS: rank queued work by predicted memory over time (spec 6).

InferCept decides how to hold a request during a tool call but serves the queues first come,
first served. LAMPS adds three things on the same scheduler:

  * **strategy in advance** (6.2): at arrival and at every resume, the next call's handling is
    fixed by the least predicted waste among preserve, chunked discard and swap; at the pause the
    request is swapped out (within the step's swap budget, over as many steps as it takes) or kept;
  * **ranking** (6.3): swapped and waiting requests form one list ordered by the predicted area
    under their memory-over-time curve, smallest first (running requests keep FCFS order);
  * **starvation prevention** (6.4): a request that ran before (resumed after a call, preempted)
    and has been queued for `threshold` consecutive steps gets a quantum of `quantum` steps at the
    front of the list.

Where this deviates from the released code (spec 6.3), it is to keep every score in the same unit,
token·seconds, from the machine's profile:
  * `mt` uses the profile's a, c and S (the code hard-codes a = 0.1 ms, c = 10 ms);
  * the swap cost is the memory held while the context is copied out and back in,
    `2 * T_swap(C) * C` (the code adds `blocks**2 / 4` and `0.1 * T_api`, in other units);
  * a segment that ends without a call scores its own generation only, `mt(C + L)` (the code's
    "complete" branches add the after-call part of a call that does not happen);
  * the remaining prediction shrinks as the request generates, so a preempted request is ranked
    by what it has left.

And two where it follows InferCept (spec 8.1, `InferCeptPolicy`):
  * a paused request planned for discard keeps its KV until a running or queued request needs the
    blocks, since memory nobody takes is not wasted, while the recompute costs compute (the
    released code discards at the pause);
  * when blocks are needed, the paused request whose eviction saves the most waste gives them up
    first (`w_p - w_d`, with its call's predicted remaining time), swapped out within the budget,
    else discarded. The released code evicts the largest planned waste and recomputes it, fixed
    at the last resume: at InferCept's knee on the mixed workload that recomputed 10x more and
    left LAMPS 4 % behind InferCept (docs/lamps.md).

Fresh requests do not count towards starvation, as in the released code, though a long new request
can then wait as long as shorter ones keep coming: counting them turned the ranking into first
come, first served under overload, worse than InferCept's own queues (docs/lamps.md).

One option goes beyond the paper. In one list, a resumed request whose KV sits in the host pool
ranks by its size like any other, so under load large ones stay parked there while small new
ones run; when the host pool fills, paused requests that should be swapped out are discarded
instead and recomputed. `swapped_first=True` serves the swapped requests (ranked among
themselves) before the waiting ones; the README has the measurements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scheduling.infercept import eviction_order, scored_paused, step_swap_budget
from scheduling.length_model import LengthModel
from scheduling.policy import Policy
from scheduling.predictors import DURATION_PREDICTORS, SegmentPrediction, SegmentPredictor, check_predictor_options
from scheduling.profile import HardwareProfile
from scheduling.request import PauseMode, Request
from scheduling.waste import chunked_discard_waste, preserve_waste, swap_waste


def _threshold(text: str) -> int | None:
    """The command line's spelling of a starvation threshold: 0 turns the guard off."""
    return int(text) or None


@dataclass(frozen=True)
class LampsOptions:
    """LAMPS's settings: `EngineConfig.lamps`, and one replay flag each (`--prediction-error`, ...),
    made from these fields and their `help`."""

    length_predictor: str | None = field(default=None, metadata={
        "help": "output-length model from `infercept predictor` (default: the trace's true lengths)"})
    duration_predictor: str = field(default="oracle", metadata={
        "help": "call durations from the trace (oracle) or each tool's running mean",
        "choices": DURATION_PREDICTORS})
    prediction_error: float = field(default=0.0, metadata={
        "help": "Gaussian relative error injected into the oracle pre-call lengths and call durations "
                "(0.2 is 20 percent); result lengths stay exact, as in the reference"})
    starvation_threshold: int | None = field(default=100, metadata={
        "help": "queued steps before a request jumps the line (default 100; 0 turns it off)",
        "parse": _threshold})
    starvation_quantum: int = field(default=100_000, metadata={
        "help": "steps a starving request then stays at the front (default 100000)"})
    rerank_interval: int = field(default=1, metadata={
        "help": "recompute the ranking every k steps, scores cached between (default 1)"})
    swapped_first: bool = field(default=False, metadata={
        "help": "serve swapped requests before waiting ones (the paper ranks them in one list)"})

    def __post_init__(self) -> None:
        check_predictor_options(self.duration_predictor, self.prediction_error)
        if self.starvation_threshold is not None and self.starvation_threshold < 1:
            raise ValueError(f"starvation_threshold must be None or >= 1, got {self.starvation_threshold}")
        if self.starvation_quantum < 1:
            raise ValueError(f"starvation_quantum must be >= 1, got {self.starvation_quantum}")
        if self.rerank_interval < 1:
            raise ValueError(f"rerank_interval must be >= 1, got {self.rerank_interval}")


@dataclass(slots=True)
class Plan:
    """LAMPS's per-request state: the segment's prediction, its strategy and its queue position."""

    prediction: SegmentPrediction
    mode: PauseMode = PauseMode.PRESERVE
    score: float = 0.0
    queued_since: int = 0                   # step from which the starvation counter counts
    front_until: int = -1                   # holds a quantum (sits at the front) before this step
    scored_for: tuple[int, int] | None = None   # (running query tokens, length) the score is for


class LampsPolicy(Policy):
    """InferCept's swap budget, waste model and eviction order, with the holding strategy fixed in
    advance and the queues ranked (module docstring). No call-duration estimator: every decision
    rests on the predictions made at arrival and at each resume."""

    name = "lamps"
    uses_host_pool = True
    ranks_queues = True

    def __init__(self, profile: HardwareProfile, options: LampsOptions | None = None,
                 predictor: SegmentPredictor | None = None, seed: int = 0):
        self.profile = profile
        self.options = options = options or LampsOptions()
        if predictor is None:
            model = LengthModel.load(options.length_predictor) if options.length_predictor else None
            predictor = SegmentPredictor(model, options.duration_predictor, options.prediction_error, seed)
        self.predictor = predictor
        self.plans: dict[str, Plan] = {}
        self.quanta_granted = 0             # how often the starvation guard moved a request to the front
        self._step = 0                      # steps advanced so far: the current one is _step - 1
        self._saturated_step_s = profile.fwd_seconds(profile.saturation_tokens)

    def swap_budget(self) -> tuple[int, int]:
        return step_swap_budget(self.view, self.profile)

    # ----------------------------------------------------------------- strategy in advance
    def on_arrival(self, request: Request, now: float) -> None:
        self._new_plan(request)

    def on_resume(self, request: Request, now: float) -> None:
        self.predictor.observe(request)
        self._new_plan(request)

    def on_finish(self, request: Request) -> None:
        del self.plans[request.request_id]

    def _new_plan(self, request: Request) -> None:
        plan = Plan(self.predictor.predict(request), queued_since=self._step)
        plan.mode, _ = self.classify(request, plan.prediction)
        plan.score = self.score(request, plan, self.view.running_tokens()[0], self.view.block_size)
        self.plans[request.request_id] = plan

    def classify(self, request: Request, prediction: SegmentPrediction) -> tuple[PauseMode, float]:
        """The least wasteful way to hold the request during its next call (spec 6.2), judged on
        the context it is predicted to have at the pause and the batch running now."""
        if prediction.call_seconds is None:
            return PauseMode.PRESERVE, 0.0
        context = _round_up(request.num_tokens + prediction.output_tokens, self.view.block_size)
        running_query, running_context = self.view.running_tokens()
        wastes = {
            PauseMode.PRESERVE: preserve_waste(prediction.call_seconds, context),
            PauseMode.DISCARD: chunked_discard_waste(context, running_query, running_context, self.profile),
            PauseMode.SWAP: swap_waste(context, running_context, self.profile),
        }
        mode = min(wastes, key=wastes.get)
        return mode, wastes[mode]

    def on_pause(self, request: Request, now: float) -> PauseMode:
        """The planned swap, else keep the KV: a planned discard waits until someone needs the
        memory (module docstring)."""
        mode = self.plans[request.request_id].mode
        return PauseMode.SWAP if mode is PauseMode.SWAP else PauseMode.PRESERVE

    def plan(self, now: float) -> None:
        """Carry out planned swaps within the step's swap-out budget (the rest wait for later
        steps; a full host pool leaves the request preserved until room appears)."""
        if self.view.swap_out_blocks_left == 0:
            return      # room on the device: the budget is 0 and nothing can move (the common case)
        for request in self.view.paused:
            if request.pause_mode is PauseMode.SWAP:
                held = self.view.device_blocks(request)
                if held:
                    self.view.swap_out(request, held, partial=True)

    def victims(self, now: float) -> list[Request]:
        """Paused requests holding device blocks, the eviction that saves the most waste first, as
        InferCept orders them, with each call's predicted remaining time (module docstring)."""
        return eviction_order(scored_paused(self.view, self.profile, lambda r: self._call_left(r, now)))

    def _call_left(self, request: Request, now: float) -> float:
        """Seconds its call is predicted to run after `now`, never negative."""
        call = request.interceptions[-1]
        predicted = self.plans[request.request_id].prediction.call_seconds or 0.0
        return max(0.0, predicted - (now - call.start_time))

    # ----------------------------------------------------------------- ranking
    def score(self, request: Request, plan: Plan, running_query: int, bs: int) -> float:
        """Predicted area under the request's memory-over-time curve from now, in token·seconds
        (spec 6.3): its generation up to the call, the call under the planned strategy, and the
        generation after it. `running_query` is the running batch's query tokens, `bs` the block
        size."""
        c_h = max(self.profile.saturation_tokens - running_query, 1)
        prediction = plan.prediction
        left = max(prediction.output_tokens - request.tokens_since_resume, 1)
        before_tokens = _round_up(request.num_tokens + left, bs)
        before = self._memory_time(before_tokens, c_h)
        if prediction.call_seconds is None:
            return before
        after_tokens = _round_up(left + prediction.result_tokens, bs)
        after = self._memory_time(after_tokens, c_h)
        if plan.mode is PauseMode.PRESERVE:
            return before + before_tokens * prediction.call_seconds + after
        if plan.mode is PauseMode.DISCARD:
            return before + self._memory_time(before_tokens + after_tokens, c_h)
        return before + 2 * self.profile.swap_seconds(before_tokens) * before_tokens + after

    def _memory_time(self, tokens: int, c_h: int) -> float:
        """Spec 6.3 `mt`: memory·time of building `tokens` of KV in saturated steps of c_h tokens,
        c_h being what the running batch leaves of the budget S."""
        n = max(-(-tokens // c_h), 1)
        return self._saturated_step_s * (1 + n) * n / 2 * c_h

    def on_running_scheduled(self) -> None:
        """Advance the step: count starvation (a request that ran before counts while it is queued,
        and restarts when it runs without a quantum), grant quanta, and re-score the queued requests
        every `rerank_interval` steps (a score changes only with the running batch's query tokens
        or the request's length, so unchanged ones are kept)."""
        step, self._step = self._step, self._step + 1
        threshold, quantum = self.options.starvation_threshold, self.options.starvation_quantum
        rescore = step % self.options.rerank_interval == 0
        # Scores depend on the batch only through c_h = max(S - running query, 1): clamp, so a
        # saturated batch of any size reuses the cached scores.
        running_query = min(self.view.running_tokens()[0], self.profile.saturation_tokens - 1) if rescore else 0
        for request in self.view.running:
            plan = self.plans[request.request_id]
            if plan.front_until <= step:
                plan.queued_since = step + 1
        for request in (*self.view.swapped, *self.view.waiting):
            plan = self.plans[request.request_id]
            if not request.has_run:
                plan.queued_since = step + 1     # a fresh request's counter does not run (spec 6.4)
            # steps queued, this one included: the counter goes up before the sort that checks it
            elif threshold is not None and plan.front_until <= step and step - plan.queued_since + 1 >= threshold:
                plan.front_until = step + quantum
                plan.queued_since = plan.front_until
                self.quanta_granted += 1
            if rescore and plan.scored_for != (running_query, request.num_tokens):
                plan.score = self.score(request, plan, running_query, self.view.block_size)
                plan.scored_for = (running_query, request.num_tokens)

    def queue_order(self) -> list[Request]:
        """Swapped and waiting requests in one list: quantum holders first (oldest first), then
        the rest by score, smallest first; with `swapped_first`, all swapped requests (ranked so)
        come before all waiting ones."""
        swapped_queue = 0 if self.options.swapped_first else 1
        keyed = []
        for queue, request in [*((swapped_queue, r) for r in self.view.swapped), *((1, r) for r in self.view.waiting)]:
            if self.is_starving(request):
                keyed.append(((queue, 0, request.priority_time, 0.0), request))
            else:
                keyed.append(((queue, 1, self.plans[request.request_id].score, request.priority_time), request))
        keyed.sort(key=lambda item: item[0])
        return [request for _, request in keyed]

    def is_starving(self, request: Request) -> bool:
        """Holds a quantum this step: it sits at the front, and nothing behind it may take the
        memory it waits for."""
        return self.plans[request.request_id].front_until >= self._step


def _round_up(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size) * block_size

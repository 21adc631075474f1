"""LAMPS's predictions for a request's next segment (spec 6.1): how many tokens it generates before
its next tool call, how long that call takes and how many tokens it returns.

Predictions are made once per segment, at arrival and at each resume, not every step (spec 6.5).
Each quantity has an oracle with an optional injected Gaussian relative error,
`true * max(0, 1 + N(0, error))` as the reference benchmark does, and a learned fallback:

  * output length: the trigger's exact count (`intercept_after`, `NextSegment.call_after`), or
    a `LengthModel` trained on the user's traces (`infercept predictor`); without either, the
    sampling budget left (an upper bound);
  * call duration: the caller's `SegmentHint` (trace replay knows the truth), or the running mean
    of the tool's past calls (`tool-mean`; the tool is the hint's, else the one the request called
    last, else all calls count);
  * result length: the hint, or the running mean of past results.

Whether a call ends the segment is read from the request's trigger (`NextSegment.ends_in_call`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from scheduling.length_model import LengthModel, SegmentFeatures
from scheduling.request import NextSegment, Request, SegmentHint

DURATION_PREDICTORS = ("oracle", "tool-mean")


@dataclass(frozen=True, slots=True)
class SegmentPrediction:
    output_tokens: int              # sampled before the next call, or before the end
    call_seconds: float | None      # the next call's duration; None: no call ends the segment
    result_tokens: int              # tokens the call returns (0 without a call)


class RunningMean:
    """Mean of observed values per key, with a global mean and a prior for unseen keys."""

    def __init__(self, prior: float):
        self.prior = prior
        self._sums: dict[object, list[float]] = {}

    def add(self, key: object, value: float) -> None:
        for k in (key, None) if key is not None else (None,):
            total = self._sums.setdefault(k, [0.0, 0])
            total[0] += value
            total[1] += 1

    def mean(self, key: object = None) -> float:
        total = self._sums.get(key) or self._sums.get(None)
        return total[0] / total[1] if total else self.prior


def check_predictor_options(duration: str, relative_error: float) -> None:
    """Raise ValueError on an unknown duration predictor or a negative (or NaN) error."""
    if duration not in DURATION_PREDICTORS:
        raise ValueError(f"duration_predictor must be one of {', '.join(DURATION_PREDICTORS)}, got {duration!r}")
    if not relative_error >= 0:
        raise ValueError(f"prediction_error must be >= 0, got {relative_error}")


class SegmentPredictor:
    def __init__(self, length_model: LengthModel | None = None, duration: str = "oracle",
                 relative_error: float = 0.0, seed: int = 0, prior_call_seconds: float = 1.0,
                 prior_result_tokens: float = 16.0):
        check_predictor_options(duration, relative_error)
        self.length_model = length_model
        self.duration = duration
        self.relative_error = relative_error
        self._rng = random.Random(seed)
        self._call_seconds = RunningMean(prior_call_seconds)
        self._result_tokens = RunningMean(prior_result_tokens)

    def predict(self, request: Request) -> SegmentPrediction:
        segment, hint = request.next_segment, request.hint or SegmentHint()
        if segment is None:
            raise ValueError(f"request {request.request_id} has no next segment to predict")
        output = self._output_tokens(request, segment)
        if not segment.ends_in_call:
            return SegmentPrediction(output, None, 0)
        tool = hint.tool or (request.interceptions[-1].tool if request.interceptions else None)
        if self.duration == "oracle" and hint.call_duration is not None:
            seconds = self._noisy(hint.call_duration)
        else:
            seconds = self._call_seconds.mean(tool)
        if hint.result_tokens is not None:     # exact, as the reference passes api_return_length
            result = hint.result_tokens
        else:
            result = round(self._result_tokens.mean(tool))
        return SegmentPrediction(output, seconds, result)

    def _output_tokens(self, request: Request, segment: NextSegment) -> int:
        if self.length_model is not None:
            predicted = self.length_model.predict(segment_features(request))
        elif segment.call_after is not None:
            predicted = round(self._noisy(segment.call_after))
        else:
            predicted = round(self._noisy(segment.max_output_tokens))
        return max(1, min(predicted, segment.max_output_tokens))

    def _noisy(self, value: float) -> float:
        if self.relative_error == 0:
            return value
        return value * max(0.0, 1.0 + self._rng.gauss(0.0, self.relative_error))

    def observe(self, request: Request) -> None:
        """Learn from the call that just returned (its end time and result length are set)."""
        call = request.interceptions[-1]
        if call.duration is not None:
            self._call_seconds.add(call.tool, call.duration)
        if call.result_tokens is not None:
            self._result_tokens.add(call.tool, call.result_tokens)


def segment_features(request: Request) -> SegmentFeatures:
    """The length model's view of a request whose next segment is about to start."""
    last = request.interceptions[-1] if request.interceptions else None
    return SegmentFeatures(
        context_tokens=request.num_tokens, calls_so_far=len(request.interceptions),
        last_output_tokens=last.segment_tokens if last else 0,
        last_result_tokens=(last.result_tokens or 0) if last else 0)

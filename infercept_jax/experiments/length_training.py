"""Training data for LAMPS's length model from traces: one example per segment, and the fit on a
request-wise split (`infercept predictor`, `scripts/lamps_study.py`)."""
from __future__ import annotations

from infercept_jax.experiments.workload import Trace
from scheduling.length_model import LengthModel, SegmentFeatures, split


def segment_examples(trace: Trace) -> tuple[list[SegmentFeatures], list[int]]:
    """One (features, completion tokens) example per segment of every request, for
    `scheduling.length_model.LengthModel.fit`: what the scheduler knows when the segment starts,
    and how many tokens it then generates."""
    features, lengths = [], []
    for request in trace.values():
        context, last_output, last_result = request.prompt_tokens, 0, 0
        for calls_so_far, segment in enumerate(request.segments):
            features.append(SegmentFeatures(context, calls_so_far, last_output, last_result))
            lengths.append(segment.completion_tokens)
            last_output, last_result = segment.completion_tokens, segment.api_token_length or 0
            context += last_output + last_result
    return features, lengths


def fit_length_model(trace: Trace, test_fraction: float = 0.2, seed: int = 0) -> tuple[LengthModel, Trace, Trace]:
    """Fit a LengthModel on a random share of the trace's requests; returns the model, the
    requests it was fitted on and the held-out ones. The split is by request, so that no request
    has segments on both sides."""
    keys = list(trace)
    train, test = split(len(keys), test_fraction, seed)
    fitted = {keys[i]: trace[keys[i]] for i in train}
    held_out = {keys[i]: trace[keys[i]] for i in test}
    return LengthModel.fit(*segment_examples(fitted), seed=seed), fitted, held_out

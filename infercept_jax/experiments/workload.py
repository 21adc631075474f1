"""Augmented-LLM workloads as token counts: load/save InferCept traces and generate synthetic ones.

A request is a prompt followed by segments: generate N tokens, pause T seconds for a call, append
R returned tokens, repeat (spec 1.3). The generator follows the *measured* table of spec 1.2 (the
released trace, already cut to 2048 tokens, which is what the reference benchmark replays), not
the paper's Table 1. Tokens and durations are lognormals with the table's mean ± sd (constant if
sd is 0); calls per request are rounded normals clipped to [1, max]. [mine] marks my choices:

  kind   calls/req       api_time (s)           returned tok  first prompt     generated tok
  math   2.79 ± 1.33 ≤4  8.3e-5 ± 4.8e-5        21 ± 5        411 ± 56         126 ± 140
  qa     3.17 ± 1.10 ≤4  0.72 ± 0.20            56.5 ± 8      934 ± 7          180 ± 134
  ve     5.20 ± 1.29 ≤8  0.086 ± 0.022          10.7 ± 12     1936 ± 194       8 ± 41
  chat   3.46 ± 1.96 ≤8  human turn             42 ± 42       117 ± 117        118 ± 118
  image  6.92 ± 3.92 ≤16 11.5 ± 0.9, human      7, 42 ± 42    117 ± 117        64 ± 8, 6
  tts    6.92 ± 3.92 ≤16 6.1 ± 2.7, human       7, 42 ± 42    117 ± 117        64 ± 8, 6

* Chat/image/TTS token means are the spec's chars/4 estimates; their sds (= mean) are [mine].
* Human turn: measured 28.2 ± 18.4 s with a 60 s cap (p90 = 60). A lognormal 34.2 ± 37.1 capped
  at 60 has exactly those moments [mine fit].
* Image/TTS alternate (spec 1.2). A model call follows the assistant's answer (64 tokens: the
  trace cuts answers at 256 chars) and returns the fixed instruction ("Generate an image about
  this. ", 7 tokens); a human turn follows the fixed reply ("Here is a generated image. ", 6
  tokens) and returns the user's next message (as chat) [mine]. The averages, 35 generated and
  24.5 returned, match the table's ≈34 and ≈25; the times average 19.9 (image) and 17.2 (TTS).
* Generated and returned counts are >= 1 [mine]. The last segment has no call; its completion is
  drawn like the generation before the next call would be.
* Fitting `max_context` (the released trace was cut to 2048): a request that would outgrow it
  first gives up prompt tokens (down to half its prompt), then drops calls from the end, then cuts
  its final completion; the first call is shrunk rather than dropped, so every request keeps one.
  Shrinking the prompt first keeps VE at ~5.2 calls (cutting calls alone leaves ~3.5). At 2048,
  VE prompts average ~1860, and QA keeps ~95 % of its calls with prompts of 914 ± 78.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

KINDS = ("math", "qa", "ve", "chat", "image", "tts")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """Generate `completion_tokens`, then (if the segment has a call) pause `api_time` seconds and
    receive `api_token_length` tokens. A call on the last segment is kept: the request pauses,
    receives the result, and replay samples one more token, as the reference does (every
    text-form request in the released trace ends this way)."""

    completion_tokens: int
    api_time: float | None = None          # None: no call after this segment
    api_token_length: int | None = None

    def __post_init__(self) -> None:
        if (self.api_time is None) != (self.api_token_length is None):
            raise ValueError("a call needs both api_time and api_token_length")

    @property
    def has_call(self) -> bool:
        return self.api_time is not None


@dataclass(frozen=True)
class TraceRequest:
    key: str
    prompt_tokens: int                      # segment 0's prompt; later prompts are the running context
    segments: tuple[Segment, ...]
    kind: str | None = None                 # augmentation class: given, generated or inferred on load

    @property
    def num_calls(self) -> int:
        return sum(s.has_call for s in self.segments)

    @property
    def total_completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.segments)

    @property
    def total_api_tokens(self) -> int:
        return sum(s.api_token_length or 0 for s in self.segments)

    @property
    def final_context(self) -> int:
        return self.prompt_tokens + self.total_completion_tokens + self.total_api_tokens


Trace = dict[str, TraceRequest]


class Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...


DEFAULT_TOKENIZER = "smollm2-135m"     # the default model's


class ModelTokenizer:
    """A model's tokenizer (name or path, as `models.registry.load_tokenizer` takes), loaded at the
    first text it measures: a token-count trace loads none, and the simulator imports no model code
    until a text-form trace needs it. It encodes as the engine does, so counts match a real replay."""

    def __init__(self, name_or_path: str = DEFAULT_TOKENIZER):
        self.name_or_path = name_or_path
        self._tokenizer: Tokenizer | None = None

    def encode(self, text: str) -> Sequence[int]:
        if self._tokenizer is None:
            from models.registry import load_tokenizer

            self._tokenizer = load_tokenizer(self.name_or_path)
        return self._tokenizer.encode(text)


# ---- loading and saving ---------------------------------------------------------------------

# (prompt, completion, returned) field names of the two segment forms; api_time is shared.
_FORMS = {"token-count": ("prompt_tokens", "completion_tokens", "api_token_length"),
          "text": ("prompt", "completion", "api_token")}


def load_trace(path: str | Path, tokenizer: Tokenizer | None = None) -> Trace:
    """Read an InferCept/MARS trace file (`dict[request key -> list[segment]]`); see `parse_trace`."""
    with open(path) as f:
        data = json.load(f)
    return parse_trace(data, tokenizer)


def parse_trace(data: Any, tokenizer: Tokenizer | None = None) -> Trace:
    """Validate a decoded trace and convert it to token counts; raises ValueError naming the
    request, segment and field at fault, and returns nothing until every request is valid.

    Only segment 0's prompt is read (later ones are the running context). Text-form strings are
    measured as `len(tokenizer.encode(text))`, as the reference benchmark does. A segment without
    api fields has no call and must be the last one. Requests keep the file's order, which the
    reference's sampling depends on. A request without a `kind` field gets the class `infer_kind`
    reads from it, so the authors' files, which name none, split by augmentation as generated
    traces do.

    A negative prompt_tokens or api_token_length is read as 0, as the reference does (it sends
    `[0] * n` tokens, empty when n < 0; the released trace has four api_token_length of -2), with
    one warning naming them all.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a trace must be a JSON object of request key -> segments, got {type(data).__name__}")
    if not data:
        raise ValueError("the trace has no requests (an empty JSON object)")
    negatives: list[str] = []       # "request 'k' segment i: name n", read as 0
    trace = {str(key): _parse_request(str(key), segments, tokenizer, negatives) for key, segments in data.items()}
    if negatives:
        log.warning(f"read {len(negatives)} negative token count(s) as 0, as the reference benchmark does: "
                    + "; ".join(negatives))
    return trace


def _parse_request(key: str, segments: Any, tokenizer: Tokenizer | None, negatives: list[str]) -> TraceRequest:
    where = f"request {key!r}"
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"{where}: must be a non-empty list of segments, got {_short(segments)}")
    form, prompt, kind, parsed = None, 0, None, []
    for i, seg in enumerate(segments):
        at = f"{where} segment {i}"
        if not isinstance(seg, dict):
            raise ValueError(f"{at}: must be a JSON object, got {_short(seg)}")
        known = {"api_time", *_FORMS["token-count"], *_FORMS["text"]} | ({"kind"} if i == 0 else set())
        for name in seg:
            if name not in known:
                raise ValueError(f"{at}: unknown field {name!r}")
        used = [f for f, names in _FORMS.items() if any(n in seg for n in names)]
        if len(used) > 1:
            raise ValueError(f"{at}: mixes token-count fields {_FORMS['token-count']} and text fields {_FORMS['text']}")
        seg_form = used[0] if used else "token-count"
        if form is not None and seg_form != form:
            raise ValueError(f"{at}: is in {seg_form} form but segment 0 is in {form} form")
        form = seg_form
        prompt_name, completion_name, result_name = _FORMS[form]
        if i == 0:
            prompt = _length(seg, prompt_name, at, tokenizer, negatives)
            kind = seg.get("kind")
            if kind is not None and not isinstance(kind, str):
                raise ValueError(f"{at}: kind must be a string, got {_short(kind)}")
        completion = _length(seg, completion_name, at, tokenizer, negatives)
        if ("api_time" in seg) != (result_name in seg):
            present, missing = ("api_time", result_name) if "api_time" in seg else (result_name, "api_time")
            raise ValueError(f"{at}: {present} without {missing}")
        if "api_time" not in seg:
            if i != len(segments) - 1:
                raise ValueError(f"{at}: has no call (no api_time/{result_name}) but is not the last segment")
            parsed.append(Segment(completion))
            continue
        api_time = seg["api_time"]
        if isinstance(api_time, bool) or not isinstance(api_time, (int, float)) \
                or not math.isfinite(api_time) or api_time < 0:
            raise ValueError(f"{at}: api_time must be a number >= 0, got {_short(api_time)}")
        parsed.append(Segment(completion, float(api_time), _length(seg, result_name, at, tokenizer, negatives)))
    if kind is None:
        kind = infer_kind(form, segments, parsed, prompt)
    return TraceRequest(key, prompt, tuple(parsed), kind)


# The fixed instructions of the released trace's model calls (spec 1.2); in text form, a request
# with neither is a chat, whose calls are all the human's turns.
_MODEL_CALL_KINDS = {"Generate an image about this.": "image", "Convert this to text to speech.": "tts"}
# A token-count request's first prompt is its dataset's few-shot prompt: 370-483 tokens for math
# (GSM8K-XL), 923-955 for QA (HotpotQA), 1973 for VE (ALFWorld) in the released trace.
_MATH_MAX_PROMPT, _QA_MAX_PROMPT = 700, 1450


def infer_kind(form: str, raw_segments: list[dict], segments: Sequence[Segment], prompt_tokens: int) -> str | None:
    """The augmentation class of a request whose file does not name it: text-form requests by
    their model call's instruction (spec 1.2), token-count ones by their first prompt's length.
    Spec 1.2 splits the latter by median call time instead (99/47/56 requests); that puts three QA
    requests whose calls returned fast among math and VE, and classes a single-call request of
    the LAMPS subset by one call only, where the prompt gives each request the class it has in
    the full mixture. None for a request without calls."""
    if not any(segment.has_call for segment in segments):
        return None
    if form == "text":
        for seg in raw_segments:
            kind = _MODEL_CALL_KINDS.get(str(seg.get("api_token", "")).strip())
            if kind is not None:
                return kind
        return "chat"
    return "math" if prompt_tokens < _MATH_MAX_PROMPT else "qa" if prompt_tokens < _QA_MAX_PROMPT else "ve"


# Counts the reference replays as `[0] * n` tokens, so a negative one means none. A negative
# completion_tokens is refused: the reference would never trigger that segment's call.
_ZERO_IF_NEGATIVE = ("prompt_tokens", "api_token_length")


def _length(seg: dict, name: str, at: str, tokenizer: Tokenizer | None, negatives: list[str]) -> int:
    """A token count, read directly (token-count form) or by tokenizing a string (text form)."""
    if name not in seg:
        raise ValueError(f"{at}: missing field {name!r}")
    value = seg[name]
    if name in _FORMS["text"]:
        if not isinstance(value, str):
            raise ValueError(f"{at}: {name} must be a string, got {_short(value)}")
        if tokenizer is None:
            raise ValueError(f"{at}: field {name!r} is text, which needs a tokenizer (load_trace(path, tokenizer))")
        return len(tokenizer.encode(value))
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and name not in _ZERO_IF_NEGATIVE):
        raise ValueError(f"{at}: {name} must be an integer >= 0, got {_short(value)}")
    if value < 0:
        negatives.append(f"{at}: {name} {value}")
        return 0
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write the token-count form; each segment's prompt_tokens is the running context, as in the
    released trace, and segment 0 carries `kind` when known."""
    out = {}
    for key, request in trace.items():
        context, segments = request.prompt_tokens, []
        for segment in request.segments:
            seg: dict[str, Any] = {"prompt_tokens": context, "completion_tokens": segment.completion_tokens}
            if segment.has_call:
                seg["api_time"] = segment.api_time
                seg["api_token_length"] = segment.api_token_length
            segments.append(seg)
            context += segment.completion_tokens + (segment.api_token_length or 0)
        if request.kind is not None:
            segments[0]["kind"] = request.kind
        out[key] = segments
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


# ---- synthetic workloads --------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """Lognormal with this mean and sd (the mean itself when sd is 0), capped at `hi`."""

    mean: float
    sd: float
    hi: float = math.inf

    def draw(self, rng: np.random.Generator) -> float:
        if self.sd == 0:
            return min(self.mean, self.hi)
        sigma2 = math.log1p((self.sd / self.mean) ** 2)
        return min(float(rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2))), self.hi)

    def draw_int(self, rng: np.random.Generator) -> int:
        """A token count: at least 1, so every call has something before and after it."""
        return max(1, round(self.draw(rng)))


@dataclass(frozen=True)
class Call:
    """One kind of interception: tokens generated before it, its duration, tokens it returns."""

    generated: Dist
    api_time: Dist
    returned: Dist


@dataclass(frozen=True)
class KindParams:
    prompt: Dist
    calls: tuple[float, float, int]       # mean, sd, max of a rounded normal clipped to [1, max]
    cycle: tuple[Call, ...]               # call i is cycle[i % len(cycle)]


_HUMAN_TIME = Dist(34.2, 37.1, hi=60.0)    # 28.2 ± 18.4 after the 60 s cap
_HUMAN = Call(generated=Dist(118, 118), api_time=_HUMAN_TIME, returned=Dist(42, 42))
_ANSWER, _INSTRUCTION, _ACK = Dist(64, 8), Dist(7, 0), Dist(6, 0)
_AFTER_MEDIA = Call(generated=_ACK, api_time=_HUMAN_TIME, returned=Dist(42, 42))

PARAMS: dict[str, KindParams] = {
    "math": KindParams(Dist(411, 56), (2.79, 1.33, 4),
                       (Call(Dist(126, 140), Dist(8.3e-5, 4.8e-5), Dist(21, 5)),)),
    "qa": KindParams(Dist(934, 7), (3.17, 1.10, 4),
                     (Call(Dist(180, 134), Dist(0.72, 0.20), Dist(56.5, 8)),)),
    "ve": KindParams(Dist(1936, 194), (5.20, 1.29, 8),
                     (Call(Dist(8, 41), Dist(0.086, 0.022), Dist(10.7, 12)),)),
    "chat": KindParams(Dist(117, 117), (3.46, 1.96, 8), (_HUMAN,)),
    "image": KindParams(Dist(117, 117), (6.92, 3.92, 16),
                        (Call(_ANSWER, Dist(11.5, 0.9), _INSTRUCTION), _AFTER_MEDIA)),
    "tts": KindParams(Dist(117, 117), (6.92, 3.92, 16),
                      (Call(_ANSWER, Dist(6.1, 2.7), _INSTRUCTION), _AFTER_MEDIA)),
}


def generate_workload(kind: str, n: int, seed: int = 0, single_call: bool = False,
                      max_context: int = 2048) -> Trace:
    """`n` requests of one kind (or "mixed": each request's kind uniform over KINDS), keyed
    "<kind>-<i>"; the same arguments always give the same trace."""
    if kind not in PARAMS and kind != "mixed":
        raise ValueError(f"unknown workload kind {kind!r}; expected one of {KINDS} or 'mixed'")
    if n < 0 or max_context < 4:
        raise ValueError(f"need n >= 0 and max_context >= 4, got n={n}, max_context={max_context}")
    rng = np.random.default_rng(seed)
    trace = {}
    for i in range(n):
        k = KINDS[rng.integers(len(KINDS))] if kind == "mixed" else kind
        trace[f"{k}-{i}"] = _generate_request(f"{k}-{i}", k, rng, single_call, max_context)
    return trace


def _generate_request(key: str, kind: str, rng: np.random.Generator, single_call: bool,
                      max_context: int) -> TraceRequest:
    p = PARAMS[kind]
    mean, sd, most = p.calls
    n_calls = 1 if single_call else int(np.clip(round(rng.normal(mean, sd)), 1, most))
    drawn = p.prompt.draw_int(rng)
    calls = [(c.generated.draw_int(rng), c.api_time.draw(rng), c.returned.draw_int(rng))
             for c in (p.cycle[i % len(p.cycle)] for i in range(n_calls))]
    # Fit max_context: give up prompt tokens (down to half), then calls, then final tokens.
    room_for_calls = max_context - 1 - sum(g + r for g, _, r in calls)
    prompt = min(max(room_for_calls, (drawn + 1) // 2), drawn, max_context - 3)
    context, segments = prompt, []
    for generated, api_time, returned in calls:
        room = max_context - context - 1                       # keep one token for the final completion
        if generated + returned > room:
            if segments:
                break
            generated = min(generated, room - 1)               # the first call is shrunk, not dropped
            returned = min(returned, room - generated)
        segments.append(Segment(generated, api_time, returned))
        context += generated + returned
    final = p.cycle[len(segments) % len(p.cycle)].generated.draw_int(rng)
    segments.append(Segment(min(final, max_context - context)))
    return TraceRequest(key, prompt, tuple(segments), kind)


def scale_tokens(trace: Trace, factor: float) -> Trace:
    """The same requests with every token count times `factor` (a count that was not 0 stays at
    least 1): a paper-scale workload shrunk to what a small model on a CPU serves in minutes."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    scale = lambda n: n if n is None or n == 0 else max(1, round(n * factor))  # noqa: E731
    return {key: TraceRequest(r.key, scale(r.prompt_tokens),
                              tuple(Segment(scale(s.completion_tokens), s.api_time, scale(s.api_token_length))
                                    for s in r.segments), r.kind)
            for key, r in trace.items()}


def describe(trace: Trace) -> dict[str, dict[str, float]]:
    """Per-kind means (requests without a kind count as "unknown"), plus "all"."""
    groups: dict[str, list[TraceRequest]] = defaultdict(list)
    for request in trace.values():
        groups[request.kind or "unknown"].append(request)
    if trace:
        groups["all"] = list(trace.values())
    summary = {}
    for kind, requests in groups.items():
        times = [s.api_time for r in requests for s in r.segments if s.has_call]
        summary[kind] = {
            "requests": len(requests),
            "calls": float(np.mean([r.num_calls for r in requests])),
            "api_time": float(np.mean(times)) if times else 0.0,
            "prompt": float(np.mean([r.prompt_tokens for r in requests])),
            "completion_tokens": float(np.mean([r.total_completion_tokens for r in requests])),
            "returned_tokens": float(np.mean([r.total_api_tokens for r in requests])),
            "final_context": float(np.mean([r.final_context for r in requests])),
            "max_final_context": max(r.final_context for r in requests),
        }
    return summary

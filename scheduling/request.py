"""The one request object the scheduler, the engine and the runner share."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"          # in the queue: no KV, or its KV was freed (preempted, discarded)
    RUNNING = "running"          # holds device blocks and gets query tokens each step
    PAUSED = "paused"            # intercepted: waits for a tool result; its KV is kept, swapped or freed
    SWAPPED = "swapped"          # resumed, but some of its KV is still in the host pool
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class PauseMode(enum.Enum):
    """What happens to a paused request's KV (InferCept's three options)."""

    PRESERVE = "preserve"   # stays in the device pool
    SWAP = "swap"           # moves to the host pool, block by block from the back
    DISCARD = "discard"     # freed; recomputed in chunks after the resume


@dataclass(slots=True)
class Interception:
    """One pause of a request: the tool call and its timing."""

    key: tuple[str, int]              # (request id, index of this pause in the request)
    start_time: float
    tool: str | None = None           # the called tool's name, when the trigger parsed one
    call_text: str | None = None      # the call as the model wrote it
    expected_duration: float | None = None   # oracle duration in seconds (trace replay)
    end_time: float | None = None     # when the result came back
    segment_tokens: int = 0           # tokens sampled in the segment that ended in this call
    result_tokens: int | None = None  # tokens the result appended, once it came back

    @property
    def duration(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.start_time


@dataclass(frozen=True, slots=True)
class SegmentHint:
    """What the caller knows of a request's next tool call: the oracle that the `oracle` duration
    estimator and LAMPS's oracle predictions read. Trace replay knows all of it and gives it at
    arrival and with each result (`Engine.add_request` / `Engine.resume`); an interactive caller
    usually gives none, and the estimators and predictors fall back to what they learn."""

    call_duration: float | None = None    # seconds the next call takes
    result_tokens: int | None = None      # tokens the next call returns
    tool: str | None = None               # the tool the next call goes to (names an intercept_after pause)

    def __post_init__(self) -> None:
        if self.call_duration is not None and not (isinstance(self.call_duration, (int, float))
                                                   and self.call_duration >= 0):
            raise ValueError(f"call_duration must be None or a number >= 0, got {self.call_duration!r}")
        if self.result_tokens is not None and (not isinstance(self.result_tokens, int) or self.result_tokens < 0):
            raise ValueError(f"result_tokens must be None or an integer >= 0, got {self.result_tokens!r}")
        if self.tool is not None and not isinstance(self.tool, str):
            raise ValueError(f"tool must be None or a string, got {self.tool!r}")


@dataclass(frozen=True, slots=True)
class NextSegment:
    """What the request's own sampling parameters bound of its next segment, for LAMPS's
    predictions; the engine sets it at arrival and at each resume."""

    max_output_tokens: int                # sampling budget left (max_tokens minus what was sampled)
    ends_in_call: bool                    # a tool call may end the segment
    call_after: int | None = None         # the call comes after exactly this many tokens (intercept_after)


# A token a launched step is sampling (async scheduling): the runner reads it on the device.
PLACEHOLDER_TOKEN = -1


@dataclass(slots=True, eq=False)
class Request:
    """A sequence being served.

    `token_ids` is everything the sequence holds (prompt, generated tokens and tool results);
    `num_computed_tokens` of them have KV (in the device pool, or partly swapped to the host pool).
    The scheduler gives a request `min(num_inflight_tokens, budget left)` query tokens; when a step
    computes its last in-flight token, the runner samples the next one. A prefill chunk, a decode,
    a tool result and a recompute after a discard are all the same thing: in-flight tokens.
    `priority_time` orders the queues (FCFS): the arrival time, kept across pauses, except under
    vLLM's discard policy, which re-queues a resumed request as if it had just arrived.
    Requests compare by identity: two requests are never the same one because their fields agree.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: Any
    arrival_time: float
    seed: int = 0
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    output_text: str = ""
    priority_time: float | None = None
    num_generated_tokens: int = 0          # sampled tokens (tool results are not counted)
    tokens_since_resume: int = 0           # sampled since the start or the last resume
    interceptions: list[Interception] = field(default_factory=list)
    pause_mode: PauseMode | None = None    # while paused: where its KV is meant to be
    recompute_until: int = 0               # positions below this had KV before and are recomputed
    call_search_from: int = 0              # output text offset after the last tool result: where the next
                                           #   tool call or stop string may start
    text_offsets: tuple[int, int] = (0, 0)  # token_ids[a:b] was decoded last; output_text covers [:b]
    next_segment: NextSegment | None = None   # what its sampling parameters bound of the next segment
    hint: SegmentHint | None = None        # the caller's oracle of the next call (trace replay)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.text_offsets == (0, 0):
            self.text_offsets = (self.num_prompt_tokens, self.num_prompt_tokens)
        if self.priority_time is None:
            self.priority_time = self.arrival_time

    @property
    def interception(self) -> Interception | None:
        """The current pause's call, while the request is paused."""
        return self.interceptions[-1] if self.status is RequestStatus.PAUSED else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def has_run(self) -> bool:
        """It had KV at some point: it holds some now, or recomputes what it had (preempted,
        discarded at a call, moved off the host)."""
        return self.num_computed_tokens > 0 or self.recompute_until > 0

    @property
    def num_inflight_tokens(self) -> int:
        """Tokens that have no KV yet: the prompt, a resumed result, a discarded context."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

"""The engine loop: schedule, run one step, append tokens, pause or finish requests.

`Engine.step()` is the whole flow: the scheduler fills the token budget and plans KV moves, the
runner makes the swap copies and executes one step, and the engine appends sampled tokens,
checks stop conditions and interception triggers. A paused request waits for `Engine.resume()`,
which appends the tool result as input tokens. The runner and the clock are injected, so the
simulator drives the same code on virtual time; `infercept_jax.build.build_engine` assembles both.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from infercept_jax.config import EngineConfig, SamplingParams
from infercept_jax.detokenizer import Detokenizer, partial_marker_length, truncate_at_stop
from infercept_jax.outputs import RequestOutput
from scheduling.accounting import StepUsage, WasteMeter
from scheduling.output import SchedulerOutput
from scheduling.request import PLACEHOLDER_TOKEN, Interception, NextSegment, Request, RequestStatus, SegmentHint
from scheduling.scheduler import Scheduler


class Runner(Protocol):
    def execute(self, output: SchedulerOutput) -> tuple[list[tuple[Request, int]], float]:
        """Run one step: (the sampled (request, token) pairs, seconds stalled on swap copies)."""


class OverlappingRunner(Runner, Protocol):
    """A runner that can start a step and collect it later (`async_scheduling`)."""

    def launch(self, output: SchedulerOutput) -> object:
        """Start the step; its inputs may hold `PLACEHOLDER_TOKEN`s sampled by the step launched before."""

    def collect(self, launched: object) -> tuple[list[tuple[Request, int]], float]:
        """Wait for a launched step: what `execute` returns."""


@dataclass(slots=True)
class _Flight:
    """A launched step: its plan, the runner's handle (or, in sync mode, its result), when it was
    launched, its share of the waste accounting, each request's query tokens in it, and where each
    request it samples for holds the placeholder of its token (`stale`: requests whose sample is
    void, paused or finished since)."""
    output: SchedulerOutput
    handle: object
    launched_at: float
    usage: StepUsage
    query_tokens: dict[str, int] = field(default_factory=dict)
    placeholders: dict[str, int] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)


class Engine:
    def __init__(self, runner: Runner, scheduler: Scheduler, config: EngineConfig, *, vocab_size: int,
                 eos_token_ids=(), tokenizer=None, clock: Callable[[], float] = time.monotonic):
        self.runner = runner
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.config = config
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.max_model_len = config.max_model_len
        pool_tokens = self.blocks.device.capacity * self.blocks.block_size
        # A sequence can never outgrow the device pool: it finishes with "length" there.
        self.context_limit = min(self.max_model_len, pool_tokens)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        self.waste = WasteMeter(pool_tokens)
        self.num_steps = 0                 # steps launched (a step with nothing to do does not count)
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling and not hasattr(runner, "launch"):
            raise ValueError(f"async_scheduling needs a runner that launches a step and collects it later; "
                             f"{type(runner).__name__} only executes steps")
        self._in_flight: _Flight | None = None
        self._last_collect = float("-inf")
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seed_rng = np.random.default_rng(config.seed)

    # ----------------------------------------------------------------- requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, hint: SegmentHint | None = None) -> str:
        """Validate and queue a request; raises ValueError on bad input, leaving the engine as it was.
        `hint`: what the caller knows of the request's first tool call (trace replay)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        self._check_tool_format(params)
        _check_hint(hint)
        text, token_ids = self._tokenize(prompt, "prompt")
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the model's context (max_model_len) is "
                             f"{self.max_model_len}, which leaves no room to generate")
        blocks = -(-(len(token_ids) + 1) // self.blocks.block_size)
        if blocks > self.blocks.device.capacity:
            raise ValueError(f"prompt needs {blocks} KV blocks but the pool has {self.blocks.device.capacity}; "
                             "raise num_kv_blocks or kv_cache_memory_gb")
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**32))
        now = self.clock()
        request = Request(request_id, token_ids, params, now, seed=seed, prompt=text, hint=hint)
        request.next_segment = self._next_segment(request)
        self.requests[request_id] = request
        self.scheduler.add(request, now)
        return request_id

    def _check_tool_format(self, params: SamplingParams) -> None:
        if params.tool_format is not None and self.tokenizer is not None:
            params.tool_format.check_markers(self.tokenizer.special_tokens)

    def _tokenize(self, text_or_ids: str | list[int], what: str) -> tuple[str | None, list[int]]:
        if isinstance(text_or_ids, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            return text_or_ids, self.tokenizer.encode_prompt(text_or_ids)
        if isinstance(text_or_ids, (list, tuple, np.ndarray)) and all(
                isinstance(t, (int, np.integer)) for t in text_or_ids):
            token_ids = [int(t) for t in text_or_ids]
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{what} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            return None, token_ids
        raise ValueError(f"a {what} is a string or a list of token ids, got {type(text_or_ids).__name__}")

    def resume(self, request_id: str, result: str | list[int], params: SamplingParams | None = None,
               hint: SegmentHint | None = None) -> RequestOutput:
        """Append a paused request's tool result as input tokens and queue it again.

        The result gets KV like a prefill chunk and does not count against `max_tokens`; the
        request keeps its arrival priority (except under vLLM's discard policy). The returned
        output's `num_cached_tokens` is the context whose KV the pause kept. A text result is
        rendered with the request's tool format. `params` and `hint`, if given, replace the
        request's (trace replay installs the next segment's trigger and oracle this way). A result
        that does not fit the context is truncated and the request finishes with reason "length":
        the returned output is then its final one (no step will report it). Raises KeyError /
        ValueError, leaving the engine as it was.
        """
        request = self._get(request_id)
        if request.status is not RequestStatus.PAUSED:
            raise ValueError(f"request {request_id!r} is not paused (it is {request.status.value})")
        if params is not None:
            if not isinstance(params, SamplingParams):
                raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
            self._check_tool_format(params)
        _check_hint(hint)
        token_ids = self._result_tokens(request, result)
        if params is not None:
            request.sampling = params
        if hint is not None:
            request.hint = hint
        kept = request.num_computed_tokens
        now = self.clock()
        call = request.interceptions[-1]
        call.end_time = now
        room = self.context_limit - request.num_tokens
        truncated = len(token_ids) >= room
        request.token_ids.extend(token_ids[:room])
        call.result_tokens = min(len(token_ids), room)
        self.detokenizer.update(request, final=truncated)
        request.call_search_from = len(request.output_text)
        request.next_segment = self._next_segment(request)
        self.scheduler.resume(request, now)
        if truncated:
            self._finish(request, RequestStatus.FINISHED_LENGTH)
        out = self._output(request, [])
        out.num_cached_tokens = kept
        return out

    def _result_tokens(self, request: Request, result: str | list[int]) -> list[int]:
        """A tool result's tokens: text is rendered with the request's tool format, then encoded."""
        if isinstance(result, str) and self.tokenizer is not None:
            format_ = request.sampling.tool_format
            return self.tokenizer.encode(format_.render(result) if format_ is not None else result)
        return self._tokenize(result, "tool result")[1]

    def abort(self, request_id: str) -> RequestOutput:
        request = self._get(request_id)
        if not request.status.finished:
            self._take_back(request)
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        return self._output(request, [])

    @staticmethod
    def _next_segment(request: Request) -> NextSegment:
        """What the request's SamplingParams bound of its next segment (LAMPS predicts from it)."""
        params: SamplingParams = request.sampling
        return NextSegment(
            max_output_tokens=max(params.max_tokens - request.num_generated_tokens, 1),
            ends_in_call=(Engine._may_call(request)
                          and (params.intercept_after is not None or params.tool_format is not None)),
            call_after=params.intercept_after)

    @staticmethod
    def _may_call(request: Request) -> bool:
        """Whether the request may still be intercepted (`max_interceptions` not reached)."""
        limit = request.sampling.max_interceptions
        return limit is None or len(request.interceptions) < limit

    def _get(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request id {request_id!r}") from None

    def has_work(self) -> bool:
        """Whether a step can do anything (paused requests wait for their results; a launched
        step waits to be collected)."""
        return self.scheduler.has_work() or self._in_flight is not None

    def has_unfinished(self) -> bool:
        """Requests still running, queued or paused."""
        return self.has_work() or bool(self.scheduler.paused)

    def pop_finished(self, request_id: str) -> Request:
        """Forget a finished request (the caller has its output)."""
        request = self._get(request_id)
        if not request.status.finished:
            raise ValueError(f"request {request_id!r} is not finished")
        return self.requests.pop(request_id)

    # ----------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        """One iteration; returns an output for every request that got a token, paused or finished.

        The step scheduled now is launched; with `async_scheduling` the engine then collects the
        step launched by the previous call (it ran on the device while the host scheduled and
        prepared this one), else the one it just launched. A request the running step samples for
        holds a `PLACEHOLDER_TOKEN` until the step is collected, so the scheduler can already give
        it its next token, which the runner reads on the device from the step before.
        """
        start = self.clock()
        output = self.scheduler.schedule(start)
        launched = None if output.is_empty else self._launch(output, start)
        if self.async_scheduling:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        return [] if done is None else self._collect(done)

    def _launch(self, output: SchedulerOutput, start: float) -> _Flight:
        usage = self.waste.measure(self.scheduler, output)
        samplers = [item.request for item in output.scheduled if item.samples]
        handle = self.runner.launch(output) if self.async_scheduling else self.runner.execute(output)
        flight = _Flight(output, handle, start, usage)
        for item in output.scheduled:
            item.request.num_computed_tokens += item.num_query_tokens
            flight.query_tokens[item.request.request_id] = item.num_query_tokens
        for request in samplers:
            flight.placeholders[request.request_id] = request.num_tokens
            request.token_ids.append(PLACEHOLDER_TOKEN)
        self.num_steps += 1
        return flight

    def _collect(self, flight: _Flight) -> list[RequestOutput]:
        sampled, stall_seconds = self.runner.collect(flight.handle) if self.async_scheduling else flight.handle
        now = self.clock()
        self.waste.add(flight.usage, now - max(flight.launched_at, self._last_collect), stall_seconds)
        self._last_collect = now
        results = []
        for request, token in sampled:
            rid = request.request_id
            if rid in flight.stale:
                continue
            # The step launched after this one may already have given the request its next token:
            # take that back while this token is checked, and give it again if the request goes on.
            ahead = self._take_back(request)
            request.token_ids[flight.placeholders[rid]] = token
            request.num_generated_tokens += 1
            request.tokens_since_resume += 1
            if request.first_token_time is None:
                request.first_token_time = now
            text_before = len(request.output_text)
            if not self._check_stop(request, token, text_before):
                self._check_interception(request, token, now, text_before)
            results.append(self._output(request, [token]))
            if ahead is not None and request.status is RequestStatus.RUNNING:
                self._give_back(request, ahead)
        return results

    def _take_back(self, request: Request) -> tuple[int, bool] | None:
        """Undo what the step in flight did to `request` (its query tokens counted as computed, its
        placeholder) and mark its sample void; returns (query tokens, placeholder) to redo, or None."""
        flight = self._in_flight
        if flight is None or request.request_id in flight.stale:
            return None
        n = flight.query_tokens.get(request.request_id)
        if n is None:
            return None
        request.num_computed_tokens -= n
        placeholder = request.request_id in flight.placeholders
        if placeholder:
            request.token_ids.pop()
        flight.stale.add(request.request_id)
        return n, placeholder

    def _give_back(self, request: Request, ahead: tuple[int, bool]) -> None:
        flight = self._in_flight
        n, placeholder = ahead
        request.num_computed_tokens += n
        if placeholder:
            request.token_ids.append(PLACEHOLDER_TOKEN)
        flight.stale.discard(request.request_id)

    def _check_stop(self, request: Request, token: int, text_before: int) -> bool:
        """Finish the request if it should stop (its last token's text starts at `text_before`);
        True if it did."""
        params: SamplingParams = request.sampling
        status = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif request.num_generated_tokens >= params.max_tokens or request.num_tokens >= self.context_limit:
            status = RequestStatus.FINISHED_LENGTH
        self.detokenizer.update(request, final=status is not None)
        if params.stop and self.tokenizer is not None and truncate_at_stop(request, text_before):
            status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            self._finish(request, status)
        return status is not None

    def _check_interception(self, request: Request, token: int, now: float, text_before: int) -> None:
        """Pause the request if its last token (whose text starts at `text_before`) ended a tool
        call or its N-token segment."""
        params: SamplingParams = request.sampling
        if not self._may_call(request):
            return
        hint = request.hint or SegmentHint()
        if params.intercept_after is not None and request.tokens_since_resume >= params.intercept_after:
            tool, text = hint.tool, None
        elif params.tool_format is not None:
            text = params.tool_format.find_call(request.output_text, request.call_search_from, token, text_before)
            if text is None:
                return
            tool, _ = params.tool_format.split(text)
        else:
            return
        call = Interception((request.request_id, len(request.interceptions)), now, tool=tool, call_text=text,
                            expected_duration=hint.call_duration, segment_tokens=request.tokens_since_resume)
        self.scheduler.pause(request, call, now)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        request.finish_time = self.clock()

    def _output(self, request: Request, new_tokens: list[int]) -> RequestOutput:
        """The request as it stands. A step's output of a request still running holds back an end of
        its text that may begin a stop string (`partial_marker_length`), as vLLM does: a stream has sent
        nothing that the stop will cut. The outputs of add, resume and abort show all of the text, so
        a resumed turn goes on from the text its pause showed."""
        text = request.output_text
        if new_tokens and request.sampling.stop and request.status is RequestStatus.RUNNING:
            text = text[:len(text) - partial_marker_length(text, request.sampling.stop)]
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, _tokens=request.token_ids,
            _span=(request.num_prompt_tokens, request.num_tokens), text=text,
            finished=request.status.finished, finish_reason=request.finish_reason, new_token_ids=new_tokens,
            arrival_time=request.arrival_time, first_token_time=request.first_token_time,
            finish_time=request.finish_time, paused=request.status is RequestStatus.PAUSED,
            interception=request.interception, num_generated_tokens=request.num_generated_tokens,
            num_interceptions=len(request.interceptions))


def _check_hint(hint: SegmentHint | None) -> None:
    if hint is not None and not isinstance(hint, SegmentHint):
        raise ValueError(f"hint must be a SegmentHint, got {type(hint).__name__}")

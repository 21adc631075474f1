"""The OpenAI-compatible HTTP server over `AsyncLLM`, with transparent resume.

A chat turn that ends in a tool call answers `finish_reason: "tool_calls"` as any OpenAI server
does, but its request is paused, not finished: the interception policy decides whether its KV
stays on the device, moves to host memory or is freed. When the agent sends its next turn (the
same conversation plus the call and its results), the prompt's tokens begin with the paused
request's, and the request resumes with the rest as its tool result. `resume=False` behaves like
other servers: every turn is a new request.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from infercept_jax.async_llm import AsyncLLM, EngineDead, QueueFull
from infercept_jax.config import SamplingParams
from infercept_jax.detokenizer import partial_marker_length
from infercept_jax.outputs import RequestOutput
from infercept_jax.serving.chat import BadRequest, ChatFormat, ToolCall
from infercept_jax.serving.metrics import prometheus_text
from infercept_jax.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body
from infercept_jax.serving.sessions import PausedTurn, PausedTurns


class NotFound(LookupError):
    """An unknown model (HTTP 404)."""


@dataclass(slots=True)
class TurnEnd:
    """How a turn ended, once its last token is in."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text_tail: str = ""                       # text held back while a call could be starting
    tool_calls: list[ToolCall] = field(default_factory=list)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class OpenAIServer:
    """Routes, the paused turns and the counters of one server; `self.app` is the ASGI app."""

    def __init__(self, llm: AsyncLLM, model_name: str, *, resume: bool = True, pause_timeout: float = 60.0,
                 call_start: str | None = None, call_end: str | None = None):
        if not pause_timeout > 0:
            raise ValueError(f"pause_timeout must be > 0 seconds, got {pause_timeout!r}")
        self.llm = llm
        self.model_name = model_name
        self.max_model_len = llm.engine.max_model_len
        self.resume = resume
        self.pause_timeout = pause_timeout
        markers = {k: v for k, v in (("call_start", call_start), ("call_end", call_end)) if v is not None}
        has_template = llm.tokenizer is not None and llm.tokenizer.chat_template is not None
        self.chat = ChatFormat(llm.tokenizer, **markers) if has_template else None
        self.paused = PausedTurns()
        self.counters: Counter[str] = Counter()
        self.created = int(time.time())
        self.app = self._routes()

    # ----------------------------------------------------------------- the turn
    async def _start(self, prompt_ids: list[int], params: SamplingParams) -> tuple[AsyncIterator[RequestOutput],
                                                                                  RequestOutput, PausedTurn | None]:
        """Resume the paused request this prompt continues, or queue a new one; returns the stream
        and its first output (so that errors come before any response is sent)."""
        if len(prompt_ids) >= self.max_model_len:
            raise BadRequest(f"the prompt has {len(prompt_ids)} tokens; the model's context (max_model_len) is "
                             f"{self.max_model_len}, which leaves no room to generate")
        turn = self.paused.take(prompt_ids) if self.resume else None
        if turn is not None:
            resumed = replace(params, max_tokens=params.max_tokens + turn.num_generated_tokens)   # counted over all turns
            stream = self.llm.resume(turn.request_id, prompt_ids[len(turn.token_ids):], resumed)
            try:
                first = await anext(stream)
            except (QueueFull, ValueError):      # the engine left it paused: a retry resumes it, else it expires
                self.paused.add(turn)
                raise
            except BaseException:                # the client left or the engine failed: nobody resumes it
                self.llm.cancel(turn.request_id)
                raise
            self.counters["turns_resumed"] += 1
            return stream, first, turn
        stream = self.llm.generate(prompt_ids, params)
        first = await anext(stream)
        self.counters["turns_new"] += 1
        return stream, first, None

    async def _turn(self, stream: AsyncIterator[RequestOutput], first: RequestOutput, turn: PausedTurn | None,
                    prompt_tokens: int, calls_allowed: bool, one_call: bool = False) -> AsyncIterator[str | TurnEnd]:
        """The text deltas of a turn, then its TurnEnd. Text that may begin a tool call is held back
        until it is clear whether it does. With `one_call` (`parallel_tool_calls: false`) a turn
        answers only the first of the calls the model wrote, as vLLM does."""
        base_text = first.text if turn is not None else ""
        base_generated = turn.num_generated_tokens if turn is not None else 0
        cached = first.num_cached_tokens if turn is not None else 0
        self.counters["cached_prompt_tokens"] += cached
        out, sent, ended = first, 0, False
        start = self.chat.tool_format.call_start if self.chat is not None and calls_allowed else None
        try:
            async for out in _chain(first if turn is None else None, stream):
                text = out.text[len(base_text):]
                safe = _safe_length(text, start) if start is not None and not out.finished else len(text)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            end = TurnEnd(out.finish_reason or "stop", prompt_tokens, out.num_generated_tokens - base_generated, cached)
            text = out.text[len(base_text):]
            calls = self.chat.parse_calls(out.interception.call_text) if out.paused and start is not None else None
            if calls:
                calls = calls[:1] if one_call else calls
                self.chat.remember(calls, text)
                end.finish_reason, end.tool_calls = "tool_calls", calls
                self._hold(out)
            else:
                if out.paused:                   # not a call we can answer: the turn ends here
                    self.llm.cancel(out.request_id)
                    end.finish_reason = "stop"
                end.text_tail = text[sent:]
            ended = True
            yield end
        finally:
            if not ended:                        # the client went away: free the request's blocks
                self.llm.cancel(out.request_id)

    def _hold(self, out: RequestOutput) -> None:
        """Keep a request paused at a tool call for its next turn (or end it, without resume)."""
        if not self.resume:
            self.llm.cancel(out.request_id)
            return
        context = tuple(out.prompt_token_ids) + tuple(out.token_ids)
        self.paused.add(PausedTurn(out.request_id, context, out.num_generated_tokens,
                                   time.monotonic() + self.pause_timeout))

    async def _expire_paused(self) -> None:
        """Abort paused requests that no turn resumed within `pause_timeout`."""
        while True:
            await asyncio.sleep(min(1.0, self.pause_timeout / 4))
            for turn in self.paused.expired(time.monotonic()):
                self.counters["pause_timeouts"] += 1
                self.llm.cancel(turn.request_id)     # not awaited: a dead engine has nothing to abort

    # ----------------------------------------------------------------- the endpoints
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise NotFound(f"the model {model!r} does not exist; this server serves {self.model_name!r}")

    def _tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.llm.tokenizer is None:
                raise BadRequest("this model has no tokenizer: send the prompt as token ids")
            ids = self.llm.tokenizer.encode_prompt(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise BadRequest("the prompt is empty")
        return ids

    def _room(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        return max_tokens if max_tokens is not None else max(1, self.max_model_len - len(prompt_ids))

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        body.check_supported()
        prompt_ids = self._tokens(body.prompt)
        params = body.sampling(self._room(prompt_ids, body.max_tokens))
        stream, first, turn = await self._start(prompt_ids, params)
        turn_events = self._turn(stream, first, turn, len(prompt_ids), calls_allowed=False)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish_reason: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        def render(event: str | TurnEnd) -> list[dict]:
            if isinstance(event, TurnEnd):
                return [chunk(event.text_tail, event.finish_reason)]
            return [chunk(event, None)]

        if body.stream:
            return _streaming(turn_events, render, body.stream_options, chunk("", None))
        collected = await _collect(turn_events, request)
        if collected is None:
            return Response(status_code=499)     # the client left (nginx's code): nobody reads this
        text, end = collected
        return {**chunk(text, end.finish_reason), "usage": end.usage()}

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        body.check_supported()
        if self.chat is None:
            raise BadRequest("this model has no chat template; use /v1/completions")
        tools = body.tools or None
        prompt_ids = self._tokens(self.chat.render(body.messages, tools))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling(self._room(prompt_ids, max_tokens))
        calls_allowed = bool(tools) and body.tool_choice != "none"
        if calls_allowed:
            params.tool_format = self.chat.tool_format
        stream, first, turn = await self._start(prompt_ids, params)
        turn_events = self._turn(stream, first, turn, len(prompt_ids), calls_allowed,
                                 one_call=body.parallel_tool_calls is False)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish_reason: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        def render(event: str | TurnEnd) -> list[dict]:
            if not isinstance(event, TurnEnd):
                return [chunk({"content": event}, None)]
            chunks = [chunk({"content": event.text_tail}, None)] if event.text_tail else []
            if event.tool_calls:
                chunks.append(chunk({"tool_calls": [c.to_openai(i) for i, c in enumerate(event.tool_calls)]}, None))
            return chunks + [chunk({}, event.finish_reason)]

        if body.stream:
            first_chunk = chunk({"role": "assistant", "content": ""}, None)
            return _streaming(turn_events, render, body.stream_options, chunk({}, None), first_chunk)
        collected = await _collect(turn_events, request)
        if collected is None:
            return Response(status_code=499)
        text, end = collected
        message = {"role": "assistant", "content": text}
        if end.tool_calls:
            message = {"role": "assistant", "content": self.chat.content_before_call(text),
                       "tool_calls": [c.to_openai() for c in end.tool_calls]}
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": end.finish_reason}],
                "usage": end.usage()}

    async def metrics(self) -> PlainTextResponse:
        stats = await self.llm.stats()
        return PlainTextResponse(prometheus_text(stats, self.counters, paused_turns=len(self.paused)),
                                 media_type="text/plain; version=0.0.4")

    # ----------------------------------------------------------------- the app
    def _routes(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            expiry = asyncio.create_task(self._expire_paused())
            yield
            expiry.cancel()
            for turn in self.paused.remove_all():
                self.llm.cancel(turn.request_id)

        app = FastAPI(title="infercept-jax", lifespan=lifespan)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
            return JSONResponse(error_body(message, param=where or None), status_code=400)

        for kind, status, name in ((ValueError, 400, "invalid_request_error"), (NotFound, 404, "invalid_request_error"),
                                   (QueueFull, 429, "rate_limit_error"), (EngineDead, 503, "server_error")):
            app.add_exception_handler(kind, _handler(status, name))

        @app.get("/health")
        async def health():
            if not self.llm.alive:
                return JSONResponse(error_body("the engine is not running", "server_error"), status_code=503)
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "infercept-jax", "max_model_len": self.max_model_len}]}

        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.get("/metrics")(self.metrics)
        return app


def _handler(status: int, kind: str):
    async def handle(request: Request, exc: Exception):
        code = "model_not_found" if status == 404 else None
        return JSONResponse(error_body(str(exc), kind, code), status_code=status)
    return handle


async def _chain(first: RequestOutput | None, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    if first is not None:
        yield first
        if first.finished or first.paused:
            return
    async for out in stream:
        yield out


def _streaming(events: AsyncIterator[str | TurnEnd], render, options, usage_chunk: dict,
               first_chunk: dict | None = None) -> StreamingResponse:
    """Server-sent events of a turn: its chunks, the usage chunk if asked for, then [DONE]. The
    turn is closed however the stream ends (a client that leaves aborts its request). If the
    engine fails meanwhile, an error event says so before the [DONE], as vLLM's server does: the
    response has begun, so its status can no longer say it."""
    async def sse() -> AsyncIterator[str]:
        try:
            async with aclosing(events):
                if first_chunk is not None:
                    yield _sse(first_chunk)
                async for event in events:
                    for payload in render(event):
                        yield _sse(payload)
                    if isinstance(event, TurnEnd) and options is not None and options.include_usage:
                        yield _sse({**usage_chunk, "choices": [], "usage": event.usage()})
        except EngineDead as error:
            yield _sse(error_body(str(error), "server_error"))
        yield "data: [DONE]\n\n"
    return StreamingResponse(sse(), media_type="text/event-stream")


async def _collect(events: AsyncIterator[str | TurnEnd], request: Request) -> tuple[str, TurnEnd] | None:
    """A whole turn's text and its end, or None if the client disconnects first. Starlette does not
    cancel a handler whose client left, so this watches for the disconnect itself and then closes
    the turn, which aborts its request."""
    async def join() -> tuple[str, TurnEnd]:
        parts = []
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TurnEnd):
                    parts.append(event.text_tail)
                    return "".join(parts), event
                parts.append(event)
        raise RuntimeError("a turn ended without its TurnEnd")

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    turn, gone = asyncio.ensure_future(join()), asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait((turn, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not turn.done():
            turn.cancel()
            await asyncio.gather(turn, return_exceptions=True)
    return None if turn.cancelled() else turn.result()


def _safe_length(text: str, marker: str) -> int:
    """How much of `text` can be sent: all of it, minus a call's start and what follows it, or
    minus an end that could be the first characters of one."""
    found = text.find(marker)
    return found if found >= 0 else len(text) - partial_marker_length(text, [marker])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"

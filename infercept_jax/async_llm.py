"""AsyncLLM: one engine, stepped by a thread of its own, for asyncio callers (the server).

The engine is not thread-safe, so one thread owns it. Callers reach it through a thread-safe
queue of commands (add, resume, abort, a metrics snapshot) that the thread runs between steps,
and each request's outputs come back on an asyncio queue of the caller's event loop:

    llm = AsyncLLM("smollm2-135m")
    async for out in llm.generate("The capital of France is", SamplingParams(max_tokens=16)):
        print(out.text)

A stream ends when its request finishes or pauses at a tool call; `resume` streams the rest.
A caller that stops reading a stream early (a client that went away) aborts its request, which
frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from infercept_jax.config import SamplingParams
from infercept_jax.outputs import RequestOutput
from scheduling.request import SegmentHint

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests in flight than the engine runs at once plus `max_queue`."""


class EngineDead(RuntimeError):
    """The engine thread stopped: after `shutdown`, or after a step raised."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue



class AsyncLLM:
    """An engine behind a command queue. `generate`/`resume` stream `RequestOutput`s."""

    def __init__(self, model: str = "smollm2-135m", *, max_queue: int = 256, **engine_options):
        from infercept_jax.llm import LLM

        self._start(LLM(model, **engine_options), max_queue)

    @classmethod
    def from_llm(cls, llm, max_queue: int = 256) -> "AsyncLLM":
        """Serve an `LLM` that is already built (its engine must not be used elsewhere after this)."""
        async_llm = cls.__new__(cls)
        async_llm._start(llm, max_queue)
        return async_llm

    def _start(self, llm, max_queue: int) -> None:
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()   # (fn, future); fn None stops the thread
        self._lock = threading.Lock()
        self._dead: EngineDead | None = None       # set once the thread stops
        self._streams: dict[str, _Stream] = {}     # requests generating now; engine thread only
        self._thread = threading.Thread(target=self._loop, name="infercept-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- the public API
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, hint: SegmentHint | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Queue a request and stream its outputs until it finishes or pauses. Raises ValueError
        on bad input and QueueFull when the queue is full, before anything is queued."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def add() -> str:
            self._check_room()
            rid = self.engine.add_request(prompt, params, request_id, hint)
            self._streams[rid] = stream
            return rid

        rid = await self._call(add, undo=self._abort)
        async for out in self._drain(rid, stream):
            yield out

    async def resume(self, request_id: str, result: str | list[int], params: SamplingParams | None = None,
                     hint: SegmentHint | None = None) -> AsyncIterator[RequestOutput]:
        """Append a paused request's tool result and stream what follows. The first output is
        the resume's own (no new tokens); its `num_cached_tokens` says how much context kept its KV."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def resume() -> RequestOutput:
            self._check_room()
            out = self.engine.resume(request_id, result, params, hint)
            if out.finished:             # the result filled the context
                self.engine.pop_finished(request_id)
            else:
                self._streams[request_id] = stream
            return out

        first = await self._call(resume, undo=lambda _: self._abort(request_id))
        ended = first.finished
        try:
            yield first
            if not first.finished:
                async for out in self._drain(request_id, stream):
                    yield out
            ended = True
        finally:
            if not ended:                # the reader left at the first output: free the request's blocks
                self.cancel(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request (running, queued or paused) and free its blocks; unknown ids are ignored."""
        await self._call(lambda: self._abort(request_id))

    def cancel(self, request_id: str) -> None:
        """Abort a request without waiting (from a `finally`, or from another thread)."""
        self._put(lambda: self._abort(request_id), None)

    @property
    def alive(self) -> bool:
        """False from the moment the engine failed or was shut down (its thread may take a moment
        more to exit)."""
        with self._lock:
            return self._dead is None and self._thread.is_alive()

    async def stats(self) -> dict:
        """A snapshot of the engine's state and counters (for /metrics)."""
        return await self._call(self._stats)

    def shutdown(self) -> None:
        """Stop the engine thread; requests in flight get EngineDead."""
        self._put(None, None)
        self._thread.join()

    # ----------------------------------------------------------------- the caller's side
    async def _call(self, fn: Callable, undo: Callable | None = None):
        """Run `fn` on the engine thread and return its result (or raise its exception).

        A caller cancelled while `fn` waits skips it; one cancelled after `fn` started (it may be
        running now) has `undo(result)` run on the engine thread once `fn` has succeeded, so a
        request that was added or resumed for a caller who is gone does not run unread."""
        results = []

        def run():
            results.append(fn())
            return results[-1]

        future: Future = Future()
        self._put(run, future)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if undo is not None:         # runs after `run`, which the queue holds ahead of it
                self._put(lambda: results and undo(results[0]), None)
            raise

    def _put(self, fn: Callable, future: Future | None) -> None:
        with self._lock:
            if self._dead is not None:
                if future is not None:
                    future.set_exception(self._dead)
                return
            self._commands.put((fn, future))

    async def _drain(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        ended = False
        try:
            while True:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    ended = True
                    raise out
                ended = out.finished or out.paused
                yield out
                if ended:
                    return
        finally:
            if not ended:                # the reader left early: free the request's blocks
                self.cancel(request_id)

    # ----------------------------------------------------------------- the engine thread
    def _check_room(self) -> None:
        limit = self.engine.config.max_num_seqs + self.max_queue
        if len(self._streams) >= limit:
            raise QueueFull(f"{len(self._streams)} requests are in flight, the most this server takes "
                            f"(max_num_seqs {self.engine.config.max_num_seqs} + max_queue {self.max_queue})")

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if request_id in self.engine.requests:
            self.engine.abort(request_id)
            self.engine.pop_finished(request_id)

    def _stats(self) -> dict:
        engine, scheduler = self.engine, self.engine.scheduler
        blocks = engine.blocks
        return {
            "waiting": len(scheduler.waiting), "running": len(scheduler.running),
            "swapped": len(scheduler.swapped), "paused": len(scheduler.paused),
            "paused_on_host": sum(1 for r in scheduler.paused.values() if blocks.num_host_blocks_of(r.request_id)),
            "device_blocks": blocks.device.capacity, "device_blocks_used": blocks.device.capacity - blocks.device.num_free,
            "host_blocks": blocks.host.capacity, "host_blocks_used": blocks.host.capacity - blocks.host.num_free,
            "steps": engine.num_steps, **engine.waste.summary(),
        }

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if out.finished:
            self.engine.pop_finished(out.request_id)
        if stream is None:
            return
        if out.finished or out.paused:
            del self._streams[out.request_id]
        if not _send(stream, out):       # its event loop is gone: nobody reads it any more
            self._abort(out.request_id)

    def _loop(self) -> None:
        while True:
            try:
                fn, future = self._commands.get(block=not self.engine.has_work())
            except queue.Empty:
                fn, future = self._step, None
            if fn is None:
                return self._stop(EngineDead("the engine was shut down"))
            if future is not None and not future.set_running_or_notify_cancel():
                continue                 # its caller was cancelled while it waited: nobody wants it done
            try:
                result = fn()
            except Exception as exc:
                if future is None:       # a step (or an abort) failed: a bug, not a user error
                    log.exception("the engine failed; its thread stops")
                    return self._stop(EngineDead(f"the engine failed: {exc!r}"))
                future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(result)

    def _step(self) -> None:
        for out in self.engine.step():
            self._deliver(out)

    def _stop(self, error: EngineDead) -> None:
        """Fail every request in flight and every command still queued."""
        with self._lock:
            self._dead = error
        for stream in self._streams.values():
            _send(stream, error)
        self._streams.clear()
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(error)


def _send(stream: _Stream, item: RequestOutput | BaseException) -> bool:
    """Hand an item to a stream's event loop; False if that loop is closed."""
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:
        return False
    return True

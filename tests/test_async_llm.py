"""AsyncLLM: the engine thread, the command queue and the per-request streams, on a stand-in runner."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from helpers import FakeRunner, engine_with
from infercept_jax import SamplingParams
from infercept_jax.async_llm import AsyncLLM, EngineDead, QueueFull


class SlowRunner(FakeRunner):
    """FakeRunner's tokens, `delay` seconds a step (so that a test can act while requests run)."""

    def __init__(self, delay: float):
        self.delay = delay

    def execute(self, output):
        time.sleep(self.delay)
        return super().execute(output)


class FailingRunner(FakeRunner):
    def execute(self, output):
        raise RuntimeError("device lost")


def async_llm(runner=None, max_queue: int = 8, **options) -> AsyncLLM:
    engine = engine_with(runner or FakeRunner(), num_kv_blocks=64, max_model_len=64, clock=time.monotonic, **options)
    return AsyncLLM.from_llm(SimpleNamespace(engine=engine, tokenizer=None), max_queue=max_queue)


def run(coro):
    return asyncio.run(coro)


async def collect(stream):
    return [out async for out in stream]


GREEDY = SamplingParams(max_tokens=5, temperature=0.0)


def test_generate_streams_every_token_and_matches_the_engine_alone():
    llm = async_llm()
    try:
        outs = run(collect(llm.generate([5, 6, 7], GREEDY)))
    finally:
        llm.shutdown()
    alone = engine_with(FakeRunner(), num_kv_blocks=64, max_model_len=64)
    rid = alone.add_request([5, 6, 7], GREEDY)
    while alone.has_work():
        alone.step()
    assert [len(o.new_token_ids) for o in outs] == [1] * 5
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert outs[-1].token_ids == alone.requests[rid].token_ids[3:]   # after the 3 prompt tokens
    assert not any(o.finished for o in outs[:-1])


def test_a_paused_request_ends_its_stream_and_resume_streams_the_rest():
    llm = async_llm()
    params = SamplingParams(max_tokens=6, temperature=0.0, intercept_after=2, max_interceptions=1)

    async def main():
        first = await collect(llm.generate([5, 6, 7], params))
        rest = await collect(llm.resume(first[-1].request_id, [9, 9]))
        return first, rest

    try:
        first, rest = run(main())
        stats = run(llm.stats())
    finally:
        llm.shutdown()
    assert first[-1].paused and not first[-1].finished and len(first) == 2
    assert rest[0].new_token_ids == [] and rest[0].num_cached_tokens == 4   # prompt + 1 token: the last is not in KV yet
    assert rest[-1].finished and rest[-1].num_generated_tokens == 6
    assert rest[-1].token_ids[2:4] == [9, 9]
    assert stats["device_blocks_used"] == 0 and stats["paused"] == 0


def test_a_reader_that_leaves_early_aborts_its_request_and_frees_its_blocks():
    llm = async_llm(SlowRunner(0.01))

    async def main():
        stream = llm.generate([5, 6, 7], SamplingParams(max_tokens=50, temperature=0.0))
        async for out in stream:
            break
        await stream.aclose()
        for _ in range(200):
            stats = await llm.stats()
            if stats["running"] == 0:
                return stats, out
            await asyncio.sleep(0.01)
        return stats, out

    try:
        stats, out = run(main())
        assert out.request_id not in llm.engine.requests
    finally:
        llm.shutdown()
    assert stats["running"] == 0 and stats["device_blocks_used"] == 0


def test_a_resume_reader_that_leaves_at_the_first_output_aborts_its_request():
    """Left alone, the request would run 50 more steps of 50 ms; it is gone within a second."""
    llm = async_llm(SlowRunner(0.05))
    params = SamplingParams(max_tokens=55, temperature=0.0, intercept_after=2, max_interceptions=1)

    async def main():
        paused = (await collect(llm.generate([5, 6, 7], params)))[-1]
        stream = llm.resume(paused.request_id, [9, 9])
        async for _ in stream:          # the resume's own output, then leave
            break
        await stream.aclose()
        for _ in range(40):
            stats = await llm.stats()
            if stats["running"] == 0:
                break
            await asyncio.sleep(0.025)
        return paused.request_id, stats

    try:
        rid, stats = run(main())
        assert rid not in llm.engine.requests
    finally:
        llm.shutdown()
    assert stats["running"] == 0 and stats["device_blocks_used"] == 0


def test_a_caller_cancelled_while_its_command_waits_does_not_stop_the_engine():
    """The command is skipped (its request never queued); running it and setting the result of a
    cancelled future raised on the engine thread, which died, and every stream hung."""
    llm = async_llm(SlowRunner(0.2))
    params = SamplingParams(max_tokens=6, temperature=0.0)

    async def first_output(prompt):
        async for out in llm.generate(prompt, params):
            return out

    async def main():
        busy = asyncio.create_task(collect(llm.generate([5, 6, 7], params)))
        await asyncio.sleep(0.05)          # a step runs: the next command waits behind it
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first_output([8, 9]), timeout=0.02)
        outs = await asyncio.wait_for(busy, timeout=10)
        return outs, await llm.stats()

    try:
        outs, stats = run(main())
        assert outs[-1].finished and llm.alive
        assert stats["waiting"] == stats["running"] == 0       # the cancelled add never ran
    finally:
        llm.shutdown()


async def cancel_after_the_command_ran(llm: AsyncLLM, start_call) -> None:
    """Start a call (`start_call()` returns its first output's coroutine) and cancel its caller after
    the engine thread ran the call's command but before the caller saw its result."""
    hold, ran, release = threading.Event(), threading.Event(), threading.Event()
    llm._put(hold.wait, None)                      # the engine thread waits here ...
    task = asyncio.create_task(start_call())
    await asyncio.sleep(0.05)                      # ... while the call queues its command
    llm._put(lambda: (ran.set(), release.wait()), None)
    hold.set()
    assert ran.wait(5)                             # the command ran; the caller has not woken yet
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def idle_stats(llm: AsyncLLM) -> dict:
    for _ in range(200):
        stats = await llm.stats()
        if stats["running"] == stats["waiting"] == 0:
            break
        await asyncio.sleep(0.01)
    return stats


def stats_after_a_caller_cancelled_late(llm: AsyncLLM, prepare) -> dict:
    """`await prepare()` gives a call's start (as `cancel_after_the_command_ran` takes it); its
    caller is cancelled after its command ran. The engine's stats once idle; it must hold no
    request and still run. Shuts the engine down."""
    async def main():
        await cancel_after_the_command_ran(llm, await prepare())
        return await idle_stats(llm)

    try:
        stats = run(main())
        assert not llm.engine.requests and llm.alive
    finally:
        llm.shutdown()
    return stats


def test_a_caller_cancelled_after_its_add_ran_aborts_the_request():
    """Before, the request ran all its 40 steps of 20 ms unread."""
    llm = async_llm(SlowRunner(0.02))

    async def prepare():
        return lambda: anext(llm.generate([5, 6, 7], SamplingParams(max_tokens=40, temperature=0.0)))

    stats = stats_after_a_caller_cancelled_late(llm, prepare)
    assert stats["steps"] < 10 and stats["device_blocks_used"] == 0


def test_a_caller_cancelled_after_its_resume_ran_aborts_the_request():
    llm = async_llm(SlowRunner(0.02))
    params = SamplingParams(max_tokens=42, temperature=0.0, intercept_after=2, max_interceptions=1)

    async def prepare():
        paused = (await collect(llm.generate([5, 6, 7], params)))[-1]
        return lambda: anext(llm.resume(paused.request_id, [9, 9]))

    stats = stats_after_a_caller_cancelled_late(llm, prepare)
    assert stats["steps"] < 12 and stats["paused"] == 0 and stats["device_blocks_used"] == 0


def test_a_caller_cancelled_before_its_resume_ran_keeps_the_request_paused():
    """The resume never ran, so the undo leaves the paused request for the next resume."""
    llm = async_llm()
    params = SamplingParams(max_tokens=6, temperature=0.0, intercept_after=2, max_interceptions=1)

    async def main():
        paused = (await collect(llm.generate([5, 6, 7], params)))[-1]
        hold = threading.Event()
        llm._put(hold.wait, None)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(llm.resume(paused.request_id, [9, 9])), timeout=0.05)
        hold.set()
        stats = await idle_stats(llm)
        rest = await collect(llm.resume(paused.request_id, [9, 9]))
        return stats, rest

    try:
        stats, rest = run(main())
    finally:
        llm.shutdown()
    assert stats["paused"] == 1 and rest[-1].finished and rest[-1].num_generated_tokens == 6


def test_bad_input_raises_and_the_engine_keeps_serving():
    llm = async_llm()

    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await collect(llm.generate([5, 999], GREEDY))
        with pytest.raises(KeyError, match="unknown request id"):
            await collect(llm.resume("nope", [1]))
        return await collect(llm.generate([5, 6], GREEDY))

    try:
        outs = run(main())
    finally:
        llm.shutdown()
    assert outs[-1].finished and len(llm.engine.requests) == 0


def test_more_requests_than_seqs_plus_queue_are_refused():
    llm = async_llm(SlowRunner(0.01), max_queue=1, max_num_seqs=2)
    long = SamplingParams(max_tokens=30, temperature=0.0)

    async def main():
        streams = [llm.generate([5, i + 6], long) for i in range(3)]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        while (await llm.stats())["waiting"] + (await llm.stats())["running"] < 3:   # 2 running + 1 queued
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFull, match="max_num_seqs 2 \\+ max_queue 1"):
            await anext(llm.generate([5, 9], long))
        rest = [[await first] + await collect(s) for first, s in zip(firsts, streams)]
        return rest, await collect(llm.generate([5, 9], GREEDY))   # room again once they finished

    try:
        rest, after = run(main())
    finally:
        llm.shutdown()
    assert [len(r) for r in rest] == [30, 30, 30] and all(r[-1].finished for r in rest) and after[-1].finished


def test_a_failed_step_fails_the_streams_and_later_calls():
    llm = async_llm(FailingRunner())

    async def main():
        with pytest.raises(EngineDead, match="device lost"):
            await collect(llm.generate([5, 6], GREEDY))
        with pytest.raises(EngineDead):
            await collect(llm.generate([5, 6], GREEDY))

    run(main())
    assert not llm.alive


def test_shutdown_fails_requests_in_flight():
    llm = async_llm(SlowRunner(0.01))

    async def main():
        stream = llm.generate([5, 6], SamplingParams(max_tokens=60, temperature=0.0))
        await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
        with pytest.raises(EngineDead, match="shut down"):
            await collect(stream)

    run(main())
    assert not llm.alive


def test_max_queue_must_be_a_count():
    with pytest.raises(ValueError, match="max_queue"):
        async_llm(max_queue=-1)

"""The OpenAI server: real uvicorn on 127.0.0.1 and the real `openai` client, over an engine whose
runner writes scripted text in no time (SmolLM2's tokenizer, no model). The model itself is in
test_serving_model.py."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from helpers import SMOLLM2_MISSING, FakeRunner, engine_with, write_bos_tokenizer
from infercept_jax.async_llm import AsyncLLM
from infercept_jax.serving.app import OpenAIServer, _safe_length
from infercept_jax.serving.chat import BadRequest, ChatFormat
from infercept_jax.serving.sessions import PausedTurn, PausedTurns
from models.registry import load_tokenizer
from models.tokenizer import Tokenizer

MODEL = "test-model"
CALL = '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>'
ANSWER = "It is sunny in Paris."
PLAIN = "Hello there, friend."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class ScriptedRunner:
    """Writes `CALL` then `ANSWER` for a request that may call tools, `PLAIN` for one that may not,
    a token per step, then end-of-sequence; `delay` seconds a step. A prompt that begins with token
    5 gets `PLAIN` over and over, until its max_tokens."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self.eos = tokenizer.eos_token_id
        self.turns = [tokenizer.encode(CALL), tokenizer.encode(ANSWER)]
        self.plain = tokenizer.encode(PLAIN)
        self.delay = delay

    def execute(self, output):
        time.sleep(self.delay)
        sampled = []
        for s in output.scheduled:
            if not s.samples:
                continue
            r = s.request
            calls = r.sampling.tool_format is not None or r.interceptions
            script = (self.turns[len(r.interceptions)] if len(r.interceptions) < 2 else []) if calls else self.plain
            i = r.tokens_since_resume
            if r.prompt_token_ids[0] == 5:
                sampled.append((r, self.plain[i % len(self.plain)]))
            else:
                sampled.append((r, script[i] if i < len(script) else self.eos))
        return sampled, 0.0


@pytest.fixture(scope="module")
def tokenizer():
    if SMOLLM2_MISSING:
        pytest.skip(SMOLLM2_MISSING)
    return load_tokenizer("smollm2-135m")


def scripted_llm(tokenizer, delay=0.0, max_queue=64, **options) -> AsyncLLM:
    options = {"num_kv_blocks": 256, "max_model_len": 512, "max_num_seqs": 8, **options}
    engine = engine_with(ScriptedRunner(tokenizer, delay), vocab_size=tokenizer.vocab_size,
                         eos_token_ids=(tokenizer.eos_token_id,), tokenizer=tokenizer, clock=time.monotonic, **options)
    return AsyncLLM.from_llm(SimpleNamespace(engine=engine, tokenizer=tokenizer), max_queue=max_queue)


@contextlib.contextmanager
def serving(server: OpenAIServer):
    """Run the server's app under uvicorn on a free port of 127.0.0.1; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join()


@pytest.fixture(scope="module")
def llm(tokenizer):
    llm = scripted_llm(tokenizer)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(llm):
    with serving(OpenAIServer(llm, MODEL)) as url:
        yield url


@pytest.fixture
def own_llm(tokenizer):
    """An engine of the test's own, for tests that leave requests paused or check pool counts."""
    llm = scripted_llm(tokenizer)
    yield llm
    llm.shutdown()


@pytest.fixture
def own_url(own_llm):
    with serving(OpenAIServer(own_llm, MODEL)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value}, checking every line is Prometheus text."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE "))
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def wait_for(predicate, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def idle(url: str) -> bool:
    m = metrics(url)
    return m['infercept_kv_blocks_used{pool="device"}'] == 0 and sum(
        m[f'infercept_requests{{state="{s}"}}'] for s in ("waiting", "running", "swapped", "paused")) == 0


# ----------------------------------------------------------------- the OpenAI surface
def test_models_health_and_metrics(url):
    models = client(url).models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].max_model_len == 512
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    m = metrics(url)
    assert m['infercept_kv_blocks{pool="device"}'] == 255     # block 0 is reserved
    for name in ('infercept_requests{state="paused"}', "infercept_paused_requests_on_host",
                 'infercept_memory_waste_percent{cause="total"}', "infercept_recompute_tokens_total",
                 "infercept_step_seconds_count", 'infercept_turns_total{kind="resumed"}'):
        assert name in m


def test_completion_streamed_and_not_give_the_same_text_and_usage(url):
    c = client(url)
    whole = c.completions.create(model=MODEL, prompt="Say hello", max_tokens=50, temperature=0)
    assert whole.choices[0].text == " " + PLAIN or whole.choices[0].text == PLAIN
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model=MODEL, prompt="Say hello", max_tokens=50, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert len([ch for ch in chunks if ch.choices]) > 3                 # token by token
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens == 2 and whole.usage.total_tokens == 2 + whole.usage.completion_tokens
    short = c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_chat_without_tools_streams_plain_text(url):
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == PLAIN
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stop, text", [([", friend"], "Hello there"), (["there, f"], "Hello ")])
def test_a_stop_string_of_several_tokens_is_never_sent_in_part(url, stop, text):
    """The stop's first tokens arrive before its last: a stream must not have sent them (the engine
    holds back an end that may begin a stop), and the whole response is made of the same deltas."""
    c = client(url)
    whole = c.completions.create(model=MODEL, prompt="Say hello", max_tokens=50, stop=stop)
    streamed = c.completions.create(model=MODEL, prompt="Say hello", max_tokens=50, stop=stop, stream=True)
    assert whole.choices[0].text == "".join(ch.choices[0].text for ch in streamed if ch.choices) == text
    chat = c.chat.completions.create(model=MODEL, messages=QUESTION, stop=stop)
    chat_streamed = c.chat.completions.create(model=MODEL, messages=QUESTION, stop=stop, stream=True)
    assert chat.choices[0].message.content == "".join(ch.choices[0].delta.content or "" for ch in chat_streamed) == text


# ----------------------------------------------------------------- tool calls and transparent resume
def test_a_tool_call_pauses_the_request_and_the_next_turn_resumes_it(own_url):
    url = own_url
    c = client(url)
    before = metrics(url)
    first = c.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    held = metrics(url)
    assert held["infercept_paused_turns"] == 1 and held['infercept_requests{state="paused"}'] == 1
    assert held['infercept_kv_blocks_used{pool="device"}'] > 0          # preserved: the policy is preserve

    turn = QUESTION + [choice.message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    second = c.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, temperature=0)
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"
    context = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == context - 1   # all but the last sampled token
    assert second.usage.completion_tokens == len(load_tokenizer("smollm2-135m").encode(ANSWER)) + 1
    after = metrics(url)
    assert after['infercept_turns_total{kind="resumed"}'] == before['infercept_turns_total{kind="resumed"}'] + 1
    assert after["infercept_recompute_tokens_total"] == before["infercept_recompute_tokens_total"]
    assert idle(url)


def test_a_streamed_tool_call_holds_back_its_text_and_ends_with_tool_calls(own_url):
    url = own_url
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert text == "" and len(calls) == 1 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert metrics(url)["infercept_paused_turns"] == 1


@pytest.mark.parametrize("parallel", [None, True, False])
def test_parallel_tool_calls_false_answers_only_the_first_call(tokenizer, parallel):
    llm = scripted_llm(tokenizer)
    two = CALL.replace("\n]", ',\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n]')
    llm.engine.runner.turns[0] = tokenizer.encode(two)
    try:
        with serving(OpenAIServer(llm, MODEL)) as url:
            extra = {} if parallel is None else {"parallel_tool_calls": parallel}
            first = client(url).chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, **extra)
            calls = first.choices[0].message.tool_calls
            assert [json.loads(c.function.arguments)["city"] for c in calls] == (
                ["Paris"] if parallel is False else ["Paris", "Rome"])
            turn = QUESTION + [first.choices[0].message.model_dump(exclude_none=True)] + [
                {"role": "tool", "tool_call_id": c.id, "content": "Sunny"} for c in calls]
            second = client(url).chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, **extra)
            assert second.usage.prompt_tokens_details.cached_tokens > 0     # the paused request resumed
    finally:
        llm.shutdown()


def test_a_turn_that_continues_no_paused_request_is_a_new_one(own_url):
    url = own_url
    c = client(url)
    first = c.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
    message = first.choices[0].message.model_dump(exclude_none=True)
    other = [{"role": "user", "content": "And in Rome?"}, message, {"role": "tool", "content": "Rain"}]
    second = c.chat.completions.create(model=MODEL, messages=other, tools=TOOLS)
    assert second.usage.prompt_tokens_details.cached_tokens == 0


def test_without_resume_every_turn_is_a_new_request(own_llm):
    with serving(OpenAIServer(own_llm, MODEL, resume=False)) as url:
        c = client(url)
        first = c.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
        assert first.choices[0].finish_reason == "tool_calls"
        assert metrics(url)["infercept_paused_turns"] == 0
        wait_for(lambda: idle(url))                     # the request ended at its call
        call = first.choices[0].message
        turn = QUESTION + [call.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "Sunny"}]
        second = c.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS)
        assert second.usage.prompt_tokens_details.cached_tokens == 0
        assert metrics(url)['infercept_turns_total{kind="resumed"}'] == 0


def test_a_paused_request_nobody_resumes_is_aborted_after_the_timeout(own_llm):
    with serving(OpenAIServer(own_llm, MODEL, pause_timeout=0.2)) as url:
        first = client(url).chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
        wait_for(lambda: metrics(url)["infercept_pause_timeouts_total"] == 1)
        wait_for(lambda: idle(url))
        call = first.choices[0].message
        turn = QUESTION + [call.model_dump(exclude_none=True), {"role": "tool", "content": "Sunny"}]
        late = client(url).chat.completions.create(model=MODEL, messages=turn, tools=TOOLS)
        assert late.usage.prompt_tokens_details.cached_tokens == 0


def test_paused_turns_of_a_dead_engine_expire_and_shut_down_quietly(own_llm):
    """Both awaited an abort, which raised EngineDead: the expiry task died and the shutdown failed."""
    server = OpenAIServer(own_llm, MODEL, pause_timeout=0.05)

    async def main():
        async with server.app.router.lifespan_context(server.app):
            server.paused.add(PausedTurn("gone", (1, 2), 1, time.monotonic() + 60))
            own_llm.shutdown()
            for n in (1, 2):          # the task that expires turns is still there for the second
                server.paused.add(PausedTurn(f"expired-{n}", (1, 2 + n), 1, time.monotonic()))
                await asyncio.sleep(0.1)
                assert server.counters["pause_timeouts"] == n
        return len(server.paused)

    assert asyncio.run(main()) == 0


def test_a_resume_the_engine_refuses_keeps_the_request_paused_for_a_retry(own_llm):
    """A prompt that continues a paused context but whose result has a token outside the
    vocabulary: 400, and the request stays paused (it used to be dropped from the paused turns and
    left in the engine, holding its KV, with no timeout to end it). The retry resumes it."""
    server = OpenAIServer(own_llm, MODEL, pause_timeout=60)
    with serving(server) as url:
        first = client(url).chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
        context = first.usage.prompt_tokens + first.usage.completion_tokens
        (turn,) = server.paused.remove_all()
        server.paused.add(turn)
        refused = httpx.post(url + "/v1/completions",
                             json={"model": MODEL, "prompt": list(turn.token_ids) + [10**6], "max_tokens": 4})
        assert refused.status_code == 400 and "vocabulary" in refused.json()["error"]["message"]
        assert metrics(url)["infercept_paused_turns"] == 1
        retry = client(url).completions.create(model=MODEL, prompt=list(turn.token_ids) + [42], max_tokens=4)
        assert retry.usage.prompt_tokens_details.cached_tokens == context - 1
        assert metrics(url)['infercept_turns_total{kind="resumed"}'] == 1
        wait_for(lambda: idle(url))


# ----------------------------------------------------------------- load, disconnects, errors
def test_32_concurrent_streaming_clients_all_finish_and_no_block_leaks(url):
    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                 stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    assert asyncio.run(main()) == [PLAIN] * 32
    assert idle(url)


@pytest.fixture(scope="module")
def slow_url(tokenizer):
    """A server whose engine takes 20 ms a step and runs 1 request at a time, with no queue."""
    llm = scripted_llm(tokenizer, delay=0.02, max_queue=0, max_num_seqs=1)
    with serving(OpenAIServer(llm, MODEL)) as url:
        yield url
    llm.shutdown()


def test_a_client_that_disconnects_mid_stream_aborts_its_request(slow_url):
    with httpx.stream("POST", slow_url + "/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 400,
                                                                   "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert metrics(slow_url)['infercept_requests{state="running"}'] == 1
    wait_for(lambda: idle(slow_url))


def test_a_client_that_disconnects_before_a_whole_response_aborts_its_request(slow_url):
    """Not streamed: Starlette does not cancel the handler when its client leaves; the server
    watches for the disconnect itself."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_url + "/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 400},
                   timeout=httpx.Timeout(5.0, read=0.5))
    wait_for(lambda: idle(slow_url), seconds=3.0)     # 400 steps of 20 ms would take 8 s


def test_a_full_queue_answers_429_and_the_server_keeps_serving(slow_url):
    c = client(slow_url)
    with httpx.stream("POST", slow_url + "/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 400,
                                                                   "stream": True}) as response:
        lines = response.iter_lines()     # (a dropped iterator would close the stream)
        assert next(lines).startswith("data: ")
        with pytest.raises(openai.RateLimitError, match="max_queue 0"):
            c.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)
    wait_for(lambda: idle(slow_url))
    assert c.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2).choices[0].finish_reason == "length"


LONG = " ".join(["word"] * 600)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "JSON"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": QUESTION, "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "messages": QUESTION, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": QUESTION, "surprise": 1}, 400, "surprise"),
    ({"model": "gpt-4", "messages": QUESTION}, 404, "does not exist"),
    ({"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "max_model_len"),
    ({"model": MODEL, "messages": QUESTION, "n": 2}, 400, "n"),
    ({"model": MODEL, "messages": QUESTION, "logprobs": True}, 400, "logprobs"),
    ({"model": MODEL, "messages": QUESTION, "tools": TOOLS, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": MODEL, "messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text parts"),
    ({"model": MODEL, "messages": []}, 400, "empty"),
])
def test_bad_chat_requests_get_openai_errors_and_the_server_keeps_serving(url, body, status, message):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = httpx.post(url + "/v1/chat/completions", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client(url).chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message.content == PLAIN


@pytest.mark.parametrize("body, message", [
    ({"model": MODEL, "prompt": [5, 10**6]}, "outside the vocabulary"),
    ({"model": MODEL, "prompt": ""}, "empty"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "one prompt"),
    ({"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": [1] * 600}, "max_model_len"),
])
def test_bad_completion_requests_get_400(url, body, message):
    response = httpx.post(url + "/v1/completions", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_a_stream_the_engine_fails_in_ends_with_an_error_event_and_done(tokenizer):
    llm = scripted_llm(tokenizer, delay=0.01)
    step, steps = llm.engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 10:
            raise RuntimeError("a step failed")
        return step()
    llm.engine.step = failing_step
    try:
        with serving(OpenAIServer(llm, MODEL)) as url:
            body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 100, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body) as response:
                lines = [line for line in response.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            error = json.loads(lines[-2].removeprefix("data: "))["error"]
            assert error["type"] == "server_error" and "a step failed" in error["message"]
            assert len(lines) > 3                          # the chunks before the failure were sent
    finally:
        llm.shutdown()


def test_openai_client_errors_are_typed(url):
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client(url).completions.create(model=MODEL, prompt="hi", presence_penalty=1.0)


# ----------------------------------------------------------------- the parts
def test_paused_turns_match_the_longest_context_the_prompt_extends():
    turns = PausedTurns()
    turns.add(PausedTurn("a", (1, 2), 1, deadline=10.0))
    turns.add(PausedTurn("b", (1, 2, 3), 1, deadline=5.0))
    assert turns.take([1, 2]) is None and turns.take([7, 1, 2, 3]) is None   # no result after it; not a prefix
    assert turns.take([1, 2, 4, 5]).request_id == "a"
    assert turns.take([1, 2, 4, 5]) is None                   # taken once
    turns.add(PausedTurn("a", (1, 2), 1, deadline=10.0))
    assert turns.take([1, 2, 3, 9]).request_id == "b"          # the longest
    turns.add(PausedTurn("b", (1, 2, 3), 1, deadline=5.0))
    assert [t.request_id for t in turns.expired(5.0)] == ["b"] and len(turns) == 1
    assert turns.expired(9.99) == []


def test_a_call_marker_that_is_a_special_token_is_refused_at_start(tokenizer):
    """SmolLM2's <jupyter_code> is a special token: decoded text leaves it out, so no call is found."""
    with pytest.raises(ValueError, match="<jupyter_code>"):
        ChatFormat(tokenizer, call_start="<jupyter_code>")
    assert ChatFormat(tokenizer, call_start="<code>").tool_format.call_start == "<code>"


def test_a_completion_prompt_gets_its_tokenizers_bos(tmp_path):
    tokenizer = Tokenizer.from_folder(write_bos_tokenizer(tmp_path / "tok"))
    engine = engine_with(FakeRunner(), vocab_size=4, tokenizer=tokenizer, num_kv_blocks=16)
    llm = AsyncLLM.from_llm(SimpleNamespace(engine=engine, tokenizer=tokenizer))
    try:
        assert OpenAIServer(llm, MODEL)._tokens("hi there") == [0, 2, 3]
    finally:
        llm.shutdown()


def test_tools_are_rendered_into_the_system_prompt_when_the_template_has_none(tokenizer):
    chat = ChatFormat(tokenizer)
    prompt = chat.render([{"role": "system", "content": "Be brief."}] + QUESTION, [t for t in TOOLS])
    assert prompt.count("<|im_start|>system") == 1 and "Be brief.\n\nYou can call these tools:" in prompt
    assert '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "You can call these tools" not in chat.render(QUESTION, None)


def test_an_assistant_call_renders_as_the_model_wrote_it_else_canonically(tokenizer):
    chat = ChatFormat(tokenizer)
    written = 'Let me see. <tool_call>[{"name":"get_weather","arguments":{"city":"Paris"}}]</tool_call>'
    (call,) = chat.parse_calls(written[written.index("[") :written.rindex("]") + 1])
    chat.remember([call], written)
    message = {"role": "assistant", "content": "Let me see. ",
               "tool_calls": [{"id": call.id, "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}}]}
    assert "assistant\n" + written + "<|im_end|>" in chat.render(QUESTION + [message], TOOLS)
    canonical = 'Let me see. <tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>'
    for other_id in ("call_from_elsewhere", [call.id], None):       # a list id was a TypeError, a 500
        message["tool_calls"][0]["id"] = other_id
        assert "assistant\n" + canonical + "<|im_end|>" in chat.render(QUESTION + [message], TOOLS)


@pytest.mark.parametrize("text, calls", [
    ('[{"name": "f", "arguments": {"x": 1}}]', [("f", '{"x": 1}')]),
    ('{"name": "f", "arguments": "{\\"x\\": 1}"}', [("f", '{"x": 1}')]),
    ('[{"name": "f", "parameters": {}}, {"name": "g"}]', [("f", "{}"), ("g", "{}")]),
    ("get_weather(Paris)", None),
    ("[]", None),
    ('[{"arguments": {}}]', None),
    ('[{"name": "f", "arguments": 3}]', None),
])
def test_tool_calls_are_parsed_from_json(tokenizer, text, calls):
    parsed = ChatFormat(tokenizer).parse_calls(text)
    assert (None if parsed is None else [(c.name, c.arguments) for c in parsed]) == calls


def test_bad_tool_call_messages_are_refused(tokenizer):
    chat = ChatFormat(tokenizer)
    with pytest.raises(BadRequest, match="only an assistant"):
        chat.render([{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}], None)
    with pytest.raises(BadRequest, match="not JSON"):
        chat.render([{"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "function": {"name": "f", "arguments": "{oops"}}]}], None)


@pytest.mark.parametrize("text, sendable", [
    ("Hello", 5), ("Hello <tool", 6), ("Hello <tool_call>[", 6), ("Hello <", 6), ("<tool_call", 0), ("", 0),
])
def test_text_that_may_start_a_call_is_held_back(text, sendable):
    assert _safe_length(text, "<tool_call>") == sendable

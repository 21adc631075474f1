"""The server on SmolLM2-135M: a two-turn tool loop through the real `openai` client, whose second
turn resumes the paused request and writes what a cold run of the same conversation writes."""
from __future__ import annotations

import json

import pytest

from helpers import requires_smollm2
from infercept_jax import LLM
from infercept_jax.async_llm import AsyncLLM
from infercept_jax.serving.app import OpenAIServer
from models.registry import load_model
from test_serving import client, idle, metrics, serving

pytestmark = requires_smollm2

MODEL = "smollm2-135m"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def example(city: str, weather: str) -> list[dict]:
    """One finished exchange in the conversation, so that a 135M model follows the call format."""
    call = '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "%s"}}\n]</tool_call>' % city
    return [{"role": "user", "content": f"Tell me the weather in {city}."}, {"role": "assistant", "content": call},
            {"role": "tool", "content": weather}, {"role": "assistant", "content": f"In {city} it is {weather}."}]


CONVERSATION = example("Rome", "Sunny, 24 C") + example("Oslo", "Snow, -3 C") + [
    {"role": "user", "content": "Tell me the weather in Berlin."}]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("policy, recomputes", [("preserve", False), ("discard", True)])
def test_a_resumed_turn_reuses_the_kept_kv_and_writes_what_a_cold_run_writes(smollm2, policy, recomputes):
    llm = AsyncLLM.from_llm(LLM.from_model(*smollm2, policy=policy, num_kv_blocks=128, max_num_seqs=4,
                                           max_num_batched_tokens=64, max_model_len=1024, warmup=False,
                                           strict_compile=False))
    try:
        with serving(OpenAIServer(llm, MODEL)) as url:
            c = client(url)
            ask = dict(model=MODEL, tools=TOOLS, temperature=0, max_tokens=40)
            first = c.chat.completions.create(messages=CONVERSATION, **ask)
            assert first.choices[0].finish_reason == "tool_calls"
            (call,) = first.choices[0].message.tool_calls
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Berlin"}

            turn = CONVERSATION + [first.choices[0].message.model_dump(exclude_none=True),
                                   {"role": "tool", "tool_call_id": call.id, "content": "Rain, 12 C"}]
            before = metrics(url)
            resumed = c.chat.completions.create(messages=turn, **ask)
            recomputed = metrics(url)["infercept_recompute_tokens_total"] - before["infercept_recompute_tokens_total"]
            context = first.usage.prompt_tokens + first.usage.completion_tokens
            kept = resumed.usage.prompt_tokens_details.cached_tokens
            assert (kept, recomputed) == ((0, context - 1) if recomputes else (context - 1, 0))

            cold = c.chat.completions.create(messages=turn, **ask)      # the paused request is gone: a new one
            assert cold.usage.prompt_tokens_details.cached_tokens == 0
            assert cold.usage.prompt_tokens == resumed.usage.prompt_tokens
            assert resumed.choices[0].message.content == cold.choices[0].message.content
            assert resumed.choices[0].finish_reason == cold.choices[0].finish_reason == "stop"
            assert idle(url)
    finally:
        llm.shutdown()

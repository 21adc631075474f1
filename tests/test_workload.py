"""Workload traces: loading both released forms, validation messages, save/load round trips, and
the generator's statistics against the measured table of spec 1.2."""
from __future__ import annotations

import json
import math

import pytest

from infercept_jax.experiments.workload import (KINDS, Segment, TraceRequest, describe, generate_workload, scale_tokens,
                                    load_trace, save_trace)

# Measured in the released trace (spec 1.2): calls per request and mean api_time (s).
SPEC = {"math": (2.79, 8.3e-5), "qa": (3.17, 0.72), "ve": (5.20, 0.086), "chat": (3.46, 28.2),
        "image": (6.92, 19.9), "tts": (6.92, 17.2)}


class WordTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())


def write(tmp_path, data) -> str:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("single_call", [False, True])
@pytest.mark.parametrize("kind", [*KINDS, "mixed"])
def test_save_load_round_trip(tmp_path, kind, single_call):
    trace = generate_workload(kind, 40, seed=3, single_call=single_call)
    path = tmp_path / "trace.json"
    save_trace(trace, path)
    assert load_trace(path) == trace
    saved = json.loads(path.read_text())
    for key, request in trace.items():
        segments = saved[key]
        assert segments[0]["kind"] == request.kind
        for k in range(len(segments) - 1):     # prompt_tokens is the running context
            seg = segments[k]
            assert segments[k + 1]["prompt_tokens"] == \
                seg["prompt_tokens"] + seg["completion_tokens"] + seg.get("api_token_length", 0)


@pytest.mark.parametrize("kind", KINDS)
def test_generated_statistics_match_the_measured_table(kind):
    trace = generate_workload(kind, 2000, seed=1)
    calls, api_time = SPEC[kind]
    stats = describe(trace)[kind]
    assert stats["requests"] == 2000
    assert stats["calls"] == pytest.approx(calls, rel=0.20)
    assert stats["api_time"] == pytest.approx(api_time, rel=0.15)
    assert stats["max_final_context"] <= 2048
    for request in trace.values():
        assert request.kind == kind and request.num_calls >= 1
        assert all(s.has_call for s in request.segments[:-1]) and not request.segments[-1].has_call
        assert request.final_context <= 2048


def test_human_turns_are_capped_and_image_alternates():
    chat = generate_workload("chat", 500, seed=2)
    assert max(s.api_time for r in chat.values() for s in r.segments if s.has_call) <= 60.0
    image = generate_workload("image", 500, seed=2)
    model_calls = [r.segments[i].api_time for r in image.values() for i in range(0, r.num_calls, 2)]
    human_turns = [r.segments[i].api_time for r in image.values() for i in range(1, r.num_calls, 2)]
    assert sum(model_calls) / len(model_calls) == pytest.approx(11.5, rel=0.05)
    assert sum(human_turns) / len(human_turns) == pytest.approx(28.2, rel=0.15)


def test_mixed_draws_every_kind_about_equally():
    stats = describe(generate_workload("mixed", 3000, seed=0))
    assert stats["all"]["requests"] == 3000
    for kind in KINDS:
        assert stats[kind]["requests"] == pytest.approx(500, rel=0.15)


@pytest.mark.parametrize("kind", KINDS)
def test_single_call_and_small_contexts_fit(kind):
    for request in generate_workload(kind, 300, seed=5, single_call=True).values():
        assert request.num_calls == 1 and len(request.segments) == 2
    for request in generate_workload(kind, 300, seed=5, max_context=64).values():
        assert request.num_calls >= 1 and request.final_context <= 64
        assert request.prompt_tokens >= 1 and request.segments[-1].completion_tokens >= 1


def test_seeded_generation_is_deterministic():
    assert generate_workload("mixed", 100, seed=7) == generate_workload("mixed", 100, seed=7)
    assert generate_workload("mixed", 100, seed=7) != generate_workload("mixed", 100, seed=8)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown workload kind 'search'"):
        generate_workload("search", 10)


def test_token_count_form_as_released(tmp_path):
    data = {"824a": [
        {"prompt_tokens": 415, "completion_tokens": 358, "api_time": 8.1e-05, "api_token_length": 20},
        {"prompt_tokens": 793, "completion_tokens": 0, "api_time": 0, "api_token_length": 38},
        {"prompt_tokens": 831, "completion_tokens": 34},
    ]}
    request = load_trace(write(tmp_path, data))["824a"]
    assert request == TraceRequest("824a", 415, (Segment(358, 8.1e-05, 20), Segment(0, 0.0, 38), Segment(34)), "math")
    assert request.num_calls == 2 and request.final_context == 831 + 34
    assert request.total_completion_tokens == 392 and request.total_api_tokens == 58


def test_text_form_is_tokenized(tmp_path):
    data = {"95_2": [
        {"prompt": "give me an example question", "completion": "can you walk us through it",
         "api_token": "Generate an image about this.", "api_time": 10.2},
        {"prompt": "ignored running context", "completion": "Here is a generated image.",
         "api_token": "Give me a few more", "api_time": 11.5},
    ]}
    request = load_trace(write(tmp_path, data), tokenizer=WordTokenizer())["95_2"]
    assert request.prompt_tokens == 5 and request.kind == "image"
    assert request.segments == (Segment(6, 10.2, 5), Segment(5, 11.5, 5))
    assert request.segments[-1].has_call    # a trailing call is kept


def _calls(prompt: int, *times: float) -> list[dict]:
    context, segments = prompt, []
    for t in times:
        segments.append({"prompt_tokens": context, "completion_tokens": 10, "api_time": t, "api_token_length": 5})
        context += 15
    return segments + [{"prompt_tokens": context, "completion_tokens": 10}]


def _text(*api_tokens: str) -> list[dict]:
    return [{"prompt": "p q", "completion": "c", "api_token": a, "api_time": 5.0} for a in api_tokens] \
        + [{"prompt": "p q c", "completion": "done"}]


def test_a_file_without_kinds_is_split_by_what_each_request_shows(tmp_path):
    """Text-form requests by their model call's instruction, anywhere in the request (spec 1.2), a
    chat when neither; token-count ones by their first prompt, the dataset's few-shot prompt
    (< 700 tokens math, < 1450 QA, else VE), whatever their calls took. A kind the file names
    wins; a request without calls has none."""
    data = {
        "tts": _text("Convert this to text to speech. ", "next question"),
        "image": _text("what now", "Generate an image about this. "),
        "chat": _text("tell me more", "and then?"),
        "math": _calls(411, 8e-5, 0.8),
        "math-edge": _calls(699, 0.7),
        "qa": _calls(934, 0.72),
        "qa-fast-call": _calls(930, 0.0),
        "qa-edge": _calls(700, 0.7),
        "qa-top": _calls(1449, 0.1),
        "ve": _calls(1973, 0.09),
        "ve-edge": _calls(1450, 0.7),
        "named": [{**_calls(411, 8e-5)[0], "kind": "ve"}, _calls(411, 8e-5)[1]],
        "no-calls": [{"prompt_tokens": 12, "completion_tokens": 3}],
    }
    trace = load_trace(write(tmp_path, data), tokenizer=WordTokenizer())
    assert {key: request.kind for key, request in trace.items()} == {
        "tts": "tts", "image": "image", "chat": "chat", "math": "math", "math-edge": "math", "qa": "qa",
        "qa-fast-call": "qa", "qa-edge": "qa", "qa-top": "qa", "ve": "ve", "ve-edge": "ve", "named": "ve",
        "no-calls": None}


def test_text_form_needs_a_tokenizer(tmp_path):
    path = write(tmp_path, {"chat-1": [{"prompt": "hi", "completion": "hello"}]})
    with pytest.raises(ValueError, match="request 'chat-1' segment 0: field 'prompt' is text, which needs a tokenizer"):
        load_trace(path)


def test_a_trace_must_be_an_object(tmp_path):
    with pytest.raises(ValueError, match="JSON object"):
        load_trace(write(tmp_path, [[{"prompt_tokens": 1, "completion_tokens": 1}]]))


GOOD = [{"prompt_tokens": 10, "completion_tokens": 3, "api_time": 0.5, "api_token_length": 4},
        {"prompt_tokens": 17, "completion_tokens": 2}]
CALL = {"completion_tokens": 3, "api_time": 0.5, "api_token_length": 4}
LAST = {"completion_tokens": 2}

MALFORMED = {
    "not a list": ({"p": 1}, "request 'bad': must be a non-empty list"),
    "empty list": ([], "request 'bad': must be a non-empty list"),
    "segment not an object": ([7], "request 'bad' segment 0: must be a JSON object"),
    "missing prompt": ([LAST], "request 'bad' segment 0: missing field 'prompt_tokens'"),
    "missing completion": ([{"prompt_tokens": 1}], "request 'bad' segment 0: missing field 'completion_tokens'"),
    "negative completion": ([{"prompt_tokens": 1, **CALL}, {"completion_tokens": -2}],
                            "request 'bad' segment 1: completion_tokens must be an integer >= 0, got -2"),
    "float count": ([{"prompt_tokens": 1.5, **LAST}], "request 'bad' segment 0: prompt_tokens must be an integer"),
    "bool count": ([{"prompt_tokens": True, **LAST}], "request 'bad' segment 0: prompt_tokens must be an integer"),
    "string count": ([{"prompt_tokens": 1, "completion_tokens": "3"}],
                     "request 'bad' segment 0: completion_tokens must be an integer"),
    "negative api_time": ([{"prompt_tokens": 1, **CALL, "api_time": -0.1}, LAST],
                          "request 'bad' segment 0: api_time must be a number >= 0"),
    "string api_time": ([{"prompt_tokens": 1, **CALL, "api_time": "1s"}, LAST],
                        "request 'bad' segment 0: api_time must be a number >= 0"),
    "nan api_time": ([{"prompt_tokens": 1, **CALL, "api_time": math.nan}, LAST],
                     "request 'bad' segment 0: api_time must be a number >= 0"),
    "api_time alone": ([{"prompt_tokens": 1, "completion_tokens": 3, "api_time": 0.5}, LAST],
                       "request 'bad' segment 0: api_time without api_token_length"),
    "api_token_length alone": ([{"prompt_tokens": 1, "completion_tokens": 3, "api_token_length": 4}, LAST],
                               "request 'bad' segment 0: api_token_length without api_time"),
    "no call mid-request": ([{"prompt_tokens": 1, "completion_tokens": 3}, LAST],
                            "request 'bad' segment 0: has no call (no api_time/api_token_length)"),
    "mixed forms in a segment": ([{"prompt_tokens": 1, "completion": "a b"}],
                                 "request 'bad' segment 0: mixes token-count fields"),
    "mixed forms across segments": ([{"prompt_tokens": 1, **CALL}, {"completion": "a b"}],
                                    "request 'bad' segment 1: is in text form but segment 0 is in token-count form"),
    "unknown field": ([{"prompt_tokens": 1, **CALL, "api_tokens_length": 4}, LAST],
                      "request 'bad' segment 0: unknown field 'api_tokens_length'"),
    "kind not a string": ([{"prompt_tokens": 1, **LAST, "kind": 3}], "request 'bad' segment 0: kind must be a string"),
    "kind on a later segment": ([{"prompt_tokens": 1, **CALL}, {**LAST, "kind": "qa"}],
                                "request 'bad' segment 1: unknown field 'kind'"),
    "text not a string": ([{"prompt": "a", "completion": 3}], "request 'bad' segment 0: completion must be a string"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_name_the_key_and_field(tmp_path, case):
    segments, message = MALFORMED[case]
    path = write(tmp_path, {"good": GOOD, "bad": segments})
    with pytest.raises(ValueError) as error:
        load_trace(path, tokenizer=WordTokenizer())
    assert message in str(error.value)


def test_negative_prompt_and_returned_counts_read_as_0_with_one_warning(tmp_path, caplog):
    # As the released trace's requests 7_2, 13_2, 16_2 and 25 (segment 5): the reference sends [0] * -2, nothing.
    data = {"7_2": [{"prompt_tokens": 10, **CALL, "api_token_length": -2}, LAST],
            "25": [{"prompt_tokens": -3, **CALL}, {**CALL, "api_token_length": -2}, LAST],
            "ok": GOOD}
    with caplog.at_level("WARNING"):
        trace = load_trace(write(tmp_path, data))
    assert trace["7_2"].segments == (Segment(3, 0.5, 0), Segment(2))
    assert trace["25"].prompt_tokens == 0
    assert trace["25"].segments == (Segment(3, 0.5, 4), Segment(3, 0.5, 0), Segment(2))
    assert trace["ok"] == load_trace(write(tmp_path, {"ok": GOOD}))["ok"]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "read 3 negative token count(s) as 0" in message
    for quirk in ("request '7_2' segment 0: api_token_length -2", "request '25' segment 0: prompt_tokens -3",
                  "request '25' segment 1: api_token_length -2"):
        assert quirk in message


def test_a_trace_without_negative_counts_loads_without_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        load_trace(write(tmp_path, {"ok": GOOD}))
    assert not caplog.records


def test_an_empty_trace_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="the trace has no requests"):
        load_trace(write(tmp_path, {}))


def test_describe_groups_by_kind():
    trace = generate_workload("mixed", 60, seed=0)
    trace["loaded"] = TraceRequest("loaded", 8, (Segment(4, 1.0, 2), Segment(3)))
    stats = describe(trace)
    assert stats["unknown"] == {"requests": 1, "calls": 1.0, "api_time": 1.0, "prompt": 8.0,
                                "completion_tokens": 7.0, "returned_tokens": 2.0, "final_context": 17.0,
                                "max_final_context": 17}
    assert stats["all"]["requests"] == 61
    assert sum(stats[k]["requests"] for k in stats if k != "all") == 61


def test_scale_tokens_shrinks_every_count_and_keeps_the_calls():
    trace = generate_workload("mixed", 50, seed=1)
    small = scale_tokens(trace, 0.125)
    for key, r in trace.items():
        s = small[key]
        assert s.num_calls == r.num_calls and s.kind == r.kind
        assert [x.api_time for x in s.segments] == [x.api_time for x in r.segments]
        assert s.prompt_tokens == max(1, round(r.prompt_tokens * 0.125))
        for a, b in zip(r.segments, s.segments):
            assert b.completion_tokens == (0 if a.completion_tokens == 0 else max(1, round(a.completion_tokens / 8)))
    assert describe(small)["all"]["final_context"] < describe(trace)["all"]["final_context"] / 6

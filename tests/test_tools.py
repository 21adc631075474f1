"""The tool runtime of LLM.generate on a tiny random Llama that "writes" a fixed script.

A random model writes no call format by chance, so `ScriptRunner` replaces the k-th token a
request samples with the k-th character of SCRIPT (the model still computes every step and its
KV). Characters are token ids TEXT + ord(c), for generated text, tool results and prompts alike.
SCRIPT has one call per ToolFormat `"<k>[" ... "]"` (call 1 twice): a request with format k makes
only call k.
"""
from __future__ import annotations

import math
import threading
import time

import pytest

from helpers import random_hf_tensors, tiny_spec
from infercept_jax import LLM, SamplingParams
from infercept_jax.tools import Tool, ToolFormat
from models.llama import Llama
from scheduling.request import RequestStatus

SCRIPT = ("9[2+3] 1[echo(hi)] 2[boom(x)] 3[slow(y)] 4[count(z)] 5[nope(w)] 6[huge(v)] 7[wait(a)] 8[release(b)] "
          "1[echo(hi)] ....")
TEXT = 128   # ids TEXT.. are characters chr(id - TEXT)


class ScriptTokenizer:
    special_tokens = frozenset()
    eos_token_id = None

    def encode(self, text):
        return [TEXT + ord(c) for c in text.encode("ascii", "replace").decode()]

    encode_prompt = encode       # no special tokens to add

    def decode(self, ids):
        return "".join(chr(i - TEXT) for i in ids)


class ScriptRunner:
    """The real runner, with each sampled token replaced by the request's next SCRIPT character."""

    def __init__(self, runner):
        self.runner = runner

    def execute(self, output):
        sampled, stall_seconds = self.runner.execute(output)
        script = [(request, TEXT + ord(SCRIPT[request.num_generated_tokens])
                   if request.num_generated_tokens < len(SCRIPT) else TEXT + ord("."))
                  for request, _ in sampled]
        return script, stall_seconds


def call_end(k):
    """How many tokens a request samples up to the end of call k."""
    return SCRIPT.index("]", SCRIPT.index(f"{k}[")) + 1


@pytest.fixture(scope="module")
def model():
    spec = tiny_spec()
    return Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=3))


@pytest.fixture
def llm(model):
    llm = LLM.from_model(model, ScriptTokenizer(), num_kv_blocks=256, block_size=4, max_num_seqs=16,
                         max_num_batched_tokens=64, row_width=8, attn_chunk_tokens=8, max_model_len=160,
                         warmup=False, strict_compile=False, policy="preserve")
    llm.engine.runner = ScriptRunner(llm.engine.runner)
    yield llm
    llm.close()


def calling(k, max_tokens=None):
    """Greedy params whose ToolFormat sees only call k of SCRIPT; by default 4 tokens are sampled
    after its first call."""
    fmt = ToolFormat(call_start=f"{k}[", call_end="]", result_template="=({result})")
    return SamplingParams(max_tokens=max_tokens or call_end(k) + 4, temperature=0.0, ignore_eos=True,
                          tool_format=fmt)


def answered(k, result):
    """The text of a request with format k whose call got `result`."""
    n = call_end(k)
    return SCRIPT[:n] + f"=({result})" + SCRIPT[n:n + 4]


@pytest.fixture
def release():
    """An event that a hanging tool waits for; set at teardown so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def test_the_script_model_writes_the_script(llm):
    out = llm.generate("go", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    assert out.text == SCRIPT[:30] and out.token_ids == ScriptTokenizer().encode(SCRIPT[:30])


def test_a_result_is_appended_and_generation_continues(llm):
    echo = Tool("echo", lambda arguments: arguments.upper())
    out = llm.generate("go", calling(1), tools=[echo])[0]
    assert out.text == answered(1, "HI")
    assert out.num_generated_tokens == call_end(1) + 4 and out.finish_reason == "length"
    [record] = out.tool_calls
    assert (record.tool, record.arguments, record.result, record.error, record.cache_hit) == \
        ("echo", "hi", "HI", False, False)


def test_a_call_ends_where_its_end_marker_appears_in_the_last_tokens_text():
    """SmolLM2 writes ")]." as one token: the call ends at its "]", the "." stays before the
    result. An end marker in earlier text, or a call started before `search_from`, ends nothing."""
    fmt = ToolFormat("[", "]", call_end_token_ids=(7,))
    text = "The sum is [calc(2+3)]."
    assert fmt.find_call(text, 0, token=99, new_from=text.index(")")) == "calc(2+3)"
    assert fmt.find_call(text, 0, token=99, new_from=text.index("]") + 1) is None        # "." alone ends nothing
    assert fmt.find_call("a [x] b", 0, token=99, new_from=6) is None                    # the "]" came before
    assert fmt.find_call("a [x] [y", 0, token=7, new_from=7) == "y"                       # an end token
    assert fmt.find_call("[x] [y]", 4, token=99, new_from=6) == "y"
    assert fmt.find_call("[x] y]", 4, token=99, new_from=5) is None                      # "[x" was before search_from
    two = ToolFormat("<<", ">>")
    assert two.find_call("a <<x>>=", 0, token=99, new_from=6) == "x"              # ">" then ">=": the end over two tokens


def test_a_result_template_may_hold_other_braces():
    """A JSON template: its braces are text, and only {result} is filled (str.format raised KeyError
    at every resume, and inside `generate` that ended the whole batch)."""
    fmt = ToolFormat("<<", ">>", result_template='{"result": {result}}')
    assert fmt.render("42") == '{"result": 42}'
    assert ToolFormat("<<", ">>", result_template="={result} ({result})").render("{x}") == "={x} ({x})"


def test_a_stop_string_is_searched_for_only_in_what_the_model_wrote_after_the_result(llm):
    """The result's ")" and the next sampled " " make the stop ") "; it used to cut the text inside
    the result (after a stream had shown all of it) and stop the request."""
    fmt = ToolFormat(call_start="1[", call_end="]", result_template="=({result})")
    params = SamplingParams(max_tokens=call_end(1) + 4, temperature=0.0, ignore_eos=True, tool_format=fmt, stop=[") "])
    out = llm.generate("go", params, tools=[Tool("echo", lambda arguments: arguments)])[0]
    assert out.text == answered(1, "hi") and ") " in out.text and out.finish_reason == "length"


def test_calls_are_routed_by_name(llm):
    tools = [Tool("echo", lambda a: f"echo {a}"), Tool("count", lambda a: str(len(a)))]
    outs = llm.generate(["go"] * 4, [calling(1), calling(4), calling(5), calling(9)], tools=tools)
    assert [o.text for o in outs] == [
        answered(1, "echo hi"), answered(4, "1"),
        answered(5, "error: unknown tool 'nope'; the tools are echo, count"),
        answered(9, "error: the call names no tool; write name(arguments); the tools are echo, count")]
    assert [o.tool_calls[0].error for o in outs] == [False, False, True, True]


def test_a_single_tool_gets_a_call_that_names_none_or_another_name(llm):
    """With one tool, a call is for it: "nope(w)" is its argument text (a calculator's "abs(-3)"),
    not a call of an unknown tool."""
    calc = Tool("calc", lambda a: str(sum(int(x) for x in a.split("+"))))
    assert llm.generate("go", calling(9), tools=[calc])[0].text == answered(9, "5")
    echo = Tool("echo", lambda a: f"<{a}>")
    assert llm.generate("go", calling(5), tools=[echo])[0].text == answered(5, "<nope(w)>")


def test_failing_tools_get_error_texts_and_do_not_stop_the_others(llm, release):
    def boom(arguments):
        raise ValueError(f"bad {arguments}")

    def slow(arguments):
        release.wait(5)
        return "too late"

    def exits(arguments):
        raise SystemExit(2)          # a command-line main wrapped as a tool

    tools = [Tool("echo", lambda a: a), Tool("boom", boom), Tool("slow", slow, timeout_s=0.2),
             Tool("count", len), Tool("huge", lambda a: "x" * 1000), Tool("nope", exits)]
    outs = llm.generate(["go"] * 6, [calling(k) for k in (1, 2, 3, 4, 6, 5)], tools=tools)
    echo, boom_out, slow_out, count, huge, exit_out = outs
    assert exit_out.text == answered(5, "error: SystemExit: 2")
    assert echo.text == answered(1, "hi")
    assert boom_out.text == answered(2, "error: ValueError: bad x")
    assert slow_out.text == answered(3, "error: tool slow timed out after 0.2 s")
    assert slow_out.tool_calls[0].seconds < 4   # resumed long before the thread returns
    assert count.text == answered(4, "error: tool count returned int, not str")
    # The 1000-character result does not fit the 160-token context: cut, and the request ends.
    assert huge.finish_reason == "length" and huge.text.endswith("x" * 50)
    assert len(huge.prompt_token_ids) + len(huge.token_ids) == 160
    assert huge.tool_calls[0].result == "x" * 1000 and not huge.tool_calls[0].error
    assert llm.engine.requests == {}


def test_two_streams_read_in_turns_each_get_all_their_text(llm):
    """The step that finishes b runs in a's loop: b's outputs wait in its inbox (b's loop used to
    drop them, find nothing to run and spin for ever), a tool call of b's included."""
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    result = {}

    def read():
        a = llm.stream("go", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        b = llm.stream("go", short)
        c = llm.stream("go", calling(1), tools=[Tool("echo", lambda arguments: arguments.upper())])
        b_first, c_first = next(b), next(c)
        result["a"] = "".join(a)
        result["b"], result["c"] = b_first + "".join(b), c_first + "".join(c)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "a stream never ended"
    assert result == {"a": SCRIPT[:12], "b": SCRIPT[:3], "c": answered(1, "HI")}
    assert not llm.engine.requests


def test_other_requests_keep_generating_while_a_call_runs(llm, release):
    """Call 7 waits for call 8, which request 8 writes only if it keeps going meanwhile."""
    def wait(arguments):
        return "released" if release.wait(5) else "not released"

    def set_release(arguments):
        release.set()
        return "done"

    tools = [Tool("wait", wait), Tool("release", set_release)]
    waiting, releasing = llm.generate(["go", "go"], [calling(7), calling(8)], tools=tools)
    assert waiting.text == answered(7, "released") and releasing.text == answered(8, "done")


def test_the_cache_answers_identical_calls_without_running_the_tool(llm):
    runs = []
    echo = Tool("echo", lambda a: runs.append(a) or a, cache=True)
    outs = llm.generate(["go", "go"], calling(1, max_tokens=len(SCRIPT)), tools=[echo])
    assert [[c.result for c in o.tool_calls] for o in outs] == [["hi", "hi"]] * 2
    assert runs == ["hi"]
    assert [[c.cache_hit for c in o.tool_calls] for o in outs] == [[False, True], [True, True]]


def test_a_failed_call_is_not_cached(llm):
    runs = []

    def flaky(arguments):
        runs.append(arguments)
        if len(runs) == 1:
            raise TimeoutError("try again")
        return "ok"

    out = llm.generate("go", calling(1, max_tokens=len(SCRIPT)), tools=[Tool("echo", flaky, cache=True)])[0]
    assert [c.result for c in out.tool_calls] == ["error: TimeoutError: try again", "ok"]
    assert len(runs) == 2


def test_a_tool_without_a_time_limit_is_waited_for(llm):
    """timeout_s=math.inf: `wait` was given inf and raised OverflowError once only calls were pending."""
    def slow(arguments):
        time.sleep(0.3)
        return "done"
    out = llm.generate("go", calling(1), tools=[Tool("echo", slow, timeout_s=math.inf)])[0]
    assert out.text == answered(1, "done") and not out.tool_calls[0].error


@pytest.mark.parametrize("make", [
    lambda: ToolFormat(b"<<", b">>"), lambda: ToolFormat("<<", 5), lambda: ToolFormat("<<", ">>", result_template=None),
    lambda: Tool("t", str, timeout_s="5"), lambda: Tool("t", str, timeout_s=0), lambda: Tool("t", str, timeout_s=True),
])
def test_tool_formats_and_tools_of_the_wrong_types_are_refused(make):
    """A bytes marker passed every check and raised TypeError inside the engine's step: the engine
    stopped for every request."""
    with pytest.raises(ValueError):
        make()


def test_a_tool_format_whose_marker_holds_a_special_token_is_refused(llm):
    """Output text is decoded without special tokens: such a marker never appears in it, and the
    request generated to its end with its calls unseen."""
    llm.engine.tokenizer.special_tokens = frozenset({"<|call|>"})
    special_start = SamplingParams(max_tokens=8, tool_format=ToolFormat("<|call|>", "]"))
    with pytest.raises(ValueError, match="call_start '<|call|>' holds the special token"):
        llm.engine.add_request("go", special_start)
    with pytest.raises(ValueError, match="call_end_token_ids"):
        llm.engine.add_request("go", SamplingParams(tool_format=ToolFormat("1[", "]<|call|>")))
    assert llm.engine.requests == {}
    rid = llm.engine.add_request("go", SamplingParams(max_tokens=8, temperature=0.0, intercept_after=2))
    while llm.engine.requests[rid].status is not RequestStatus.PAUSED:
        llm.engine.step()
    with pytest.raises(ValueError, match="special token"):
        llm.engine.resume(rid, "ok", special_start)
    assert llm.engine.requests[rid].status is RequestStatus.PAUSED
    llm.engine.add_request("go", calling(1))          # plain markers are taken


def test_a_call_without_tools_gets_an_error_text(llm):
    out = llm.generate("go", calling(1))[0]
    assert out.text == answered(1, "error: no tools were given")
    assert out.tool_calls[0].tool is None and out.tool_calls[0].error


def test_intercept_after_pauses_resume_at_once_in_generate(llm):
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, intercept_after=5)
    out = llm.generate("go", p)[0]
    assert out.text == SCRIPT[:12] and out.num_interceptions == 2 and out.tool_calls == []


def test_bad_tools_are_rejected_before_anything_is_queued(llm):
    with pytest.raises(ValueError, match="unique"):
        llm.generate("go", calling(1), tools=[Tool("echo", str), Tool("echo", repr)])
    with pytest.raises(ValueError, match="Tool objects"):
        llm.generate("go", calling(1), tools=[str])
    assert llm.engine.requests == {}


def test_generate_waits_for_the_call_instead_of_spinning_when_nothing_can_run(model):
    """The paused request keeps its KV (preserve) and the other, preempted, cannot get the memory
    back: until the call returns, `generate` sleeps on it instead of scheduling empty steps."""
    llm = LLM.from_model(model, ScriptTokenizer(), num_kv_blocks=24, block_size=4, max_num_seqs=4,
                         max_num_batched_tokens=96, row_width=8, attn_chunk_tokens=8, max_model_len=96,
                         warmup=False, strict_compile=False, policy="preserve")
    llm.engine.runner = ScriptRunner(llm.engine.runner)
    empty_steps = []
    schedule = llm.engine.scheduler.schedule

    def counted(now):
        output = schedule(now)
        empty_steps.append(output.is_empty)
        return output

    llm.engine.scheduler.schedule = counted
    slow_echo = Tool("echo", lambda arguments: time.sleep(0.5) or arguments)
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    try:
        caller, blocked = llm.generate(["go", "x" * 80], [calling(1), long], tools=[slow_echo])
    finally:
        llm.close()
    assert caller.text == answered(1, "hi") and blocked.finish_reason == "length"
    assert 1 <= sum(empty_steps) <= 5   # spinning made thousands in the call's 0.5 s

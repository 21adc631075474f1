"""Tool calls: how a model writes one (`ToolFormat`) and the functions that answer (`Tool`).

A `ToolFormat` in a request's SamplingParams makes the engine pause the request when its output
ends a call; `LLM.generate(..., tools=[...])` then runs the call on a thread pool (the "API proxy"
of APIServe) and resumes the request with the result, while the other requests keep generating.
"""
from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass
from typing import Callable, Sequence

_NAMED_CALL = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class ToolFormat:
    """A call is `call_start` + call text + `call_end` in the output text; a sampled token in
    `call_end_token_ids` also ends a call. The result is appended as `result_template` with each
    `{result}` replaced by it (other braces are literal text, as in a JSON template)."""

    call_start: str
    call_end: str
    call_end_token_ids: tuple[int, ...] = ()
    result_template: str = "{result}"

    def __post_init__(self) -> None:
        if not all(isinstance(s, str) for s in (self.call_start, self.call_end, self.result_template)):
            raise ValueError("call_start, call_end and result_template must be strings, got "
                             f"{self.call_start!r}, {self.call_end!r}, {self.result_template!r}")
        if not self.call_start or not self.call_end:
            raise ValueError("a ToolFormat needs a non-empty call_start and call_end")
        if "{result}" not in self.result_template:
            raise ValueError("result_template must contain {result}")
        if not all(isinstance(token, int) for token in self.call_end_token_ids):
            raise ValueError(f"call_end_token_ids must be token ids, got {self.call_end_token_ids!r}")

    def check_markers(self, special_tokens: frozenset[str]) -> None:
        """Refuse markers that hold a special token: output text is decoded without them, so such a
        marker never appears in it and the call would never be found."""
        for name, marker in (("call_start", self.call_start), ("call_end", self.call_end)):
            held = sorted(token for token in special_tokens if token in marker)
            if held:
                hint = "list its token id in call_end_token_ids" if name == "call_end" else "use plain text"
                raise ValueError(f"the tool format's {name} {marker!r} holds the special token {held[0]!r}, which "
                                 f"output text leaves out, so no call would ever be found; {hint}")

    def find_call(self, text: str, search_from: int, token: int, new_from: int) -> str | None:
        """The call text if `text` (the output so far; the last token's text starts at `new_from`)
        has just ended a call, else None.

        The `call_end` may be followed by more text of the same token (SmolLM2 writes ")]." as one
        token): the call ends where `call_end` first appears in what that token completed. Only a
        `call_start` at or after `search_from` counts (the text of earlier calls and results is
        not searched again).
        """
        end = text.find(self.call_end, max(search_from, new_from - len(self.call_end) + 1))
        if end < 0:
            if token not in self.call_end_token_ids:
                return None
            end = len(text)
        start = text.rfind(self.call_start, search_from, end)
        if start < 0:
            return None
        return text[start + len(self.call_start):end]

    @staticmethod
    def split(call_text: str) -> tuple[str | None, str]:
        """`name(arguments)` -> (name, arguments); any other text -> (None, text)."""
        match = _NAMED_CALL.match(call_text)
        return (match.group(1), match.group(2)) if match else (None, call_text.strip())

    def render(self, result: str) -> str:
        return self.result_template.replace("{result}", result)


@dataclass(frozen=True)
class Tool:
    """A function the model can call: `fn(arguments: str) -> str`.

    It runs on a worker thread. An exception, a result that is not a string, or a run longer
    than `timeout_s` (`math.inf`: no limit) becomes an error text that the model reads instead of
    a result. With `cache`, identical calls are answered from memory.
    """

    name: str
    fn: Callable[[str], str]
    timeout_s: float = 10.0
    cache: bool = False

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z_][\w.-]*", self.name):
            raise ValueError(f"a tool name is an identifier, got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"tool {self.name!r}: fn must be callable")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"tool {self.name!r}: timeout_s must be a number > 0, got {self.timeout_s!r}")


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One call of a request as `LLM.generate` answered it (on `RequestOutput.tool_calls`)."""

    tool: str | None        # the tool that ran; None when the call was not routed to one
    arguments: str
    result: str             # the text the model read: the tool's result or an error text
    seconds: float          # from the pause to the result
    error: bool = False
    cache_hit: bool = False


@dataclass(slots=True)
class _Call:
    request_id: str
    tool: Tool | None
    arguments: str
    future: Future          # -> (text, is_error)
    start: float
    deadline: float
    cache_hit: bool


def _run(tool: Tool, arguments: str) -> tuple[str, bool]:
    """Run `tool.fn` on a worker thread; a failure becomes the error text the model reads."""
    try:
        result = tool.fn(arguments)
    except BaseException as exc:     # SystemExit too (a command-line main as a tool); a worker thread's
        return f"error: {type(exc).__name__}: {exc}", True
    if not isinstance(result, str):
        return f"error: tool {tool.name} returned {type(result).__name__}, not str", True
    return result, False


def _answered(text: str) -> Future:
    future = Future()
    future.set_result((text, True))
    return future


class ToolCalls:
    """The tool calls of one `LLM.generate`: routes each paused request's call to a tool, runs
    it on `pool` and hands back results as they complete or time out.

    A call that runs past its tool's `timeout_s` (counted from the pause) is answered with an
    error text and its later result is dropped; its thread cannot be killed, so it keeps a
    worker of `pool` busy until `fn` returns. For a tool with `cache`, an identical call (same
    tool and arguments) shares the first one's future, even while that one still runs.
    """

    def __init__(self, tools: Sequence[Tool], pool: Executor | None):
        self.tools = {tool.name: tool for tool in tools}
        self.pool = pool
        self.cache: dict[tuple[str, str], Future] = {}
        self.pending: dict[str, _Call] = {}
        self.records: dict[str, list[ToolCallRecord]] = defaultdict(list)

    def start(self, request_id: str, call_text: str) -> None:
        tool, arguments, error = self._route(call_text)
        now = time.monotonic()
        hit = False
        if tool is None:
            future = _answered(error)
        elif tool.cache and _reusable(self.cache.get((tool.name, arguments))):
            future, hit = self.cache[(tool.name, arguments)], True
        else:
            future = self.pool.submit(_run, tool, arguments)
            if tool.cache:
                self.cache[(tool.name, arguments)] = future
        deadline = now + tool.timeout_s if tool is not None else now
        self.pending[request_id] = _Call(request_id, tool, arguments, future, now, deadline, hit)

    def _route(self, call_text: str) -> tuple[Tool | None, str, str]:
        """(tool, arguments, "") for a routable call, else (None, call_text, error text)."""
        if not self.tools:
            return None, call_text, "error: no tools were given"
        name, arguments = ToolFormat.split(call_text)
        if name in self.tools:
            return self.tools[name], arguments, ""
        if len(self.tools) == 1:        # the only tool gets the whole call: a calculator's "abs(-3)" too
            return next(iter(self.tools.values())), call_text.strip(), ""
        names = ", ".join(self.tools)
        what = f"unknown tool {name!r}" if name is not None else "the call names no tool; write name(arguments)"
        return None, call_text, f"error: {what}; the tools are {names}"

    def ready(self) -> list[tuple[str, str]]:
        """(request id, result text) of every call that has finished or run out of time."""
        now = time.monotonic()
        answered = []
        for call in list(self.pending.values()):
            if call.future.done():
                text, error = call.future.result()
            elif now >= call.deadline:
                text, error = f"error: tool {call.tool.name} timed out after {call.tool.timeout_s} s", True
            else:
                continue
            del self.pending[call.request_id]
            self.records[call.request_id].append(ToolCallRecord(
                call.tool.name if call.tool else None, call.arguments, text, now - call.start, error,
                call.cache_hit))
            answered.append((call.request_id, text))
        return answered

    def wait(self) -> None:
        """Block until a pending call finishes or the nearest deadline passes."""
        if self.pending:
            timeout = min(call.deadline for call in self.pending.values()) - time.monotonic()
            wait([call.future for call in self.pending.values()], timeout=min(max(0.0, timeout), threading.TIMEOUT_MAX),
                 return_when=FIRST_COMPLETED)


def _reusable(future: Future | None) -> bool:
    """A cached call can answer again unless it failed (a failure may be transient)."""
    return future is not None and not (future.done() and future.result()[1])

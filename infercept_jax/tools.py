"""Tool calls: how a model writes one (`ToolFormat`) and the functions that answer (`Tool`).

A `ToolFormat` in a request's SamplingParams makes the engine pause the request when its output
ends a call; `LLM.generate(..., tools=[...])` then runs the call on a thread pool (the "API proxy"
of APIServe) and resumes the request with the result, while the other requests keep generating.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_NAMED_CALL = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class ToolFormat:
    """A call is `call_start` + call text + `call_end` in the output text; a sampled token in
    `call_end_token_ids` also ends a call. The result is appended as `result_template` filled
    with `{result}`."""

    call_start: str
    call_end: str
    call_end_token_ids: tuple[int, ...] = ()
    result_template: str = "{result}"

    def __post_init__(self) -> None:
        if not self.call_start or not self.call_end:
            raise ValueError("a ToolFormat needs a non-empty call_start and call_end")
        if "{result}" not in self.result_template:
            raise ValueError("result_template must contain {result}")

    def find_call(self, text: str, search_from: int, token: int) -> str | None:
        """The call text if `text` (the output so far) has just ended a call, else None.

        Only a `call_start` at or after `search_from` counts (the text of earlier calls and
        results is not searched again).
        """
        if text.endswith(self.call_end):
            end = len(text) - len(self.call_end)
        elif token in self.call_end_token_ids:
            end = len(text)
        else:
            return None
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
        return self.result_template.format(result=result)


@dataclass(frozen=True)
class Tool:
    """A function the model can call: `fn(arguments: str) -> str`.

    It runs on a worker thread. An exception, a result that is not a string, or a run longer
    than `timeout_s` becomes an error text that the model reads instead of a result. With
    `cache`, identical calls are answered from memory.
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
        if not self.timeout_s > 0:
            raise ValueError(f"tool {self.name!r}: timeout_s must be > 0, got {self.timeout_s!r}")

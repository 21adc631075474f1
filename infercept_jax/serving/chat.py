"""Chat prompts with tools, and the tool calls a model writes, in the OpenAI format.

Tools are rendered by the model's chat template when it knows how (its source mentions `tools`);
otherwise a system prompt lists them and asks for calls written as

    <tool_call>[
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ]</tool_call>

(SmolLM2's function-calling format; the markers are configurable). The engine pauses a request when
its output ends a call, and `ChatFormat.parse_calls` turns the text between the markers into
OpenAI `tool_calls`.

Transparent resume needs the next turn's prompt to begin with exactly the tokens the model holds,
so an assistant message that carries tool calls is rendered as the text the model wrote for them,
remembered by call id; a call id this server did not hand out is rendered in the canonical form above.
"""
from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from infercept_jax.tools import ToolFormat

DEFAULT_CALL_START = "<tool_call>"
DEFAULT_CALL_END = "</tool_call>"

DEFAULT_TOOL_PROMPT = """You can call these tools:
<tools>{tools}</tools>

To call tools, answer with this and nothing else:
{call_start}[
{{"name": "tool_name", "arguments": {{"argument": "value"}}}}
]{call_end}"""


class BadRequest(ValueError):
    """A request the client can fix (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str          # a JSON object, as text (OpenAI's format)

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


class ChatFormat:
    """Renders conversations for one tokenizer and parses the calls its model writes."""

    def __init__(self, tokenizer, call_start: str = DEFAULT_CALL_START, call_end: str = DEFAULT_CALL_END,
                 remembered_calls: int = 65536):
        if tokenizer is None or tokenizer.chat_template is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.tool_format = ToolFormat(call_start, call_end)
        self.tool_format.check_markers(tokenizer.special_tokens)
        self._written: OrderedDict[str, str] = OrderedDict()    # call id -> the assistant text it came in
        self._remembered = remembered_calls

    # ----------------------------------------------------------------- rendering
    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        """The prompt text of an OpenAI `messages` list (and `tools`), ending with the assistant's turn."""
        if not messages:
            raise BadRequest("messages is empty")
        turns = [self._message(i, m) for i, m in enumerate(messages)]
        schemas = [self._schema(i, t) for i, t in enumerate(tools or [])]
        if schemas and self.tokenizer.supports_tools:
            return self._apply(turns, schemas)
        if schemas:
            prompt = DEFAULT_TOOL_PROMPT.format(tools=json.dumps(schemas), call_start=self.tool_format.call_start,
                                                call_end=self.tool_format.call_end)
            if turns[0]["role"] == "system":
                turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + prompt}
            else:
                turns.insert(0, {"role": "system", "content": prompt})
        return self._apply(turns, None)

    def _apply(self, turns: list[dict], tools: list[dict] | None) -> str:
        try:
            return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tools=tools)
        except Exception as exc:      # the template's own checks (roles, alternation) are the client's to fix
            raise BadRequest(f"the chat template could not render these messages: {exc}") from None

    def _message(self, index: int, message) -> dict:
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(f"{where}.role must be system, user, assistant or tool, got {role!r}")
        content = _text(message.get("content"), f"{where}.content")
        calls = message.get("tool_calls")
        if calls:
            if role != "assistant":
                raise BadRequest(f"{where}: only an assistant message has tool_calls")
            content = self._written_text(calls, where) or content + self.canonical_calls(calls, where)
        return {"role": "system" if role == "developer" else role, "content": content}

    def _written_text(self, calls: list, where: str) -> str | None:
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise BadRequest(f"{where}.tool_calls must be a list of objects")
        call_id = calls[0].get("id")
        return self._written.get(call_id) if isinstance(call_id, str) else None   # else: unknown, rendered canonically

    def canonical_calls(self, calls: list[dict], where: str = "tool_calls") -> str:
        """Calls in the format the tool prompt asks for (for call ids this server did not write)."""
        items = []
        for j, call in enumerate(calls):
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise BadRequest(f"{where}.tool_calls[{j}].function needs a name")
            arguments = function.get("arguments", "{}")
            try:
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            except json.JSONDecodeError:
                raise BadRequest(f"{where}.tool_calls[{j}].function.arguments is not JSON") from None
            items.append(json.dumps({"name": function["name"], "arguments": arguments}))
        return self.tool_format.call_start + "[\n" + ",\n".join(items) + "\n]" + self.tool_format.call_end

    @staticmethod
    def _schema(index: int, tool) -> dict:
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequest(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        function = tool["function"]
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"tools[{index}].function.name must be a non-empty string")
        return {key: function[key] for key in ("name", "description", "parameters") if key in function}

    # ----------------------------------------------------------------- parsing
    def parse_calls(self, call_text: str) -> list[ToolCall] | None:
        """The calls in the text between the markers, or None if it is not a list of calls."""
        try:
            parsed = json.loads(call_text)
        except json.JSONDecodeError:
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if not isinstance(arguments, (dict, str)):
                return None
            text = arguments if isinstance(arguments, str) else json.dumps(arguments)
            calls.append(ToolCall(f"call_{secrets.token_hex(12)}", item["name"], text))
        return calls or None

    def remember(self, calls: list[ToolCall], written: str) -> None:
        """Render later messages that carry these calls as `written`, the text the model wrote."""
        for call in calls:
            self._written[call.id] = written
        while len(self._written) > self._remembered:
            self._written.popitem(last=False)

    def content_before_call(self, text: str) -> str | None:
        """The text a turn wrote before its call (OpenAI's `content` next to `tool_calls`)."""
        start = text.rfind(self.tool_format.call_start)
        before = text[:start] if start >= 0 else text
        return before if before.strip() else None


def _text(content, where: str) -> str:
    """A message's content as text: a string, null, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where} must be a string or a list of text parts")

"""The OpenAI request bodies this server accepts, and the error shape it answers with.

Unknown fields are refused, and so are known options this server does not implement when they
ask for anything but their neutral value (n > 1, logprobs, penalties...): a client never gets a
reply that silently ignored what it asked for.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from infercept_jax.config import SamplingParams
from infercept_jax.serving.chat import BadRequest


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None               # an extension (vLLM has it too)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    def check_supported(self) -> None:
        unsupported = {
            "n": self.n != 1, "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs not in (None, False),
        }
        asked = [name for name, used in unsupported.items() if used]
        if asked:
            raise BadRequest(f"not supported by this server: {', '.join(asked)} (leave them out or at their defaults)")

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The request's SamplingParams; their own checks raise ValueError, which the server answers with 400."""
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                              seed=self.seed, stop=self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo or self.suffix or (self.best_of or 1) != 1:
            raise BadRequest("not supported by this server: echo, suffix, best_of > 1")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise BadRequest("one prompt per request (a list of prompts is not supported)")
            self.prompt = self.prompt[0]


class ChatCompletionRequest(_Sampling):
    messages: list[dict]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tool_choice not in (None, "auto", "none"):
            raise BadRequest(f"tool_choice {self.tool_choice!r} is not supported: a forced call is not implemented; "
                             "use \"auto\" or \"none\"")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise BadRequest("response_format other than text is not supported")


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


"""The engine loop: schedule, run one step, append tokens, finish requests.

`Engine.step()` is the whole flow: the scheduler fills the token budget, the runner executes one
jitted step, and the engine appends sampled tokens and checks stop conditions. The clock is
injected so a simulator can drive the same code on virtual time.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

import numpy as np

from infercept_jax.config import SamplingParams
from infercept_jax.outputs import RequestOutput
from kvcache.block_manager import BlockManager
from scheduling.request import Request, RequestStatus
from scheduling.scheduler import Scheduler, SchedulerConfig


class Engine:
    def __init__(self, runner, block_manager: BlockManager, *, max_model_len: int, vocab_size: int,
                 eos_token_ids: tuple[int, ...], tokenizer=None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 384, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.runner = runner
        self.blocks = block_manager
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        self.scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens, max_num_seqs), block_manager)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seed_rng = np.random.default_rng(seed)

    # ----------------------------------------------------------------- requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue a request; raises ValueError on bad input, leaving the engine as it was."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the model's context (max_model_len) is "
                             f"{self.max_model_len}, which leaves no room to generate")
        blocks = -(-(len(token_ids) + 1) // self.blocks.block_size)
        if blocks > self.blocks.device.capacity:
            raise ValueError(f"prompt needs {blocks} KV blocks but the pool has {self.blocks.device.capacity}; "
                             "raise num_kv_blocks or kv_cache_memory_gb")
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**32))
        request = Request(request_id, token_ids, params, self.clock(), seed=seed, prompt=text)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")

    def abort(self, request_id: str) -> RequestOutput:
        request = self._get(request_id)
        if not request.status.finished:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        return self._output(request, [])

    def _get(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request id {request_id!r}") from None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def pop_finished(self, request_id: str) -> Request:
        """Forget a finished request (the caller has its output)."""
        request = self._get(request_id)
        if not request.status.finished:
            raise ValueError(f"request {request_id!r} is not finished")
        return self.requests.pop(request_id)

    # ----------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        """One iteration; returns an output for every request that got a token or finished."""
        output = self.scheduler.schedule()
        if not output.scheduled:
            return []
        sampled = self.runner.execute(output)
        for item in output.scheduled:
            item.request.num_computed_tokens += item.num_query_tokens
        now = self.clock()
        results = []
        for request, token in sampled:
            request.token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            self._check_stop(request, token)
            results.append(self._output(request, [token]))
        return results

    def _check_stop(self, request: Request, token: int) -> None:
        params: SamplingParams = request.sampling
        status = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if self.tokenizer is not None:
            previous = len(request.output_text)
            request.output_text = self.tokenizer.decode(request.output_token_ids)
            if params.stop and self._truncate_at_stop(request, previous):
                status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            self._finish(request, status)

    @staticmethod
    def _truncate_at_stop(request: Request, previous_len: int) -> bool:
        params: SamplingParams = request.sampling
        text = request.output_text
        longest = max(len(s) for s in params.stop)
        search_from = max(0, previous_len - longest + 1)
        hits = [(text.find(s, search_from), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        request.output_text = text[:index + len(stop)] if params.include_stop_str_in_output else text[:index]
        return True

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        request.finish_time = self.clock()

    def _output(self, request: Request, new_tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, token_ids=list(request.output_token_ids),
            text=request.output_text, finished=request.status.finished,
            finish_reason=request.finish_reason, new_token_ids=new_tokens,
            arrival_time=request.arrival_time, first_token_time=request.first_token_time,
            finish_time=request.finish_time)

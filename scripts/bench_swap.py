"""Benchmark KV swapping: the copy path's bandwidth, and what overlapped swaps cost a step (spec 2.4, 3.5.1).

  * yardsticks: the device-host link itself, a `device_put` of the same bytes as each swap to the
    `pinned_host` memory kind and back (blocked until ready, median), where the backend has it;
    and this machine's numpy copy bandwidth of a 512 MiB buffer (memcpy, the yardstick on CPU);
  * swap-out (`copy_out` + `land`, until the pages are in host memory) and swap-in (`copy_in`)
    throughput through the runner's host pool, with the model's KV shape, for several block
    counts, as a share of the link and of memcpy; target >= 70 % of the link on an accelerator,
    >= 50 % of memcpy on CPU; and the stall of each: the host
    time `execute` spends issuing the copy before it could dispatch a step;
  * overlap: a step alone and the same step with swaps issued in the same `execute` (half out, half
    in), as many as its swap budget allows: N = T(step) * min(out, in bandwidth) / M tokens in+out
    (the paper's N_i = T_swap^-1(T_fwd(B_i))). Rows: a decode step of B requests of ctx tokens, and a
    saturated step of S tokens (those B decodes, at most S/2, plus a prompt chunk) with the profile's N(S).
    Target: within 10 % of the step alone.

S and the bandwidths come from `measure_profile` on the same LLM. The swapped blocks belong to two
"paused" sequences that trade places every step (one is swapped out while the other is swapped in),
allocated through the block manager so every copy is one the scheduler could have made.

    .venv/bin/python scripts/bench_swap.py                   # smollm2-135m, float32 on CPU
    .venv/bin/python scripts/bench_swap.py --quick
    .venv/bin/python scripts/bench_swap.py --quick --transfer pinned_host     # the GPU's path, on CPU
    .venv/bin/python scripts/bench_swap.py --dtype bfloat16          # on an accelerator
    .venv/bin/python scripts/bench_swap.py --quick --dtype bfloat16 --kv-cache-gb 0.25 --swap-space-gb 0.25
    .venv/bin/python scripts/bench_swap.py --shape smollm2-1.7b --dtype bfloat16   # random weights (GPU)

On XLA:CPU a bfloat16 step takes time proportional to the KV pool size (about 1.3 s at 0.1 GB, 4.7 s
at 0.5 GB for a 16-token step, against 0.12 s in float32 at any size), hence the small pools there;
the overlap swaps are then capped by the pools, which the table says.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import jax
import numpy as np

from infercept_jax.config import SWAP_TRANSFERS, EngineConfig
from infercept_jax.llm import LLM, resolve_dtype
from infercept_jax.experiments.records import machine_record, write_result
from infercept_jax.profiler import measure_profile, median_seconds, swap_bandwidth, synthetic_request
from models.llama import Llama
from models.shapes import SHAPES
from scheduling.output import ScheduledRequest, SchedulerOutput

MEMCPY_BYTES = 512 * 2**20
TARGET_LINK_SHARE = 0.7      # of the pinned link, on an accelerator (issue 14)
TARGET_MEMCPY_SHARE = 0.5    # of memcpy, on CPU
TARGET_OVERLAP = 1.10         # step with swaps / step alone


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="instead of --model: random weights of a named shape (models/shapes.py); the KV "
                        "shape is what a swap moves, so no checkpoint is needed (a GPU machine has none)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=16, help="B: decoding requests in the overlap steps")
    p.add_argument("--ctx", type=int, default=256, help="tokens of each decoding request")
    p.add_argument("--block-counts", default="16,64,256,1024", help="blocks per copy in the throughput table")
    p.add_argument("--repeats", type=int, default=5, help="timings per measurement (median)")
    p.add_argument("--kv-cache-gb", type=float, default=4.0, help="device KV pool (room for the swaps)")
    p.add_argument("--swap-space-gb", type=float, default=3.0, help="host KV pool")
    p.add_argument("--transfer", default="auto", choices=SWAP_TRANSFERS,
                   help="host pool memory (auto: pinned_host off the CPU, numpy on it)")
    p.add_argument("--quick", action="store_true", help="smoke run: blocks 16,64; 3 repeats; quick profile")
    p.add_argument("--out", default="results/bench_swap.json")
    args = p.parse_args()
    if args.quick:
        args.block_counts, args.repeats = "16,64", 3
    args.block_counts = [int(n) for n in args.block_counts.split(",")]
    return args


def memcpy_bandwidth(repeats: int) -> float:
    """GB/s of a numpy copy of a 512 MiB buffer (bytes copied / second)."""
    src = np.ones(MEMCPY_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    return src.nbytes / median_seconds(lambda: np.copyto(dst, src), repeats) / 1e9


def link_bandwidth(pool, num_blocks: int, repeats: int) -> tuple[float, float] | None:
    """(device->host, host->device) GB/s of a `device_put` of `num_blocks` blocks' K and V, split
    like the pools, to pinned host memory and back; None without a pinned_host memory kind."""
    device = pool.devices[0]
    if "pinned_host" not in {m.kind for m in device.addressable_memories()}:
        return None
    shape = (pool.shape[0], num_blocks) + pool.shape[2:]
    on_device = jax.device_put((np.ones(shape, pool.dtype), np.ones(shape, pool.dtype)), pool.sharding)
    pinned = pool.sharding.with_memory_kind("pinned_host")
    on_host = jax.block_until_ready(jax.device_put(on_device, pinned))
    out_s = median_seconds(lambda: jax.block_until_ready(jax.device_put(on_device, pinned)), repeats)
    in_s = median_seconds(lambda: jax.block_until_ready(jax.device_put(on_host, pool.sharding)), repeats)
    nbytes = num_blocks * pool.block_bytes
    return nbytes / out_s / 1e9, nbytes / in_s / 1e9


def swap_stalls(llm: LLM, num_blocks: int, repeats: int) -> tuple[float, float]:
    """(swap-out, swap-in) seconds `execute` stalls issuing a copy of `num_blocks` blocks (median),
    each copy waited for before the next."""
    blocks, seq = llm.engine.blocks, "bench-stall"
    out_stalls, in_stalls = [], []
    try:
        blocks.ensure(seq, num_blocks * blocks.block_size)
        for _ in range(repeats + 1):   # round 0 is untimed
            out_stalls.append(run_step(llm, SchedulerOutput(swap_out=blocks.swap_out(seq, num_blocks)))[1])
            in_stalls.append(run_step(llm, SchedulerOutput(swap_in=blocks.swap_in(seq, num_blocks)))[1])
    finally:
        blocks.free(seq)
    return statistics.median(out_stalls[1:]), statistics.median(in_stalls[1:])


def run_step(llm: LLM, output: SchedulerOutput) -> tuple[float, float]:
    """(seconds until the step and its copies are done, the stall `execute` reports)."""
    start = time.perf_counter()
    _, stall = llm.runner.execute(output)
    jax.block_until_ready((llm.runner.k_pool, llm.runner.v_pool))
    llm.runner.host_pool.wait()
    return time.perf_counter() - start, stall


def overlap_row(llm: LLM, label: str, scheduled: list[ScheduledRequest], budget_tokens: float | None,
                min_gbps: float, kv_bytes: int, repeats: int) -> dict:
    """The step of `scheduled` alone and with swaps of its budget (default: its own N_i), interleaved.

    Two paused sequences of `half` blocks each trade places every step: the one on the device is
    swapped out while the one on the host is swapped in. The swaps are capped by the free blocks.
    """
    blocks = llm.engine.blocks
    alone_out = SchedulerOutput(list(scheduled))
    alone_s = median_seconds(lambda: run_step(llm, alone_out)[0], repeats)
    if budget_tokens is None:
        budget_tokens = alone_s * min_gbps * 1e9 / kv_bytes
    wanted = int(budget_tokens // blocks.block_size) // 2
    half = min(wanted, blocks.num_free // 2, blocks.host.num_free // 2)
    on_device, on_host = "bench-paused-a", "bench-paused-b"
    try:
        for seq in (on_device, on_host):
            blocks.ensure(seq, half * blocks.block_size)
        llm.runner.execute(SchedulerOutput(swap_out=blocks.swap_out(on_host, half)))
        alone, swapped, stalls = [], [], []
        for i in range(repeats + 1):   # round 0 is untimed
            a, _ = run_step(llm, alone_out)
            out = SchedulerOutput(list(scheduled), swap_out=blocks.swap_out(on_device, half),
                                  swap_in=blocks.swap_in(on_host, half))
            on_device, on_host = on_host, on_device
            s, stall = run_step(llm, out)
            if i:
                alone.append(a)
                swapped.append(s)
                stalls.append(stall)
    finally:
        blocks.free(on_device)
        blocks.free(on_host)
    alone_ms, swapped_ms = 1e3 * statistics.median(alone), 1e3 * statistics.median(swapped)
    return {"step": label, "query_tokens": sum(s.num_query_tokens for s in scheduled),
            "alone_ms": alone_ms, "budget_tokens": budget_tokens,
            "swapped_tokens": 2 * half * blocks.block_size, "capped": half < wanted,
            "with_swaps_ms": swapped_ms, "ratio": swapped_ms / alone_ms,
            "stall_ms": 1e3 * statistics.median(stalls)}


def overlap_rows(llm: LLM, args: argparse.Namespace, profile) -> list[dict]:
    """The decode step of B x ctx and the saturated step of S tokens, each alone and with swaps."""
    blocks, vocab = llm.engine.blocks, llm.runner.spec.vocab_size
    rng = np.random.default_rng(0)
    decodes = [synthetic_request(f"bench-decode-{i}", args.ctx, args.ctx - 1, vocab, rng)
               for i in range(args.batch)]
    decode_set = [ScheduledRequest(r, 1) for r in decodes]
    with_chunk = decode_set[:profile.saturation_tokens // 2]   # leaves the chunk at least half of S
    chunk = synthetic_request("bench-chunk", profile.saturation_tokens - len(with_chunk), 0, vocab, rng)
    min_gbps = min(profile.swap_out_gb_per_s, profile.swap_in_gb_per_s)
    need = sum(blocks.blocks_needed(r.request_id, r.num_tokens) for r in decodes + [chunk])
    if need > blocks.num_free:
        raise SystemExit(f"the overlap steps need {need} device blocks ({args.batch} x {args.ctx} tokens and a "
                         f"{chunk.num_tokens}-token chunk), the pool has {blocks.num_free} free: raise "
                         "--kv-cache-gb or lower --batch / --ctx")
    try:
        for r in decodes + [chunk]:
            blocks.ensure(r.request_id, r.num_tokens)
        return [
            overlap_row(llm, f"decode B={args.batch} ctx={args.ctx}", decode_set, None, min_gbps,
                        profile.kv_bytes_per_token, args.repeats),
            overlap_row(llm, f"saturated S={profile.saturation_tokens}",
                        with_chunk + [ScheduledRequest(chunk, chunk.num_tokens)], profile.swap_limit_tokens,
                        min_gbps, profile.kv_bytes_per_token, args.repeats),
        ]
    finally:
        for r in decodes + [chunk]:
            blocks.free(r.request_id)


def print_tables(memcpy: float, transfer: str, throughput: list[dict], overlap: list[dict]) -> None:
    print(f"\nmemcpy {memcpy:.2f} GB/s; host pool: {transfer}; link: a pinned_host device_put of the same bytes\n")
    print("| blocks | MB | link out GB/s | swap-out GB/s | % link | % memcpy "
          "| link in GB/s | swap-in GB/s | % link | % memcpy | stall out ms | stall in ms |")
    print("|---:" * 12 + "|")
    for r in throughput:
        cells = [f"{r['blocks']}", f"{r['mb']:.1f}"]
        for way in ("out", "in"):
            link = r[f"link_{way}_gbps"]
            swap = r[f"{way}_gbps"]
            cells += [f"{link:.2f}" if link else "-", f"{swap:.2f}", f"{100 * swap / link:.0f} %" if link else "-",
                      f"{100 * swap / memcpy:.0f} %"]
        cells += [f"{r['out_stall_ms']:.1f}", f"{r['in_stall_ms']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\ntarget: >= {100 * TARGET_LINK_SHARE:.0f} % of the link each way on an accelerator, "
          f">= {100 * TARGET_MEMCPY_SHARE:.0f} % of memcpy on CPU\n")
    print("| step | query tokens | alone ms | swap budget tokens | swapped tokens (in+out) "
          "| with swaps ms | ratio | stall ms |")
    print("|---|" + "---:|" * 7)
    for r in overlap:
        capped = " (capped by the pools)" if r["capped"] else ""
        print(f"| {r['step']} | {r['query_tokens']} | {r['alone_ms']:.1f} | {r['budget_tokens']:,.0f} "
              f"| {r['swapped_tokens']:,}{capped} | {r['with_swaps_ms']:.1f} | {r['ratio']:.2f} "
              f"| {r['stall_ms']:.1f} |")
    print(f"\ntarget: ratio <= {TARGET_OVERLAP:.2f}; stall = host time issuing the copies before the step "
          "is dispatched (median)")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # warm-up and profiling progress
    started = time.perf_counter()
    machine = machine_record()
    memcpy = memcpy_bandwidth(args.repeats)
    print(f"memcpy: {memcpy:.2f} GB/s", flush=True)
    options = dict(policy="swap", max_num_seqs=max(EngineConfig().max_num_seqs, args.batch),
                   kv_cache_memory_gb=args.kv_cache_gb, swap_space_gb=args.swap_space_gb, swap_transfer=args.transfer)
    if args.shape:
        args.model = args.shape
        dtype = resolve_dtype(args.dtype)   # weights drawn on the device
        llm = LLM.from_model(Llama(SHAPES[args.shape], dtype=dtype), None, **options)
    else:
        llm = LLM(args.model, dtype=args.dtype, **options)
    pool = llm.runner.host_pool
    print(f"engine built; KV pools: {llm.engine.blocks.device.num_blocks} device blocks, "
          f"{llm.engine.blocks.host.num_blocks} host blocks; transfer path: {pool.transfer}", flush=True)
    profile = measure_profile(llm, name=f"{args.model}-bench", model=args.model, repeats=args.repeats,
                              quick=args.quick)
    print(f"profile: {profile}", flush=True)
    block_mb = pool.block_bytes / 1e6
    throughput = []
    for n in args.block_counts:
        out_gbps, in_gbps = swap_bandwidth(llm, n, args.repeats)
        link_out, link_in = link_bandwidth(pool, n, args.repeats) or (None, None)
        out_stall, in_stall = swap_stalls(llm, n, args.repeats)
        throughput.append({"blocks": n, "mb": n * block_mb, "out_gbps": out_gbps, "in_gbps": in_gbps,
                           "link_out_gbps": link_out, "link_in_gbps": link_in,
                           "out_stall_ms": 1e3 * out_stall, "in_stall_ms": 1e3 * in_stall})
        print(f"swap {n} blocks done", flush=True)
    overlap = overlap_rows(llm, args, profile)
    llm.engine.blocks.check_invariants()

    print_tables(memcpy, pool.transfer, throughput, overlap)
    result = {
        "model": args.model, "dtype": str(llm.runner.k_pool.dtype), **machine, "args": vars(args),
        "transfer": pool.transfer, "memcpy_gbps": memcpy, "profile": profile.to_dict(),
        "throughput": throughput, "overlap": overlap,
    }
    write_result(args.out, result, started)


if __name__ == "__main__":
    main()
